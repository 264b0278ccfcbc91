"""TensorBoard curves of a distillation run as one PNG (losses, held-out match, speed) plus a JSON summary.

    python -m analysis.training_curves --logdir OUTPUT_DIR/tensorboard --out docs/curves.png

The summary also fits the held-out exact+prefix match against log2(tokens trained) and says how
many tokens the fit puts at given match levels. Match curves bend over as they approach their
ceiling, so a straight line in log tokens is an optimistic guide: a lower bound on the tokens needed.
The fit takes the evaluations of the first pass over the training blocks only (all of them in a run
that reads no block twice): later passes add no new text, so they are a different curve. With
``--fit_from STEP`` it takes the evaluations from that step on instead, later passes included: the
curve of passes over the same text, for runs that read their corpus several times.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from analysis.common import new_figure, save_figure
from spellm_ds import cli
from spellm_ds.errors import SpellmError


def load_events(logdir: Path):
    """Every scalar event of a run's TensorBoard log (step, value and wall time), none sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        raise SpellmError(f"{logdir} does not exist; pass a run's tensorboard/ directory with --logdir")
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    events = load_events(logdir)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def summary(scalars: dict[str, list[tuple[int, float]]], step_tokens: int | None,
            first_pass_steps: int | None, fit_from: int | None = None) -> dict:
    """Steps, held-out match, medians of the speed tags, and the match-vs-log2(tokens) fit: over
    the first pass, or over the evaluations from step ``fit_from`` on (later passes included)."""
    def median(tag: str, skip: int = 2) -> float | None:
        values = [v for s, v in scalars.get(tag, []) if s > skip]
        return statistics.median(values) if values else None

    held_out = scalars.get("eval/match/exact_or_prefix", [])
    span = {"first_step": fit_from} if fit_from else {"last_step": first_pass_steps}
    return {
        "steps": max((s for s, _ in scalars.get("loss/total", [])), default=0),
        "held_out_exact_or_prefix": {str(s): v for s, v in held_out},
        "held_out_at5": {str(s): v for s, v in scalars.get("eval/match/at5", [])},
        "median_step_s": median("perf/step_s"), "median_tokens_per_s_per_rank": median("perf/tokens_per_s"),
        "median_teacher_s": median("perf/teacher_s"), "median_student_s": median("perf/student_s"),
        "max_rss_gb_rank0": max((v for _, v in scalars.get("mem/rss_gb", [])), default=None),
        "final_loss": scalars["loss/total"][-1][1] if scalars.get("loss/total") else None,
        "tokens_per_step": step_tokens, "first_pass_steps": first_pass_steps, "fit_from": fit_from,
        "held_out_vs_log2_tokens": log_token_fit(held_out, step_tokens, **span) if step_tokens else None,
    }


def run_shape(logdir: Path) -> tuple[int | None, int | None]:
    """Global tokens per optimizer step, and the steps of the first pass over the training blocks
    (None where the run_config.json beside the run's tensorboard/ does not say), from that file."""
    config_path = logdir.parent / "run_config.json"
    if not config_path.is_file():
        return None, None
    config = json.loads(config_path.read_text())
    run = config["run"]
    blocks_per_step = run["micro_batch"] * run["grad_accum"] * config["world_size"]
    blocks = config.get("packed_train_blocks", run.get("train_blocks"))  # older runs: the flag
    return run["seq_len"] * blocks_per_step, (math.ceil(blocks / blocks_per_step) if blocks else None)


def log_token_fit(held_out: list[tuple[int, float]], step_tokens: int, last_step: int | None = None,
                  first_step: int = 1, levels: tuple[float, ...] = (0.8, 0.95)) -> dict | None:
    """Least-squares line of match against log2(tokens) over the evaluations from ``first_step``
    (after step 0) up to ``last_step``, and the tokens at which the line reaches each level (None
    where it does not rise)."""
    fitted = [(step, value) for step, value in held_out if max(first_step, 1) <= step <= (last_step or step)]
    if len(fitted) < 3:
        return None
    slope, intercept = statistics.linear_regression([math.log2(step * step_tokens) for step, _ in fitted],
                                                    [value for _, value in fitted])
    reach = {f"{level:.2f}": (2 ** ((level - intercept) / slope) if slope > 0 else None) for level in levels}
    return {"points": len(fitted), "first_step": fitted[0][0], "last_step": fitted[-1][0], "per_doubling": slope,
            "intercept": intercept, "tokens_to_reach": reach}


def plot(scalars: dict[str, list[tuple[int, float]]], path: Path, result: dict) -> None:
    fig, axes = new_figure(4 if result["held_out_vs_log2_tokens"] else 3)
    for tag in ("loss/total", "loss/char", "loss/token"):
        if tag in scalars:
            axes[0].plot(*zip(*scalars[tag]), label=tag.split("/")[1], linewidth=0.8)
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    axes[0].legend()
    for tag, label in (("match/exact_or_prefix", "train exact+prefix"), ("eval/match/exact_or_prefix",
                                                                         "held-out exact+prefix"),
                       ("eval/match/at5", "held-out match@5")):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            axes[1].plot(steps, [100 * v for v in values], "o-" if tag.startswith("eval") else "-", label=label,
                         linewidth=0.8)
    axes[1].set_title("match with the teacher (%)")
    axes[1].set_xlabel("step")
    axes[1].legend()
    for tag in ("perf/teacher_s", "perf/student_s"):
        if tag in scalars:
            axes[2].plot(*zip(*scalars[tag]), label=tag.split("/")[1], linewidth=0.8)
    axes[2].set_title("time per step (s)")
    axes[2].set_xlabel("step")
    axes[2].legend()
    if result["held_out_vs_log2_tokens"]:
        plot_log_token_fit(axes[3], scalars, result)
    save_figure(fig, path)


def plot_log_token_fit(axis, scalars: dict[str, list[tuple[int, float]]], result: dict) -> None:
    """Held-out match against tokens trained (log scale) with the fitted line carried to 80%
    (at most 64x the tokens it fits), and where the first pass over the training blocks ends."""
    step_tokens, fit = result["tokens_per_step"], result["held_out_vs_log2_tokens"]
    for tag, label in (("eval/match/exact_or_prefix", "held-out exact+prefix"), ("eval/match/at5", "held-out match@5")):
        points = [(step * step_tokens, 100 * value) for step, value in scalars.get(tag, []) if step > 0]
        if points:
            axis.plot(*zip(*points), "o", label=label, markersize=3)
    first = fit["first_step"] * step_tokens
    fitted_tokens = fit["last_step"] * step_tokens
    reach = fit["tokens_to_reach"]["0.80"]
    last = min(reach, 64 * fitted_tokens) if reach else fitted_tokens
    slope, at_one = fit["per_doubling"], fit["intercept"]
    span = f"fit from step {result['fit_from']}" if result["fit_from"] else "fit"
    axis.plot([first, last], [100 * (at_one + slope * math.log2(t)) for t in (first, last)], "--",
              label=f"{span}: {100 * slope:+.1f} points per doubling", linewidth=0.8)
    if result["first_pass_steps"] and result["first_pass_steps"] < result["steps"]:
        axis.axvline(result["first_pass_steps"] * step_tokens, color="grey", linewidth=0.8,
                     label="end of the first pass")
    axis.set_xscale("log", base=2)
    axis.set_title("held-out match vs tokens trained (%)")
    axis.set_xlabel("tokens")
    axis.legend()


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", type=cli.output_file, required=True,
                        help="PNG path (a JSON summary is written beside it)")
    parser.add_argument("--fit_from", type=cli.positive_int, default=None, metavar="STEP",
                        help="fit the evaluations from this step on, later passes included (default: the first pass)")
    args = parser.parse_args()
    logdir = Path(args.logdir)
    scalars = read_scalars(logdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = summary(scalars, *run_shape(logdir), fit_from=args.fit_from)
    plot(scalars, out, result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
