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


_BARS = "▁▂▃▄▅▆▇█"
REPORT_CURVES = {"reward": "rl/reward/mean", "accuracy": "rl/accuracy", "entropy": "rl/entropy",
                 "tool calls": "rl/rollout/tool_calls_per_traj"}


def read_metrics(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """step -> {name: value} from a `metrics.jsonl`, rows of one step merged; a step written again (a resumed
    run repeats the steps after its last checkpoint) takes the later values."""
    steps: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            steps.setdefault(row.pop("step"), {}).update(row)
    return dict(sorted(steps.items()))


def sparkline(values) -> str:
    """One bar per value, scaled from the series' minimum (▁) to its maximum (█); missing values are '·'."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    scale = (len(_BARS) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join("·" if v is None or not math.isfinite(v) else _BARS[round((v - lo) * scale)]
                   for v in values)


def rl_report(steps: Mapping[int, Mapping[str, float]], rl_step0: int = 0) -> str:
    """The text report of an RL run (from `read_metrics`; `rl_step0` is the logged step of RL step 0, which
    follows the SFT steps of an sft_then_rl run): held-out pass@1 / pass@k / tool calls at every evaluation
    and the change of pass@1, then the per-step curves of reward, accuracy, entropy and tool calls."""
    evals = [(s - rl_step0, m) for s, m in steps.items() if s >= rl_step0 and "rl/eval/pass@1" in m]
    rl_steps = [s for s, m in steps.items() if s > rl_step0 and "rl/reward/mean" in m]
    if not rl_steps:
        return "RL report: no RL steps logged"
    lines = ["RL report (held-out evaluation; RL step 0 is the model RL started from)"]
    if evals:
        names = ["pass@1"] + [k[len("rl/eval/"):] for k in evals[0][1]
                              if k.startswith("rl/eval/pass@") and k != "rl/eval/pass@1"]  # pass@k if k > 1
        lines.append(f"  {'RL step':>8}" + "".join(f"  {n:>7}" for n in names) + f"  {'tool calls':>10}")
        for s, m in evals:
            lines.append(f"  {s:>8}" + "".join(f"  {m[f'rl/eval/{n}']:>7.3f}" for n in names)
                         + f"  {m.get('rl/eval/tool_calls_per_traj', float('nan')):>10.2f}")
        (s0, first), (s1, last) = evals[0], evals[-1]
        if s1 > s0:
            lines.append(f"  pass@1 {first['rl/eval/pass@1']:.3f} -> {last['rl/eval/pass@1']:.3f} "
                         f"({last['rl/eval/pass@1'] - first['rl/eval/pass@1']:+.3f}) from RL step {s0} to {s1}")
    lines.append(f"  per RL step, {rl_steps[0] - rl_step0}..{rl_steps[-1] - rl_step0} (min .. max):")
    for label, key in REPORT_CURVES.items():
        values = [steps[s].get(key) for s in rl_steps]
        finite = [v for v in values if v is not None]
        span = f"{min(finite):.3g} .. {max(finite):.3g}" if finite else "n/a"
        lines.append(f"  {label:>10}  {sparkline(values)}  {span}")
    return "\n".join(lines)


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
