"""Recipe pilots: distillation runs of one token budget that differ in one setting, scored on the
same held-out positions, each against the first pilot (the baseline).

    python -m analysis.pilots --out runs/pilots --steps 100 \\
        --pilot baseline= --pilot end=--ignore_after_end --pilot kl="--reg_target teacher --reg_weight 1"

Each pilot is ``NAME=FLAGS`` (flags of ``launch/distill.py``). A pilot whose exported model exists
in ``--out/NAME/model`` is not run again, so an interrupted batch resumes with the next pilot.
Every model is then scored on the same ``--max_tokens`` held-out positions (BoolQ dev passages
unless ``--data``): agreement with the teacher's top-1 and top-5, raw / AutoCorrect /
AutoCorrect + fallback / fallback ceiling, each with a 95% interval and its paired difference from
the baseline; raw top-1 and the share of positions whose label is the teacher's top-1, split by
the top-1's spelling length and (where the baseline ran with ``--teacher_cache``) by the band of
how often it was the teacher's top-1 in the baseline's training text
(:mod:`analysis.label_frequency`); the next-token NLL above the teacher's (:mod:`analysis.likelihood`) at ``--tau``
and at the tau that sends 90% of positions to the LM head (pilots fall back at different rates at
one tau); the free-running agreement of greedy continuations (paired by prompt); and the speed
of its run (median step, and tokens per hour of wall clock, the fair one where steps differ in
cost, as with ``--teacher_cache``). A run made elsewhere (other steps, other flags) is scored
too when its output directory is placed at ``--out/NAME``; its FLAGS then only label it. Pilots
that differ only in how the student trains can share the teacher's forward: give the baseline
``--teacher_cache`` and the others ``--teacher_cache --teacher_cache_from OUT/BASELINE`` (the cache
changes no value; their speed then counts cache reads, not the teacher). The positions of one
256-token block share their text and are not independent: the paired intervals of per-position
columns are cluster-robust over blocks (32 at the default 8,192 positions), the free-running
ones per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from analysis import free_running, label_frequency, likelihood, match_rates
from analysis.collect import Analysis, collect, held_out_texts
from analysis.common import VARIANTS, correct_flags, paired_difference
from spellm_ds import cli
from spellm_ds.distill.metrics import BAND_EDGES, LENGTH_EDGES, group_name, group_of
from spellm_ds.distill.teacher_cache import entry_files
from spellm_ds.errors import SpellmError

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "launch" / "distill.py"
READINGS = {"top1": "exact_or_prefix", "top5": "at5"}
MATCHED_RATE = 0.9  # the pilots' likelihood is also compared at this fallback rate (see analysis.likelihood)


def parse_pilot(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name or "/" in name:
        raise SpellmError(f"--pilot {text!r} must be NAME=FLAGS (NAME without '/'; FLAGS may be empty)")
    return name, shlex.split(flags)


def run_pilot(out: Path, name: str, flags: list[str], steps: int, ranks: int) -> Path:
    """Distil one pilot (skipped when its model exists); returns the exported model directory."""
    out = out.resolve()
    model = out / name / "model"
    if (model / "config.json").is_file():
        return model
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), str(DISTILL),
               "--output_dir", str(out / name), "--max_steps", str(steps), "--eval_every", str(steps),
               "--save_every", "0", *flags]
    print("pilot", name, ":", shlex.join(command), flush=True)
    # the ranks run in and import this tree (its default DeepSpeed configs, its spellm_ds), not
    # whichever checkout is installed or current
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(out / f"{name}.log", "w") as log:
        if subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
            raise SpellmError(f"pilot {name} failed; see {out / f'{name}.log'}, fix it and rerun (finished pilots "
                              "are kept)")
    return model


def split_columns(analysis: Analysis, counts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Raw top-1 agreement and label = top-1 (0/1) by the teacher's top-1 length and, with
    ``counts`` (its training top-1 counts), by band: each column NaN outside its group (and where
    the top-1 is unspellable), so paired differences compare a group's positions only."""
    r, table = analysis.records, analysis.table
    top1 = r.top_ids[:, 0]
    spellable = table.spellable[top1]
    values = {"raw/top1": correct_flags(analysis, "raw")["exact_or_prefix"].double(),
              "label_is_top1": (r.label_valid & (r.label_chars == table.chars[top1]).all(-1)).double()}
    splits = {"length": (table.lengths[top1], LENGTH_EDGES)}
    if counts is not None:
        splits["band"] = (counts[top1], BAND_EDGES)
    columns = {}
    for split, (measure, edges) in splits.items():
        groups = group_of(measure, edges)
        for index in range(len(edges)):
            rows = spellable & (groups == index)
            if rows.any():
                for name, value in values.items():
                    columns[f"{name}/{split} {group_name(edges, index)}"] = value.masked_fill(~rows, float("nan"))
    return columns


def score(model: Path, args: argparse.Namespace,
          counts_from: Path | None = None) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Match rates, next-token likelihood and free-running agreement of one pilot, plus its
    per-position columns (0/1 match flags; the next token's NLL under SpeLLM + fallback, NaN where
    not scored; the splits of :func:`split_columns`, by band with the training counts of the
    teacher cache ``counts_from``) and each column's clusters (a position's block; a prompt)."""
    analysis = collect(argparse.Namespace(model=str(model), data=args.data, text_field=args.text_field, teacher=None,
                                          max_tokens=args.max_tokens, seq_len=256, batch_size=4, tau=args.tau,
                                          rerank_k=args.rerank_k, shortlist=args.shortlist))
    rates = match_rates.compute(analysis)
    flags = {}
    for variant, tau in [(v, None) for v in VARIANTS] + [("fallback_ceiling", 0.0)]:
        decoded = correct_flags(analysis, "autocorrect_fallback" if tau == 0.0 else variant, tau)
        for reading, key in READINGS.items():
            flags[f"{variant}/{reading}"] = decoded[key]
    counts = (None if counts_from is None
              else label_frequency.training_top1_counts(counts_from, analysis.table.vocab_size))
    flags.update(split_columns(analysis, counts))
    next_token = likelihood.compute(analysis)
    flags["likelihood/nll"] = likelihood.spellm_nll(analysis, args.tau)
    matched = next(p for p in next_token["at_fallback_rates"] if p["target"] == MATCHED_RATE)
    flags["likelihood/nll_matched"] = likelihood.spellm_nll(analysis, matched["tau"])
    from spellm_ds.model.spellm import load, load_teacher

    student = load(model)
    teacher = load_teacher(student)
    prompt_ids = free_running.prompts(student.tokenizer, held_out_texts(args.data, args.text_field), args.prompts, 32)
    free = free_running.compute(student, teacher, prompt_ids, args.new_tokens, args.tau, args.rerank_k, args.shortlist)
    flags["free_running/agreed_tokens"] = torch.tensor(free["autocorrect_fallback"]["agreed_tokens"], dtype=torch.float64)
    blocks = analysis.blocks()
    clusters = {key: torch.arange(len(column)) if key.startswith("free_running/") else blocks
                for key, column in flags.items()}
    return {"match_rates": rates["summary"], "fallback_rate": rates["summary"]["fallback_rate"],
            "likelihood": {"teacher_nll": next_token["teacher_nll"], "spellm": next_token["spellm"], "matched": matched},
            "free_running": free_running.summary(free)}, flags, clusters


def markdown(results: dict) -> str:
    lines = ["| pilot | flags | raw top-1 | raw top-5 | AC+fallback top-1 (fallback rate) | fallback ceiling top-1 "
             f"| next-token NLL above the teacher's, AC+fallback (nats) | the same at {MATCHED_RATE:.0%} fallback "
             "| free-running agreed tokens (AC+fallback) | tokens/s per rank (median step) | M tokens per hour |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["pilots"].items():
        def cell(key: str, value: str | None = None, scale: float = 100, digits: int = 1) -> str:
            diff = r.get("vs_baseline", {}).get(key)
            value = value or f"{scale * r['rates'][key]:.{digits}f}%"
            return value + (f" ({scale * diff['diff']:+.{digits}f}, [{scale * diff['ci95'][0]:+.{digits}f}, "
                            f"{scale * diff['ci95'][1]:+.{digits}f}])" if diff else "")
        gap = r["likelihood"]["spellm"]["vs_teacher"]["diff"]
        matched_gap = r["likelihood"]["matched"]["vs_teacher"]["diff"]
        agreed = r["rates"]["free_running/agreed_tokens"]
        lines.append(f"| {name} | `{r['flags']}` | {cell('raw/top1')} | {cell('raw/top5')} | "
                     f"{cell('autocorrect_fallback/top1')} ({100 * r['fallback_rate']:.1f}%) | "
                     f"{cell('fallback_ceiling/top1')} | "
                     f"{cell('likelihood/nll', f'{gap:+.3f}', 1, 3)} | "
                     f"{cell('likelihood/nll_matched', f'{matched_gap:+.3f}', 1, 3)} | "
                     f"{cell('free_running/agreed_tokens', f'{agreed:.1f}', 1)} | "
                     f"{r['tokens_per_s'] or float('nan'):.0f} | {(r['tokens_per_hour'] or float('nan')) / 1e6:.2f} |")
    for measure, title in (("raw/top1", "Raw top-1"), ("label_is_top1", "Label = the teacher's top-1")):
        groups = [key.removeprefix(f"{measure}/") for key in next(iter(results["pilots"].values()))["rates"]
                  if key.startswith(f"{measure}/")]
        lines += ["", f"{title} by the top-1's length in characters and by its training count band "
                  "(share of positions in the first row):", "",
                  "| pilot | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        lines.append("| (share) | " + " | ".join(f"{100 * next(iter(results['pilots'].values()))['shares'][g]:.1f}%"
                                                 for g in groups) + " |")
        for name, r in results["pilots"].items():
            lines.append(f"| {name} | " + " | ".join(
                short_cell(r, f"{measure}/{g}") for g in groups) + " |")
    return "\n".join(lines) + "\n"


def short_cell(result: dict, key: str) -> str:
    """A rate in percent and, against the baseline, its paired difference and interval."""
    diff = result.get("vs_baseline", {}).get(key)
    value = f"{100 * result['rates'][key]:.1f}"
    return value if diff is None else f"{value} ({100 * diff['diff']:+.1f} [{100 * diff['ci95'][0]:+.1f}, " \
                                      f"{100 * diff['ci95'][1]:+.1f}])"


def speed(run_dir: Path) -> dict:
    """The run's steps, its median tokens/s per rank (its typical step), and its tokens per hour of
    wall clock from its first to its last logged step, evaluations and checkpoints included: the
    measure that stays fair where steps differ in cost, as with ``--teacher_cache`` (a resumed
    run's downtime counts too). From its TensorBoard log and run_config.json."""
    from analysis.training_curves import load_events, run_shape

    events = load_events(run_dir / "tensorboard")
    tags = events.Tags()["scalars"]
    rates = sorted(e.value for e in events.Scalars("perf/tokens_per_s")) if "perf/tokens_per_s" in tags else []
    steps = events.Scalars("loss/total") if "loss/total" in tags else []
    step_tokens, _ = run_shape(run_dir / "tensorboard")
    hours = (steps[-1].wall_time - steps[0].wall_time) / 3600 if steps else 0.0
    return {"steps": steps[-1].step if steps else 0, "tokens_per_s": rates[len(rates) // 2] if rates else None,
            "tokens_per_hour": (steps[-1].step - steps[0].step) * step_tokens / hours if hours > 0 and step_tokens
            else None}


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--pilot", action="append", required=True, type=parse_pilot, metavar="NAME=FLAGS",
                        help="one pilot; the first is the baseline the others are compared with")
    parser.add_argument("--out", required=True, help="folder of the pilot runs and pilots.json/pilots.md")
    parser.add_argument("--steps", type=cli.positive_int, default=100, help="optimizer steps per pilot "
                        "(the token budget is steps x global batch x seq_len; default: %(default)s)")
    parser.add_argument("--ranks", type=cli.positive_int, default=2, help="processes per pilot (default: %(default)s)")
    parser.add_argument("--data", nargs="*", default=None, metavar="FILE", help="held-out text (default: BoolQ dev)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--max_tokens", type=cli.positive_int, default=8192, help="held-out positions scored")
    parser.add_argument("--prompts", type=cli.positive_int, default=50, help="free-running prompts")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=64, help="free-running tokens per prompt")
    cli.add_tau_arg(parser)
    cli.add_rerank_arg(parser)
    args = parser.parse_args()
    names = [name for name, _ in args.pilot]
    if len(set(names)) != len(names):
        raise SpellmError(f"pilot names must differ: {names}")
    out = cli.check_output_dir(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    from spellm_ds.runtime.provenance import commit

    results: dict = {"commit": commit(), "steps": args.steps, "held_out": args.data or "BoolQ dev passages", "positions": args.max_tokens,
                     "tau": args.tau, "rerank_k": args.rerank_k, "shortlist": args.shortlist, "pilots": {}}
    baseline_flags = counts_from = None
    for name, flags in args.pilot:
        model = run_pilot(out, name, flags, args.steps, args.ranks)
        if baseline_flags is None and entry_files(out / name / "teacher_cache", "train"):
            counts_from = out / name / "teacher_cache"
        summary, position_flags, clusters = score(model, args, counts_from)
        entry = {"flags": shlex.join(flags), "rates": {k: float(v.double().nanmean()) for k, v in position_flags.items()},
                 "shares": {k.removeprefix("raw/top1/"): float((~v.isnan()).double().mean())
                            for k, v in position_flags.items() if k.startswith("raw/top1/")},
                 **summary, **speed(out / name)}
        if baseline_flags is None:
            baseline_flags = position_flags
        else:
            entry["vs_baseline"] = {k: paired_difference(v, baseline_flags[k], clusters[k])
                                    for k, v in position_flags.items()}
        results["pilots"][name] = entry
        (out / "pilots.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "pilots.md").write_text(markdown(results))
    print((out / "pilots.md").read_text())


if __name__ == "__main__":
    cli.run(main)
