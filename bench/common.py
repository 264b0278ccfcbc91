"""Shared benchmark plumbing: hardware description, timing, JSON output to bench/results/."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from spellm_ds.errors import SpellmError
from spellm_ds.runtime.distributed import free_port
from spellm_ds.runtime.provenance import commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import deepspeed
        import transformers

        from spellm_ds.runtime import precision

        info.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__,
                    precision_auto=precision.choose("cuda" if torch.cuda.is_available() else "cpu").describe())
    except ImportError:
        pass
    return info


def add_dtypes_arg(parser) -> None:
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=None,
                        help="dtypes to time (default: fp32, and bf16 where the hardware computes it fast: "
                             "spellm_ds.runtime.precision)")


def dtypes_to_time(requested: list[str] | None) -> list[torch.dtype]:
    """``--dtypes``, or fp32 plus bf16 where it is fast (timing emulated bf16 measures the emulation)."""
    from spellm_ds.runtime import precision

    if requested is None:
        fast = precision.choose("cuda" if torch.cuda.is_available() else "cpu").bf16
        requested = ["fp32", "bf16"] if fast else ["fp32"]
    return [torch.bfloat16 if name == "bf16" else torch.float32 for name in requested]


def add_threads_arg(parser) -> None:
    from spellm_ds.cli import positive_int

    parser.add_argument("--threads", type=positive_int, default=os.cpu_count(),
                        help="torch threads for every timed variant (default: the cores, %(default)s)")


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median wall time of ``fn`` at the process's torch thread count (torch.utils.benchmark handles
    warm-up and repetition; its Timer would otherwise run on 1 thread)."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_times(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Wall times of every variant, run once per round for ``rounds`` rounds after one warm-up round.

    Interleaving spreads slow drifts of the machine (other load, thermal) over all variants.
    """
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def median_interval(values: list[float], confidence: float = 0.95) -> dict[str, float]:
    """The median and a distribution-free interval for it: the order statistics x(j), x(n+1-j) with
    the largest j whose coverage, 1 - 2 P(Binomial(n, 1/2) < j), is at least ``confidence``.
    Below 6 values no pair reaches 95%: the interval is then the full range, its coverage recorded."""
    ordered, n = sorted(values), len(values)

    def coverage(j: int) -> float:  # of [ordered[j], ordered[n - 1 - j]]
        return 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2 ** n

    j = 0
    while j + 1 < n - 1 - (j + 1) and coverage(j + 1) >= confidence:
        j += 1
    return {"median": statistics.median(ordered), "low": ordered[j], "high": ordered[n - 1 - j],
            "coverage": coverage(j)}


def write(name: str, settings: dict[str, Any], results: Any, out: Path | None = None) -> Path:
    """The result document at ``out``, or at a new dated file under bench/results/ (never over an old one)."""
    path = Path(out) if out else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "hardware": hardware(), "settings": settings, "results": results,
                "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))
    print(f"written {path}")
    return path


def distill_job(name: str, out: Path, ranks: int, flags: list[str], threads: int = 1):
    """One real ``launch/distill.py`` job on ``ranks`` local ranks (torchrun, ``threads`` threads
    each) writing to ``out``: its stdout and its TensorBoard scalars (an ``EventAccumulator``:
    ``.Scalars(tag)``). A failed job raises with the last line of its stderr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launch" / "distill.py"),
               "--output_dir", str(out), "--resume", "none", "--save_every", "0", *flags]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if result.returncode != 0:
        raise SpellmError(f"the {name} job failed: {result.stderr.strip().splitlines()[-1:]}")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return result.stdout, events
