"""Exact match by the teacher token's length, the share of positions whose label (the model's
own rule on its held-out predictions) spells the teacher's top-1, and how much of the vocabulary
and of the analysed text k = 5 / 10 / 15 characters cover.

    python -m analysis.token_length --model DIR [--data FILE] --out token_length.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis.collect import Analysis
from analysis.common import correct_flags, new_figure, rate, run_cli, save_figure
from spellm_ds import cli
from spellm_ds.model.spelling import SpellingTable

COVERAGE_K = (5, 10, 15)


def compute(analysis: Analysis, args: argparse.Namespace | None = None) -> dict:
    r, table = analysis.records, analysis.table
    top1 = r.top_ids[:, 0]
    length = table.lengths[top1]
    spellable = table.spellable[top1]
    raw = correct_flags(analysis, "raw")["exact_or_prefix"]
    fixed = correct_flags(analysis, "autocorrect")["exact_or_prefix"]
    label_top1 = r.label_valid & (r.label_chars == table.chars[top1]).all(-1)
    by_length = []
    for n in range(1, table.k + 2):
        rows = spellable & ((length == n) if n <= table.k else (length > table.k))
        by_length.append({"length": str(n) if n <= table.k else f">{table.k}", "n": int(rows.sum()),
                          "raw": rate(raw[rows])["rate"], "autocorrect": rate(fixed[rows])["rate"],
                          "label_is_top1": rate(label_top1[rows])["rate"]})
    coverage = []
    for k in COVERAGE_K:
        stats = SpellingTable.from_tokenizer(analysis.tokenizer, table.charset, k, table.vocab_size).stats(analysis.corpus_counts)
        coverage.append({"k": k, "vocab_exactly_spellable": stats["exactly_spellable"],
                         "text_tokens_exactly_spellable": stats["corpus_exactly_spellable"]})
    return {"by_teacher_token_length": by_length, "unspellable_top1": rate(~spellable), "coverage": coverage,
            "label_is_top1": rate(label_top1[spellable], analysis.blocks()[spellable]),
            "summary": {"coverage": coverage}}


def plot(result: dict, path: Path) -> None:
    fig, ax = new_figure()
    rows = [b for b in result["by_teacher_token_length"] if b["n"]]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * b["raw"] for b in rows], width=0.4, label="raw")
    ax.bar([i + 0.2 for i in x], [100 * b["autocorrect"] for b in rows], width=0.4, label="AutoCorrect")
    ax.set_xticks(list(x), [b["length"] for b in rows])
    ax.set_xlabel("teacher top-1 token length (characters)")
    ax.set_ylabel("exact+prefix match (%)")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    cli.run(lambda: run_cli(__doc__, compute, plot))
