"""Training metrics: TensorBoard event files (through tensorboardX, no TensorFlow) and a JSONL mirror.

Both go to the same log directory: `events.out.tfevents.*` for TensorBoard and `metrics.jsonl` (one
{"step": s, name: value, ...} object per write) for scripts and notebooks. Non-finite values are written as
they are (TensorBoard shows them; JSON gets null), never dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    """Writes scalar metrics per step; `enabled=False` (non-zero processes) writes nothing."""

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        if enabled:
            os.makedirs(self.logdir, exist_ok=True)
            self._tb = SummaryWriter(self.logdir)
            self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in sorted(metrics.items()):
            value = float(value)
            self._tb.add_scalar(name, value, global_step=int(step))
            row[name] = value if math.isfinite(value) else None
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def progress_line(step: int, total: int, metrics: Mapping[str, float], labels: Mapping[str, str]) -> str:
    """`[ 12/100  12%] reward 0.412 | entropy 1.23 | ...` for the metrics (label -> key) that are present."""
    width = len(str(total))
    parts = [f"{label} {metrics[key]:.4g}" for label, key in labels.items() if key in metrics]
    return f"[{step:>{width}}/{total} {step / max(total, 1):4.0%}] " + " | ".join(parts)


class CompilationCounter:
    """Counts XLA compilations (jax.monitoring's backend-compile event); `take()` returns and resets the
    count. After warm-up a step should compile nothing; a non-zero count shows shapes that still vary."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self._count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, *args, **kwargs):
        if name == self.EVENT:
            self._count += 1

    def take(self) -> int:
        count, self._count = self._count, 0
        return count

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)
