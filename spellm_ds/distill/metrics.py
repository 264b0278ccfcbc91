"""Per-step match metrics, defined as in the README and used everywhere (training logs, analysis).

The predicted string is each head's argmax ended at its first END (:func:`read_string`).

- exact match: the predicted string equals spelling(teacher top-1) and that token fits in k chars;
- prefix match: the teacher top-1 is longer than k and the argmax string equals its first k chars;
- match@5: the predicted string equals the spelling of any spellable teacher top-5 candidate;
- head j accuracy: head j's argmax equals the selected label's j-th char (valid positions);
- label = top-1: the share of valid positions whose selected label is the teacher's top-1.

Exact+prefix match and the label = top-1 share are also split by the length of the teacher's
top-1 spelling and, given token counts, by how often that token was counted (bands of
:data:`BAND_EDGES`): the misses sit on long and rare tokens.

Functions return *sums* so ranks can all-reduce them before dividing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from spellm_ds.hf.char_decoding import mean_head_entropy, read_string

if TYPE_CHECKING:
    from spellm_ds.distill.losses import Labels
    from spellm_ds.distill.teacher import TeacherSignal
    from spellm_ds.model.spelling import SpellingTable


BAND_EDGES = (0, 1, 10, 100, 1000, 10000)
"""Bands of a token's count (in the training text, or as the teacher's top-1): each holds counts
from its edge up to the next."""
LENGTH_EDGES = (1, 2, 3, 5, 6, 7, 9)
"""Bands of a spelling's length in characters (exact match falls from 64% to 33% at 5)."""


def group_of(values: torch.Tensor, edges: tuple[int, ...]) -> torch.Tensor:
    """The index of the band of ``edges`` each value falls in (values below the first edge: 0)."""
    return torch.bucketize(values, torch.tensor(edges[1:], device=values.device), right=True)


def group_name(edges: tuple[int, ...], index: int) -> str:
    low = edges[index]
    if index + 1 == len(edges):
        return f"{low}+" if edges is LENGTH_EDGES else f">={low}"
    high = edges[index + 1] - 1
    return str(low) if low == high else f"{low}-{high}"


class MatchFlags(NamedTuple):
    exact: torch.Tensor  # [...] bool
    prefix: torch.Tensor
    at5: torch.Tensor


def match_flags(predicted: torch.Tensor, top_ids: torch.Tensor, table: SpellingTable) -> MatchFlags:
    """Exact / prefix / match@5 of predicted strings ``[..., k]`` against teacher top-5 ``[..., 5]``."""
    top1 = top_ids[..., 0]
    same_as_top1 = (predicted == table.chars[top1]).all(-1) & table.spellable[top1]
    fits = table.lengths[top1] <= table.k
    same_as_any = (predicted.unsqueeze(-2) == table.chars[top_ids]).all(-1) & table.spellable[top_ids]
    return MatchFlags(same_as_top1 & fits, same_as_top1 & ~fits, same_as_any.any(-1))


@torch.no_grad()
def match_sums(char_logits: torch.Tensor, signal: TeacherSignal, labels: Labels, table: SpellingTable,
               token_counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums over a batch; ``token_counts`` ``[V]`` (e.g. the training text's) adds the split by band."""
    predicted = read_string(char_logits)  # [B, T, k]
    flags = match_flags(predicted, signal.top_ids, table)
    head_correct = ((predicted == labels.chars) & labels.valid.unsqueeze(-1)).sum((0, 1))
    top1 = signal.top_ids[..., 0]
    label_top1 = labels.valid & (labels.token_ids == top1)
    sums = {
        "positions": torch.tensor(float(predicted[..., 0].numel())),
        "valid": labels.valid.sum().float(),
        "exact": flags.exact.sum().float(),
        "prefix": flags.prefix.sum().float(),
        "at5": flags.at5.sum().float(),
        "head_correct": head_correct.float(),
        "entropy_student": mean_head_entropy(char_logits).sum(),
        "entropy_teacher": signal.entropy.sum(),
        "label_top1": label_top1.sum().float(),
    }
    scored = table.spellable[top1]
    splits = {"length": (table.lengths[top1], LENGTH_EDGES)}
    if token_counts is not None:
        splits["band"] = (token_counts[top1], BAND_EDGES)
    for split, (values, edges) in splits.items():
        groups = group_of(values[scored], edges)
        for name, flag in (("positions", None), ("agree", (flags.exact | flags.prefix)[scored]),
                           ("label_top1", label_top1[scored])):
            weights = None if flag is None else flag.float()
            sums[f"{split}/{name}"] = torch.bincount(groups, weights, minlength=len(edges)).float()
    return sums


def rates(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Turn (all-reduced) sums into the logged rates."""
    positions, valid = float(sums["positions"]), max(float(sums["valid"]), 1.0)
    out = {
        "match/exact": float(sums["exact"]) / positions,
        "match/prefix": float(sums["prefix"]) / positions,
        "match/exact_or_prefix": float(sums["exact"] + sums["prefix"]) / positions,
        "match/at5": float(sums["at5"]) / positions,
        "entropy/student": float(sums["entropy_student"]) / positions,
        "entropy/teacher": float(sums["entropy_teacher"]) / positions,
    }
    for j, correct in enumerate(sums["head_correct"].tolist()):
        out[f"acc/head_{j + 1}"] = correct / valid
    out["label/top1_share"] = float(sums["label_top1"]) / valid
    for split, edges in (("length", LENGTH_EDGES), ("band", BAND_EDGES)):
        if f"{split}/positions" not in sums:
            continue
        counts = sums[f"{split}/positions"].tolist()
        for index, count in enumerate(counts):
            if count:
                name = group_name(edges, index)
                out[f"match_by_{split}/{name}"] = float(sums[f"{split}/agree"][index]) / count
                out[f"label_top1_by_{split}/{name}"] = float(sums[f"{split}/label_top1"][index]) / count
    return out


Z_95 = 1.96
"""The normal quantile of every 95% interval the package reports."""


def wilson_interval(count: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (the observations treated as independent)."""
    if total == 0:
        return (0.0, 0.0)
    p = count / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))
