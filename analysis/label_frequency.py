"""Exact+prefix match by how often the teacher's top-1 token was its top-1 in the training text.

    python -m analysis.label_frequency --model DIR --teacher_cache_dir RUN/teacher_cache [--data FILE] --out FILE.json

It shows where the misses sit: on tokens the heads rarely saw as labels, or on tokens seen
thousands of times. Rarity goes with length (rare tokens are mostly long ones), so a band mixes
both (``experiments/fidelity-pilots.md``, "Rare labels weighted up": more loss weight does not help
rare tokens). The counts come from a ``--teacher_cache`` run's cache, which holds the teacher's
top-5 at every training position the run read. A position trains on one of the teacher's top-5
(the label rule), mostly its top-1, so a token's count is about how often its spelling was a
label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import safe_open

from analysis.collect import Analysis
from analysis.common import correct_flags, new_figure, rate, run_cli, save_figure
from spellm_ds import cli
from spellm_ds.distill.metrics import BAND_EDGES, LENGTH_EDGES, group_name, group_of
from spellm_ds.distill.teacher_cache import entry_files

LONG = 5  # characters: the report's token-length table falls from 64% to 33% here


def training_top1_counts(cache_dir: Path, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]``: how often each token was the teacher's top-1 over the cache's training blocks."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for entry in entry_files(cache_dir, "train"):
        with safe_open(entry, framework="pt") as block:
            counts += torch.bincount(block.get_tensor("top_ids")[:, 0].long(), minlength=vocab_size)
    return counts


def compute_from_counts(analysis: Analysis, counts: torch.Tensor) -> dict:
    """Raw and AutoCorrect exact+prefix per band of the teacher's top-1's training count (positions
    whose top-1 the table cannot spell left out), each also split by the token's length; the same
    per length band; and in each band the share of positions whose label (the model's own rule,
    on its held-out predictions) spells the teacher's top-1."""
    r, table = analysis.records, analysis.table
    top1 = r.top_ids[:, 0]
    spellable = table.spellable[top1]
    raw = correct_flags(analysis, "raw")["exact_or_prefix"][spellable]
    fixed = correct_flags(analysis, "autocorrect")["exact_or_prefix"][spellable]
    label_top1 = (r.label_valid & (r.label_chars == table.chars[top1]).all(-1))[spellable]
    seen, length = counts[top1][spellable], table.lengths[top1][spellable]
    long = length >= LONG
    blocks = analysis.blocks()[spellable]

    def group(rows: torch.Tensor, key: str, name: str) -> dict:
        return {key: name, "n": int(rows.sum()), "share": float(rows.float().mean()),
                "raw": rate(raw[rows], blocks[rows]), "autocorrect": rate(fixed[rows])["rate"],
                "label_is_top1": rate(label_top1[rows])["rate"]}

    bands = []
    for index in range(len(BAND_EDGES)):
        rows = group_of(seen, BAND_EDGES) == index
        bands.append({**group(rows, "band", group_name(BAND_EDGES, index)),
                      f"raw_shorter_than_{LONG}": rate(raw[rows & ~long], blocks[rows & ~long]),
                      f"raw_{LONG}_or_longer": rate(raw[rows & long], blocks[rows & long])})
    lengths = [group(group_of(length, LENGTH_EDGES) == index, "length", group_name(LENGTH_EDGES, index))
               for index in range(len(LENGTH_EDGES))]
    summary = {"raw": rate(raw)["rate"], "label_is_top1": rate(label_top1)["rate"],
               "share_and_raw_by_band": {b["band"]: [b["share"], b["raw"]["rate"]] for b in bands},
               "raw_and_label_is_top1_by_length": {b["length"]: [b["raw"]["rate"], b["label_is_top1"]]
                                                   for b in lengths}}
    return {"training_positions": int(counts.sum()), "positions": int(spellable.sum()), "bands": bands,
            "lengths": lengths, "summary": summary}


def compute(analysis: Analysis, args: argparse.Namespace) -> dict:
    counts = training_top1_counts(args.teacher_cache_dir, analysis.table.vocab_size)
    return {"teacher_cache": str(args.teacher_cache_dir), **compute_from_counts(analysis, counts)}


def teacher_cache_dir(value: str) -> Path:
    path = Path(value)
    if not entry_files(path, "train"):
        raise argparse.ArgumentTypeError(f"{value!r} holds no training entries: pass the teacher_cache/ folder of a "
                                         "run made with --teacher_cache")
    return path


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher_cache_dir", type=teacher_cache_dir, required=True,
                        help="the teacher_cache/ folder of the model's --teacher_cache run (its training counts)")


def plot(result: dict, path: Path) -> None:
    fig, ax = new_figure()
    bands = [b for b in result["bands"] if b["n"]]
    x = range(len(bands))
    ax.bar(x, [100 * b["raw"]["rate"] for b in bands], color="tab:blue")
    for i, b in zip(x, bands):
        ax.annotate(f"{100 * b['share']:.0f}%", (i, 100 * b["raw"]["rate"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [b["band"] for b in bands])
    ax.set_xlabel("times the teacher's top-1 token was its top-1 in training")
    ax.set_ylabel("raw exact+prefix match (%)")
    ax.set_title("above each bar: the band's share of the positions", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    cli.run(lambda: run_cli(__doc__, compute, plot, extra_args))
