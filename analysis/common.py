"""Shared pieces of the analysis modules: predictions per decoding variant, rates with
confidence intervals, and the command-line driver."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from analysis.collect import Analysis, add_args, collect
from spellm_ds import cli
from spellm_ds.distill.metrics import Z_95, match_flags, wilson_interval
from spellm_ds.hf.char_decoding import falls_back

VARIANTS = ("raw", "autocorrect", "autocorrect_fallback")


def clustered_variance_of_mean(values: torch.Tensor, clusters: torch.Tensor) -> tuple[float, int]:
    """The cluster-robust variance of ``values``' mean and the number of clusters: positions of one
    cluster (e.g. one text block) share a context and are not independent. With one position per
    cluster it is the plain variance of the mean, ``s^2 / n``."""
    _, ids = torch.unique(clusters, return_inverse=True)
    values = values.double()
    sums = torch.bincount(ids, weights=values - values.mean())  # per cluster: the sum of its deviations
    count, n = len(sums), len(values)
    return (count / (count - 1) * float((sums ** 2).sum()) / n ** 2 if count > 1 else 0.0), count


def rate(flags: torch.Tensor, clusters: torch.Tensor | None = None) -> dict[str, Any]:
    """A proportion with its 95% Wilson interval.

    ``clusters`` (an id per position) gives the interval for positions that share their cluster's
    context: the Wilson interval at the effective sample size ``n / deff`` (Kish's design effect,
    the cluster-robust variance of the mean over the plain one). With one position per cluster, or
    a rate of 0 or 1, it is the plain Wilson interval."""
    count, total = int(flags.sum()), int(flags.numel())
    proportion = count / total if total else 0.0
    result: dict[str, Any] = {"rate": proportion, "count": count, "n": total}
    effective = float(total)
    if clusters is not None and 0 < count < total:
        clustered, result["clusters"] = clustered_variance_of_mean(flags, clusters)
        plain = proportion * (1 - proportion) / (total - 1)
        if clustered > 0:
            effective = total * plain / clustered
        result["effective_n"] = effective
    return {**result, "ci95": list(wilson_interval(proportion * effective, effective))}


def paired_difference(values: torch.Tensor, baseline: torch.Tensor,
                      clusters: torch.Tensor | None = None) -> dict[str, Any]:
    """Mean of per-position differences of two columns (0/1 flags or values) with a 95% normal
    interval, over the positions where neither is NaN (NaN: not scored).

    ``clusters`` (an id per position, e.g. its text block) gives the interval the cluster-robust
    standard error (:func:`clustered_variance_of_mean`). With one position per cluster it is the
    plain one."""
    diff = values.double() - baseline.double()
    scored = ~diff.isnan()
    diff = diff[scored]
    mean, n = float(diff.mean()), len(diff)
    result: dict[str, Any] = {"diff": mean, "n": n}
    if clusters is None:
        half = Z_95 * float(diff.std()) / math.sqrt(n) if n > 1 else 0.0
    else:
        variance, result["clusters"] = clustered_variance_of_mean(diff, clusters[scored])
        half = Z_95 * math.sqrt(variance)
    return {**result, "ci95": [mean - half, mean + half]}


def fallback_mask(analysis: Analysis, tau: float | None) -> torch.Tensor:
    """Rows decoding hands to the LM head at threshold ``tau`` (:func:`spellm_ds.model.decoding.falls_back`)."""
    return falls_back(analysis.records.student_entropy, analysis.records.raw_chars, tau)


def fallback_for_agreement(unsure: torch.Tensor, right: torch.Tensor, target: float) -> float:
    """The smallest share of positions whose hand-over to the LM head, the least sure first (highest
    ``unsure``), leaves agreement with the teacher at ``target`` or more, counting every handed-over
    position right (the default recipe's LM head is the teacher's): the fallback a rule that ranks
    positions by ``unsure`` needs. ``right``: the decoded token agrees, per position."""
    wrong = (~right.bool()[unsure.argsort()]).long().cumsum(0)  # the surest decided first
    kept = (wrong / len(right) <= 1 - target).nonzero()
    return 1 - (kept.max().item() + 1 if len(kept) else 0) / len(right)


def correct_flags(analysis: Analysis, variant: str, tau: float | None = None) -> dict[str, torch.Tensor]:
    """Per-position exact / prefix / exact_or_prefix / at5 flags of one decoding variant.

    raw: the argmax string; autocorrect: the spelling of the looked-up or AutoCorrected token;
    autocorrect_fallback (at ``tau``, default the analysis's): the same, except at fallen-back
    positions, where the LM head's token is compared by id: a hit on the teacher's top-1 is exact
    when that token fits in k characters (or has no spelling) and prefix when it is longer, as for
    the char heads; at5 when it is any of the top-5.
    """
    r, table = analysis.records, analysis.table
    predicted = r.raw_chars if variant == "raw" else table.chars[r.autocorrected]
    flags = match_flags(predicted, r.top_ids, table)
    exact, prefix, at5 = flags.exact, flags.prefix, flags.at5
    if variant == "autocorrect_fallback":
        back = fallback_mask(analysis, analysis.tau if tau is None else tau)
        lm_top1 = r.fallback_token == r.top_ids[:, 0]
        longer = table.lengths[r.top_ids[:, 0]] > table.k
        exact = torch.where(back, lm_top1 & ~longer, exact)
        prefix = torch.where(back, lm_top1 & longer, prefix)
        at5 = torch.where(back, (r.fallback_token.unsqueeze(1) == r.top_ids).any(1), at5)
    return {"exact": exact, "prefix": prefix, "exact_or_prefix": exact | prefix, "at5": at5}


def run_cli(description: str, compute: Callable[[Analysis, argparse.Namespace], dict],
            plot: Callable[[dict, Path], None] | None = None,
            extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse the common flags, collect records, compute, write ``--out`` JSON (and a PNG beside it)."""
    parser = cli.ArgumentParser(description)
    add_args(parser)
    parser.add_argument("--out", type=cli.output_file, required=True,
                        help="JSON report path (a PNG is written beside it)")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    out = args.out
    result = compute(collect(args), args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot(result, out.with_suffix(".png"))
    print(json.dumps(result.get("summary", result), indent=2)[:4000])


def new_figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(6 * ncols, 4))


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
