"""TensorBoard curves of a distillation run as one PNG (losses, held-out match, speed) plus a JSON summary.

    python -m analysis.training_curves --logdir OUTPUT_DIR/tensorboard --out docs/curves.png
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from analysis.common import new_figure, save_figure
from spellm_ds import cli
from spellm_ds.errors import SpellmError


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        raise SpellmError(f"{logdir} does not exist; pass a run's tensorboard/ directory with --logdir")
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def summary(scalars: dict[str, list[tuple[int, float]]]) -> dict:
    def median(tag: str, skip: int = 2) -> float | None:
        values = [v for s, v in scalars.get(tag, []) if s > skip]
        return statistics.median(values) if values else None

    held_out = scalars.get("eval/match/exact_or_prefix", [])
    return {
        "steps": max((s for s, _ in scalars.get("loss/total", [])), default=0),
        "held_out_exact_or_prefix": {str(s): v for s, v in held_out},
        "held_out_at5": {str(s): v for s, v in scalars.get("eval/match/at5", [])},
        "median_step_s": median("perf/step_s"), "median_tokens_per_s_per_rank": median("perf/tokens_per_s"),
        "median_teacher_s": median("perf/teacher_s"), "median_student_s": median("perf/student_s"),
        "max_rss_gb_rank0": max((v for _, v in scalars.get("mem/rss_gb", [])), default=None),
        "final_loss": scalars["loss/total"][-1][1] if scalars.get("loss/total") else None,
    }


def plot(scalars: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig, axes = new_figure(3)
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
    save_figure(fig, path)


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--out", required=True, help="PNG path (a JSON summary is written beside it)")
    args = parser.parse_args()
    scalars = read_scalars(Path(args.logdir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(scalars, out)
    result = summary(scalars)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
