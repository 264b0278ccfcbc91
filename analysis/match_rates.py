"""Exact, prefix and match@5 with the teacher, raw / with AutoCorrect / with AutoCorrect + fallback,
and the fallback ceiling: every position through the student's LM head (what fallback can reach
at best, and how far the trained FFNs moved the hidden state from the teacher's).

    python -m analysis.match_rates --model DIR [--data FILE] [--max_tokens N] [--tau 0.22] --out report.json
"""

from __future__ import annotations

import argparse

from analysis.collect import Analysis
from analysis.common import VARIANTS, correct_flags, fallback_mask, rate, run_cli
from spellm_ds import cli


def compute(analysis: Analysis, args: argparse.Namespace | None = None) -> dict:
    r = analysis.records
    result: dict = {"teacher": analysis.teacher, "tau": analysis.tau, "rerank_k": analysis.rerank_k,
                    "shortlist": analysis.shortlist, "positions": len(r), "k": analysis.table.k}
    blocks = analysis.blocks()  # intervals count the positions of one text block as one sample
    for variant in VARIANTS:
        result[variant] = {name: rate(flags, blocks) for name, flags in correct_flags(analysis, variant).items()}
    result["autocorrect_fallback"]["fallback_rate"] = rate(fallback_mask(analysis, analysis.tau), blocks)
    result["fallback_ceiling"] = {name: rate(flags, blocks)
                                  for name, flags in correct_flags(analysis, "autocorrect_fallback", 0.0).items()}
    result["raw"]["valid_string"] = rate(r.hit, blocks)
    valid = r.label_valid
    result["per_head_accuracy"] = [rate((r.raw_chars[:, j] == r.label_chars[:, j])[valid])["rate"]
                                   for j in range(analysis.table.k)]
    result["summary"] = {v: {"top1": result[v]["exact_or_prefix"]["rate"], "top5": result[v]["at5"]["rate"]}
                         for v in (*VARIANTS, "fallback_ceiling")}
    result["summary"]["fallback_rate"] = result["autocorrect_fallback"]["fallback_rate"]["rate"]
    return result


if __name__ == "__main__":
    cli.run(lambda: run_cli(__doc__, compute))
