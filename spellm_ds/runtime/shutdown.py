"""Graceful shutdown on SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption).

The first signal only sets a flag; at the next step boundary the ranks agree through an
all-reduce (MAX), so a signal that reached one rank stops all of them at the same step, and the
run saves a checkpoint and exits 0. A second signal exits at once. Copies of the first signal
arriving within ``REPEAT_WINDOW_S`` count as the same request: SLURM signals a whole process tree
and a launcher (torchrun, deepspeed) then forwards the signal it got to its workers again.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 2.0


class GracefulShutdown:
    def __init__(self) -> None:
        self.requested = False
        self._first_at = 0.0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            if time.monotonic() - self._first_at > REPEAT_WINDOW_S:
                os._exit(128 + signum)
            return
        self.requested = True
        self._first_at = time.monotonic()
        print(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step boundary "
              "(send it again to exit now)", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
