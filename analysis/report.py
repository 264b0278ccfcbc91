"""All analyses in one pass over the data: report.json, PNG plots and a readable report.md.

    python -m analysis.report --model DIR [--data FILE] [--max_tokens N] [--tau 0.22] --out DIR
"""

from __future__ import annotations

import json

from analysis import blending, entropy, likelihood, match_rates, token_length
from analysis.collect import add_args, collect
from analysis.common import VARIANTS
from spellm_ds import cli

MODULES = {"match_rates": (match_rates.compute, None), "blending": (blending.compute, blending.plot),
           "entropy": (entropy.compute, entropy.plot), "token_length": (token_length.compute, token_length.plot),
           "likelihood": (likelihood.compute, None)}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(report: dict, model: str) -> str:
    m = report["match_rates"]
    lines = [f"# SpeLLM analysis: `{model}`", "",
             f"Teacher `{m['teacher']}`, k = {m['k']}, {m['positions']} positions, tau = {m['tau']}.", "",
             *([f"Re-ranked (`--rerank_k {m['rerank_k']}`, beyond the paper): the autocorrect rows are the best of the "
                f"heads' top-{m['rerank_k']} valid spellings by the LM head's logits, and the char heads' likelihood "
                "shares their mass of those spellings by the LM head's softmax over them.", ""]
               if m["rerank_k"] else []),
             *([f"Shortlist (`--shortlist {m['shortlist']}`, beyond the paper): the LM head also scored the "
                f"{m['shortlist']} tokens most frequent in the training text on the autocorrect rows, and the char "
                "heads' likelihood shares their mass of the candidates by the LM head's softmax over them.", ""]
               if m.get("shortlist") else []),
             "Agreement with the teacher's top-1 (exact+prefix) and with any of its top-5 (match@5); the "
             "fallback ceiling sends every position through the student's LM head.", "",
             "| decoding | exact | prefix | vs top-1: exact+prefix (95% CI) | vs top-5: match@5 (95% CI) |",
             "|---|---|---|---|---|"]
    for variant in (*VARIANTS, "fallback_ceiling"):
        v = m[variant]
        top1, top5 = v["exact_or_prefix"], v["at5"]
        lines.append(f"| {variant} | {pct(v['exact']['rate'])} | {pct(v['prefix']['rate'])} | "
                     f"{pct(top1['rate'])} ({pct(top1['ci95'][0])}-{pct(top1['ci95'][1])}) | "
                     f"{pct(top5['rate'])} ({pct(top5['ci95'][0])}-{pct(top5['ci95'][1])}) |")
    lines += ["", f"Fallback rate at tau = {m['tau']}: {pct(m['autocorrect_fallback']['fallback_rate']['rate'])}.",
              "", "Per-head accuracy (vs the selected label): "
              + ", ".join(f"{j + 1}: {pct(a)}" for j, a in enumerate(m["per_head_accuracy"])), ""]
    b = report["blending"]
    lines += ["## Blending", "", f"Blending rate {pct(b['blending']['rate'])} of positions "
              f"({pct(b['blends_among_invalid']['rate'])} of invalid strings; invalid strings "
              f"{pct(b['invalid_strings']['rate'])}).", "", "Most frequent blends:", ""]
    lines += [f"- `{t['shown']}` x{t['count']}" for t in b["top_blends"][:10]] or ["- none"]
    e = report["entropy"]
    target, budget = e["threshold_for_target_accuracy"], e["threshold_for_fallback_budget"]
    lines += ["", "## Entropy calibration", "",
              f"Pearson / Spearman correlation of teacher and student entropy: {e['pearson_teacher_student']:.3f} / "
              f"{e['spearman_teacher_student']:.3f}.", "",
              f"- target accuracy {e['target_accuracy']}: " + (
                  f"tau = {target['tau']:.4f} (accuracy {pct(target['accuracy'])}, fallback {pct(target['fallback_rate'])})"
                  if target else "not reachable"),
              f"- fallback budget {e['max_fallback_rate']}: " + (
                  f"tau = {budget['tau']:.4f} (accuracy {pct(budget['accuracy'])}, fallback {pct(budget['fallback_rate'])}; "
                  f"the best any rule could do at that rate: {pct(budget['best_possible_accuracy'])})"
                  if budget else "none"), ""]
    t = report["token_length"]
    lines += ["## Token length", "", "The label (the model's own rule on these predictions) is the teacher's top-1 at "
              f"{pct(t['label_is_top1']['rate'])} of positions.", "",
              "| teacher token length | n | raw | AutoCorrect | label is the top-1 |", "|---|---|---|---|---|"]
    lines += [f"| {row['length']} | {row['n']} | {pct(row['raw'])} | {pct(row['autocorrect'])} | "
              f"{pct(row['label_is_top1'])} |" for row in t["by_teacher_token_length"]]
    lines += ["", "| k | vocabulary exactly spellable | text tokens exactly spellable |", "|---|---|---|"]
    lines += [f"| {c['k']} | {pct(c['vocab_exactly_spellable'])} | {pct(c['text_tokens_exactly_spellable'])} |"
              for c in t["coverage"]]
    lines += likelihood_section(report["likelihood"])
    lines += ["", "Plots: `entropy.png`, `blending.png`, `token_length.png`.", ""]
    return "\n".join(lines)


def likelihood_section(result: dict) -> list[str]:
    def row(name: str, entry: dict, fallback: str) -> str:
        diff = entry["vs_teacher"]
        return (f"| {name} | {fallback} | {entry['nll']:.3f} | {diff['diff']:+.3f} "
                f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] |")

    decide = result["heads_decide"]
    lines = ["", "## Next-token likelihood", "",
             f"NLL (nats) of the text's next token at {result['scored']} positions ({result['unspellable_next']} "
             f"more have a next token no spelling names); the teacher's: {result['teacher_nll']:.3f}.", "",
             "| scored by | fallback | NLL | vs teacher (95% CI) |", "|---|---|---|---|",
             row("char heads everywhere", result["heads_everywhere"], "0%"),
             row("LM head everywhere (ceiling)", result["lm_head_everywhere"], "100%")]
    lines += [row(f"SpeLLM, tau = {p['tau']}", p, pct(p["fallback_rate"])) for p in result["tau_sweep"]]
    lines += [row(f"SpeLLM at {pct(p['target'])} fallback (tau = {p['tau']:.4f})", p, pct(p["fallback_rate"]))
              for p in result["at_fallback_rates"]]
    if decide["positions"]:
        lines += ["", f"Where the heads decide (tau = {result['spellm']['tau']}, {decide['positions']} positions) the "
                  f"next token is their own token at {pct(decide['next_is_heads_token'])}; NLL heads "
                  f"{decide['heads_nll']:.3f} vs teacher {decide['teacher_nll']:.3f}"
                  + (f"; elsewhere the heads' NLL is a median {decide['median_gap_elsewhere']:.1f} nats above the "
                     "teacher's." if decide["median_gap_elsewhere"] is not None else ".")]
    return lines


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    add_args(parser)
    entropy.extra_args(parser)
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args()
    out = cli.check_output_dir(args.out, "--out")
    analysis = collect(args)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, (compute, plot) in MODULES.items():
        report[name] = compute(analysis, args)
        if plot:
            plot(report[name], out / f"{name}.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, args.model))
    print((out / "report.md").read_text())


if __name__ == "__main__":
    cli.run(main)
