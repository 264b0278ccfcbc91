"""Two SpeLLM models' downstream scores, paired on the same examples.

    python -m analysis.downstream_compare runs/eval-base/downstream.json runs/eval-kl/downstream.json

Each ``downstream.json`` (from ``launch/evaluate.py``) pairs one model with the teacher. Two such
reports' intervals against the teacher overlap long before the models are indistinguishable; the
per-sample scores, paired across the two reports, give the difference between the models with its
own 95% interval (:func:`spellm_ds.eval.downstream.compare`). The reports must come from the same
teacher, tasks and ``--limit``; their taus may differ (each report's fallback rate is shown).
"""

from __future__ import annotations

import json
from pathlib import Path

from spellm_ds import cli
from spellm_ds.errors import SpellmError
from spellm_ds.eval.downstream import compare


def markdown(result: dict, baseline: dict, candidate: dict, system: str) -> str:
    def rate(report: dict) -> str:
        value = report["fallback_rates"].get(system)
        return f" (tau {report['settings']['tau']}, {100 * value:.1f}% fallback)" if value is not None else ""

    lines = [f"{system}: baseline {baseline['settings']['model']}{rate(baseline)}, "
             f"candidate {candidate['settings']['model']}{rate(candidate)}", "",
             "| task | metric | n | baseline | candidate | candidate - baseline [95% CI] |", "|---|---|---|---|---|---|"]
    for task, metrics in sorted(result.items()):
        for metric, entry in metrics.items():
            low, high = entry["diff_ci95"]
            lines.append(f"| {task} | {metric} | {entry['n']} | {100 * entry['baseline']:.1f} | "
                         f"{100 * entry['candidate']:.1f} | {100 * entry['diff']:+.1f} "
                         f"[{100 * low:+.1f}, {100 * high:+.1f}] |")
    return "\n".join(lines) + "\n"


def read_report(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SpellmError(f"{path}: not a readable downstream.json ({error}); pass the file launch/evaluate.py "
                          "--out wrote") from None


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("baseline", help="downstream.json of the baseline model")
    parser.add_argument("candidate", help="downstream.json of the model compared with it")
    parser.add_argument("--system", default="spellm_fallback", choices=("spellm", "spellm_fallback"),
                        help="which of each report's SpeLLM systems to compare (default: %(default)s)")
    parser.add_argument("--out", type=cli.output_file, default=None,
                        help="also write the comparison as JSON to this file")
    args = parser.parse_args()
    baseline, candidate = read_report(args.baseline), read_report(args.candidate)
    try:
        result = compare(baseline, candidate, args.system)
    except ValueError as error:
        raise SpellmError(str(error)) from None
    print(markdown(result, baseline, candidate, args.system), end="")
    if args.out:
        Path(args.out).write_text(json.dumps({"baseline": args.baseline, "candidate": args.candidate,
                                              "system": args.system, "tasks": result}, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
