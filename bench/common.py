"""Shared benchmark plumbing: hardware description, timing, JSON output to bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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

        info.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def median_seconds(fn: Callable[[], Any], min_run_time: float) -> float:
    """Median wall time of ``fn`` (torch.utils.benchmark handles warm-up and repetition)."""
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def interleaved_medians(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Run every variant once per round, ``repeats`` rounds, after one warm-up round; medians.

    Interleaving spreads slow drifts of the machine (other load, thermal) over all variants.
    """
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def commit() -> str:
    """The commit measured (``-dirty`` when the tree has uncommitted changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write(name: str, settings: dict[str, Any], results: Any, out: str | None = None) -> Path:
    """The result document at ``out``, or at a new dated file under bench/results/ (never over an old one)."""
    path = Path(out) if out else RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "hardware": hardware(), "settings": settings, "results": results,
                "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2))
    print(f"written {path}")
    return path
