"""Character blending: raw predictions no single top-5 candidate explains, but whose every
character appears, at its position, in some candidate (``Dizza <- Donuts + Pizza``).

    python -m analysis.blending --model DIR [--data FILE] --out blending.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from analysis.collect import Analysis
from analysis.common import new_figure, rate, run_cli, save_figure
from spellm_ds import cli
from spellm_ds.distill.metrics import match_flags
from spellm_ds.model.charset import END_ID

ENTROPY_BINS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, float("inf"))
TOP_BLENDS = 20


def blend_flags(analysis: Analysis) -> torch.Tensor:
    r, table = analysis.records, analysis.table
    candidates = table.chars[r.top_ids]  # [N, 5, k]
    usable = table.spellable[r.top_ids].unsqueeze(-1)
    each_char_found = ((r.raw_chars.unsqueeze(1) == candidates) & usable).any(1).all(-1)
    explained = match_flags(r.raw_chars, r.top_ids, table).at5
    return each_char_found & ~explained


def sources(analysis: Analysis, row: int) -> list[int]:
    """The candidates a blend takes its characters from (the most probable one per position)."""
    r, table = analysis.records, analysis.table
    used: list[int] = []
    for j, char in enumerate(r.raw_chars[row].tolist()):
        for token in r.top_ids[row].tolist():
            if table.spellable[token] and table.chars[token, j] == char:
                if token not in used:
                    used.append(token)
                break
    return used


def render(chars: list[int], table) -> str:
    """A predicted string as text; an END followed by more characters shows as ``<end>``."""
    while chars and chars[-1] == END_ID:
        chars = chars[:-1]
    return "".join(table.charset.symbols[c] for c in chars)


def compute(analysis: Analysis, args: argparse.Namespace | None = None) -> dict:
    r, table = analysis.records, analysis.table
    blends, blocks = blend_flags(analysis), analysis.blocks()
    by_bin = []
    for low, high in zip(ENTROPY_BINS, ENTROPY_BINS[1:]):
        in_bin = (r.teacher_entropy >= low) & (r.teacher_entropy < high)
        by_bin.append({"teacher_entropy": [low, high], **rate(blends[in_bin], blocks[in_bin])})
    counter: Counter = Counter()
    for row in blends.nonzero().squeeze(1).tolist():
        text = render(r.raw_chars[row].tolist(), table)
        counter[(text, tuple(table.spelling_text(t) for t in sources(analysis, row)))] += 1
    top = [{"blend": text, "from": list(parts), "count": n, "shown": f"{text!r} <- " + " + ".join(map(repr, parts))}
           for (text, parts), n in counter.most_common(TOP_BLENDS)]
    invalid = ~r.hit
    blending, invalid_strings = rate(blends, blocks), rate(invalid, blocks)
    return {"blending": blending, "blends_among_invalid": rate(blends[invalid], blocks[invalid]),
            "invalid_strings": invalid_strings, "by_teacher_entropy": by_bin, "top_blends": top,
            "summary": {"blending_rate": blending["rate"], "invalid_rate": invalid_strings["rate"]}}


def plot(result: dict, path: Path) -> None:
    fig, ax = new_figure()
    bins = result["by_teacher_entropy"]
    labels = [f"{b['teacher_entropy'][0]:g}-{b['teacher_entropy'][1]:g}" for b in bins]
    ax.bar(labels, [100 * b["rate"] for b in bins])
    ax.set_xlabel("teacher entropy (nats)")
    ax.set_ylabel("blending rate (%)")
    ax.set_title("Character blending by teacher entropy")
    save_figure(fig, path)


if __name__ == "__main__":
    cli.run(lambda: run_cli(__doc__, compute, plot))
