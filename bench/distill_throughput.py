"""Distillation step throughput: naive (two full forwards) against the shared trunk.

    python -m bench.distill_throughput [--steps 8] [--quick] [--out FILE]

Runs the real job (torchrun, 2 ranks, ds_configs/zero3.json, SmolLM2-135M on the default corpus,
the default seq_len and micro batch) once with --no_shared_trunk and once with the shared trunk,
and reports the median over steps after the first two of tokens/s per rank and of the teacher /
student (forward + backward) / backward time split, from the runs' TensorBoard scalars.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write
from spellm_ds import cli

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("perf/tokens_per_s", "perf/step_s", "perf/teacher_s", "perf/student_s", "perf/backward_s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workdir: Path, name: str, extra: list[str], steps: int) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = workdir / name
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(ROOT / "launch" / "distill.py"), "--output_dir", str(out),
               "--max_steps", str(steps), "--save_every", "0", "--eval_every", "100000", "--eval_blocks", "2",
               "--resume", "none", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{result.stderr[-3000:]}")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    medians = {}
    for tag in TAGS:
        values = [e.value for e in events.Scalars(tag) if e.step > 2] or [e.value for e in events.Scalars(tag)]
        medians[tag.removeprefix("perf/")] = statistics.median(values)
    return medians


def main() -> None:
    parser = cli.ArgumentParser(__doc__)
    parser.add_argument("--steps", type=cli.positive_int, default=8)
    parser.add_argument("--quick", action="store_true", help="a tiny model and 3 steps, for CI")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    extra: list[str] = []
    if args.quick:
        sys.path.insert(0, str(ROOT))
        from tests import tiny

        model_dir, data = tiny.tiny_setup(workdir, n_texts=60)
        extra = ["--model", str(model_dir), "--data", str(data),
                 "--trainable_layers", "2", "--seq_len", "32", "--k", "6"]
        args.steps = 3
    results = {"naive": run(workdir, "naive", [*extra, "--no_shared_trunk"], args.steps),
               "shared_trunk": run(workdir, "shared", extra, args.steps)}
    results["speedup_tokens_per_s"] = (results["shared_trunk"]["tokens_per_s"] / results["naive"]["tokens_per_s"])
    write("distill_throughput" + ("_quick" if args.quick else ""),
          {"ranks": 2, "launcher": "torchrun", "deepspeed_config": "ds_configs/zero3.json", "steps": args.steps,
           "model": "tiny" if args.quick else "smollm2-135m", "extra_flags": extra,
           "omp_threads_per_rank": os.environ.get("OMP_NUM_THREADS", "1")}, results, args.out)


if __name__ == "__main__":
    cli.run(main)
