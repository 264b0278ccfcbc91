"""Progress a person can read, in a terminal and in a log file.

One status per update: the step, the phase (the first pass runs the teacher; with a teacher
cache the passes after it read it and run about ten times faster, so each phase has its own
ETA), tokens/s summed over the ranks, the loss and the training exact match. In a terminal it
is a bar redrawn in place; in a file (SLURM logs, ``nohup``) a line every ``LOG_EVERY_S`` seconds
and at each phase's end, so the log stays short lines. Evaluations and checkpoints get a line
of their own (:meth:`Progress.note`).
"""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 60.0


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """The run's status on rank 0 (``enabled``); other ranks print nothing."""

    def __init__(self, total: int, start: int, phases: list[tuple[str, int]], enabled: bool) -> None:
        """``phases``: (name, first step after it) in order, the last ending at ``total``."""
        self.total, self.phases, self.enabled = total, phases, enabled
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = None
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, desc="distill", file=sys.stderr)
        self.phase_started = {name: None for name, _ in phases}
        self.last_line = time.monotonic()

    def phase(self, step: int) -> tuple[str, int]:
        """The phase ``step`` is in and the step it ends at."""
        return next(((name, end) for name, end in self.phases if step < end), self.phases[-1])

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """After step ``step`` (1-based)."""
        if not self.enabled:
            return
        name, end = self.phase(step - 1)
        now = time.monotonic()
        if self.phase_started[name] is None:
            self.phase_started[name] = (now - metrics["perf/step_s"], step - 1)
        started, first = self.phase_started[name]
        eta = (now - started) / max(step - first, 1) * (end - step)
        status = (f"{name} {duration(eta)} left, {metrics['perf/tokens_per_s_all']:.0f} tok/s, "
                  f"loss {metrics['loss/total']:.3f}, exact {metrics['match/exact_or_prefix']:.2f}")
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update()
        elif now - self.last_line >= LOG_EVERY_S or step == end or step == self.total:
            self.last_line = now
            print(f"step {step}/{self.total}: {status}", flush=True)

    def note(self, line: str) -> None:
        """A line of its own (an evaluation, a checkpoint), above the bar in a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
