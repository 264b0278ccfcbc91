"""Entropy calibration: accuracy against the student's mean head entropy, the fallback threshold
that reaches a target accuracy or a fallback budget, and teacher/student entropy correlation.

Accuracy is exact+prefix match with the teacher's top-1 (AutoCorrect on); with fallback at
threshold t, positions with entropy >= t (or an UNK char) take the LM head's token. Beside each
point: the best accuracy any rule could reach at the same fallback rate (an oracle that knows
which rows the char heads miss), which says whether a better signal or better heads are needed.

    python -m analysis.entropy --model DIR [--data FILE] [--target_accuracy 0.95]
        [--max_fallback_rate 0.1] --out entropy.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from analysis.collect import Analysis
from analysis.common import correct_flags, fallback_mask, new_figure, run_cli, save_figure
from spellm_ds import cli

N_BINS = 10


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = x.argsort()
    sorted_x = x[order]
    rank = torch.empty_like(x, dtype=torch.float64)
    rank[order] = torch.arange(len(x), dtype=torch.float64)
    _, inverse, counts = torch.unique(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, torch.arange(len(x), dtype=torch.float64))
    rank[order] = (sums / counts)[inverse]
    return rank


def best_possible_accuracy(char_ok: torch.Tensor, lm_ok: torch.Tensor, fallback_rate: float) -> float:
    """The accuracy of an oracle that falls back the same share of rows, picking first those the
    LM head gets right and the char heads wrong: the ceiling of any fallback signal at that rate."""
    n = len(char_ok)
    budget = round(fallback_rate * n)
    gains = int((~char_ok & lm_ok).sum())
    forced_losses = max(0, budget - (n - int((char_ok & ~lm_ok).sum())))
    return (int(char_ok.sum()) + min(budget, gains) - forced_losses) / n


def tradeoff(analysis: Analysis, thresholds: list[float]) -> list[dict]:
    """Exact+prefix match with AutoCorrect + fallback, the fallback rate, and the best any signal
    could reach at that rate (:func:`best_possible_accuracy`), at each threshold."""
    char_ok = correct_flags(analysis, "autocorrect")["exact_or_prefix"]
    lm_ok = correct_flags(analysis, "autocorrect_fallback", 0.0)["exact_or_prefix"]
    points = []
    for t in thresholds:
        rate = fallback_mask(analysis, t).double().mean().item()
        points.append({"tau": t, "fallback_rate": rate,
                       "accuracy": correct_flags(analysis, "autocorrect_fallback", t)["exact_or_prefix"].double().mean().item(),
                       "best_possible_accuracy": best_possible_accuracy(char_ok, lm_ok, rate)})
    return points


def compute(analysis: Analysis, args: argparse.Namespace | None = None) -> dict:
    r = analysis.records
    entropy = r.student_entropy
    char_ok = correct_flags(analysis, "autocorrect")["exact_or_prefix"]
    edges = torch.quantile(entropy.double(), torch.linspace(0, 1, N_BINS + 1, dtype=torch.float64)).tolist()
    bins = []
    for i, (low, high) in enumerate(zip(edges, edges[1:])):
        inside = (entropy >= low) & ((entropy < high) if i < N_BINS - 1 else (entropy <= high))
        bins.append({"entropy": [low, high], "n": int(inside.sum()),
                     "accuracy": char_ok[inside].float().mean().item() if inside.any() else None})
    # Candidate thresholds: observed entropies at every percentile (the curve only moves there).
    observed = torch.quantile(entropy.double(), torch.linspace(0, 1, 101, dtype=torch.float64), interpolation="lower")
    curve = tradeoff(analysis, sorted(set(observed.tolist())) + [float("inf")])
    target = getattr(args, "target_accuracy", None)
    budget = getattr(args, "max_fallback_rate", None)
    reaching = [p for p in curve if target is not None and p["accuracy"] >= target]
    within = [p for p in curve if budget is not None and p["fallback_rate"] <= budget]
    return {
        "bins": bins,
        "tradeoff": curve,
        "at_tau": tradeoff(analysis, [analysis.tau])[0],
        "threshold_for_target_accuracy": max(reaching, key=lambda p: p["tau"]) if reaching else None,
        "threshold_for_fallback_budget": max(within, key=lambda p: (p["accuracy"], p["tau"])) if within else None,
        "target_accuracy": target, "max_fallback_rate": budget,
        "pearson_teacher_student": pearson(r.teacher_entropy, entropy),
        "spearman_teacher_student": pearson(ranks(r.teacher_entropy), ranks(entropy)),
        "summary": {"pearson": pearson(r.teacher_entropy, entropy),
                    "spearman": pearson(ranks(r.teacher_entropy), ranks(entropy))},
    }


def plot(result: dict, path: Path) -> None:
    fig, (left, right) = new_figure(2)
    bins = [b for b in result["bins"] if b["accuracy"] is not None]
    left.plot([(b["entropy"][0] + b["entropy"][1]) / 2 for b in bins], [100 * b["accuracy"] for b in bins], "o-")
    left.set_xlabel("student mean head entropy (nats), decile bins")
    left.set_ylabel("exact+prefix match (%)")
    left.set_title("Accuracy vs entropy")
    curve = result["tradeoff"]
    right.plot([100 * p["fallback_rate"] for p in curve], [100 * p["accuracy"] for p in curve], "-",
               label="entropy threshold")
    right.plot([100 * p["fallback_rate"] for p in curve], [100 * p["best_possible_accuracy"] for p in curve], "--",
               label="best possible rule")
    right.plot([100 * result["at_tau"]["fallback_rate"]], [100 * result["at_tau"]["accuracy"]], "ro",
               label=f"tau={result['at_tau']['tau']}")
    right.set_xlabel("fallback rate (%)")
    right.set_ylabel("accuracy with fallback (%)")
    right.set_title("Accuracy / fallback trade-off")
    right.legend()
    save_figure(fig, path)


def extra_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target_accuracy", type=cli.probability, default=0.95,
                        help="the largest tau whose exact match reaches this (default: %(default)s)")
    parser.add_argument("--max_fallback_rate", type=cli.fraction, default=0.10,
                        help="the smallest tau whose fallback rate stays within this (default: %(default)s)")


if __name__ == "__main__":
    cli.run(lambda: run_cli(__doc__, compute, plot, extra_args))
