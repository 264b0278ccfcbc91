"""Which precision a run computes in: bf16 only where the hardware makes it fast.

"Supported" is not "fast": oneDNN runs bf16 on any AVX-512 CPU by emulation, and on an Intel Xeon
without ``avx512_bf16`` a 1024x576 @ 576x1536 matmul took 2.8x longer in bf16 than in fp32 (the
reference's first-pass step 5.8 s against 2.3 s). So bf16 is chosen where the CPU has
``avx512_bf16`` or AMX, where the GPU computes it natively, or, for a CPU that emulates it, where a
short matmul probe finds it faster; fp32 everywhere else. The user can force either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags of native bf16 arithmetic (Linux ``/proc/cpuinfo`` names)."""
PRECISIONS = ("auto", "bf16", "fp32")
PROBE_SHAPE = (1024, 576, 1536)
"""The probe's matmul (m, k, n): a SmolLM2-sized FFN over four 256-token blocks."""


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self) -> str:
        return f"{'bf16' if self.bf16 else 'fp32'} ({self.reason})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where ``/proc/cpuinfo`` is not there."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def bf16_speedup(repeats: int = 5) -> float:
    """fp32 time over bf16 time of :data:`PROBE_SHAPE`'s matmul on the CPU, medians of ``repeats``."""
    m, k, n = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)

    def seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    return seconds(torch.float32) / seconds(torch.bfloat16)


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(requested: str, model_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype to run a model in: ``requested``, or for ``auto`` the model's own where the device
    computes it fast (a bf16 model on a CPU that only emulates bf16 runs in fp32), else fp32."""
    if requested != "auto":
        return INFERENCE_DTYPES[requested]
    if model_dtype == torch.float32 or device_type == "cuda":
        return model_dtype
    return model_dtype if choose(device_type).bf16 else torch.float32


def choose(device_type: str, requested: str = "auto") -> Precision:
    """The precision on a ``device_type`` (``cpu``, ``cuda``) accelerator, and why."""
    if requested != "auto":
        return Precision(requested == "bf16", f"--precision {requested}")
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        native = torch.cuda.is_bf16_supported()
        return Precision(native, f"GPU compute capability {major}.{minor} {'computes' if native else 'lacks'} bf16")
    if device_type != "cpu":
        return Precision(False, f"{device_type} accelerator: bf16 not assumed fast")
    native = cpu_flags() & set(BF16_CPU_FLAGS)
    if native:
        return Precision(True, f"the CPU has {', '.join(sorted(native))}")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Precision(False, f"the CPU has no bf16 path ({', '.join(BF16_CPU_FLAGS)} absent)")
    speedup = bf16_speedup()
    return Precision(speedup > 1.1, f"the CPU emulates bf16 ({', '.join(BF16_CPU_FLAGS)} absent); a bf16 matmul "
                                    f"ran {speedup:.2f}x fp32's speed")
