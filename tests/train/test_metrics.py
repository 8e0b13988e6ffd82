"""MetricsWriter writes TensorBoard records that decode back to the values, and a JSONL mirror; the RL
report reads the mirror back."""

import glob
import json
import math
import struct

from tensorboardX.proto import event_pb2

from aepo_jax.train.metrics import (CompilationCounter, MetricsWriter, progress_line, read_metrics, rl_report,
                                   sparkline)


def _read_events(path):
    """Decodes a TFRecord file: [u64 length][u32 crc][payload][u32 crc] per record."""
    data = open(path, "rb").read()
    events, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12:pos + 12 + length])
        events.append(event)
        pos += 12 + length + 4
    return events


def test_scalars_round_trip(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"reward/mean": 0.25, "entropy": 1.5})
    writer.write(2, {"reward/mean": 0.5, "loss": float("nan")})
    writer.close()
    (events_file,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    scalars = [(e.step, v.tag, v.simple_value) for e in _read_events(events_file) for v in e.summary.value]
    assert (1, "reward/mean", 0.25) in scalars and (2, "reward/mean", 0.5) in scalars
    assert (1, "entropy", 1.5) in scalars
    assert any(step == 2 and tag == "loss" and math.isnan(v) for step, tag, v in scalars)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "entropy": 1.5, "reward/mean": 0.25}, {"step": 2, "loss": None, "reward/mean": 0.5}]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "off", enabled=False)
    writer.write(1, {"a": 1.0})
    writer.close()
    assert not (tmp_path / "off").exists()


def test_progress_line():
    metrics = {"reward/mean": 0.4123, "entropy": 1.23456, "other": 3}
    line = progress_line(12, 100, metrics, {"reward": "reward/mean", "entropy": "entropy", "absent": "x"})
    assert line == "[ 12/100  12%] reward 0.4123 | entropy 1.235"


def test_compilation_counter_counts_new_shapes_only():
    import jax
    import jax.numpy as jnp
    counter = CompilationCounter()
    try:
        f = jax.jit(lambda x: x * 2 + 1)
        f(jnp.ones(3)).block_until_ready()
        assert counter.take() >= 1
        f(jnp.zeros(3)).block_until_ready()
        assert counter.take() == 0
        f(jnp.ones(5)).block_until_ready()
        assert counter.take() >= 1
    finally:
        counter.close()


def test_sparkline_scales_min_to_max():
    assert sparkline([0.0, 1.0, None, 0.5, float("nan"), 0.25]) == "▁█·▅·▃"  # 0.5 * 7 = 3.5 -> 4
    assert sparkline([2.0, 2.0]) == "▁▁" and sparkline([]) == ""


def test_rl_report_from_a_resumed_metrics_file(tmp_path):
    """Steps merge per step and a step written again after a resume keeps its later values; the report
    counts RL steps from the step RL began at (after 100 SFT steps here)."""
    writer = MetricsWriter(tmp_path)
    writer.write(100, {"sft/loss": 0.2})
    writer.write(100, {"rl/eval/pass@1": 0.25, "rl/eval/pass@4": 0.5, "rl/eval/tool_calls_per_traj": 1.0})
    for step, reward in ((101, -0.5), (102, 9.0)):  # step 102 is cut short by a crash ...
        writer.write(step, {"rl/reward/mean": reward, "rl/accuracy": 0.1, "rl/entropy": 0.3,
                            "rl/rollout/tool_calls_per_traj": 1.0})
    for step, reward in ((102, 0.0), (103, 0.5)):  # ... and redone after the resume from step 101
        writer.write(step, {"rl/reward/mean": reward, "rl/accuracy": 0.2, "rl/entropy": 0.3,
                            "rl/rollout/tool_calls_per_traj": 2.0})
    writer.write(103, {"rl/eval/pass@1": 0.5, "rl/eval/pass@4": 0.75, "rl/eval/tool_calls_per_traj": 2.0})
    writer.close()
    steps = read_metrics(tmp_path / "metrics.jsonl")
    assert list(steps) == [100, 101, 102, 103] and steps[102]["rl/reward/mean"] == 0.0
    assert steps[100] == {"sft/loss": 0.2, "rl/eval/pass@1": 0.25, "rl/eval/pass@4": 0.5,
                          "rl/eval/tool_calls_per_traj": 1.0}
    lines = rl_report(steps, rl_step0=100).splitlines()
    assert lines[1].split() == ["RL", "step", "pass@1", "pass@4", "tool", "calls"]
    assert lines[2].split() == ["0", "0.250", "0.500", "1.00"] and lines[3].split() == ["3", "0.500", "0.750", "2.00"]
    assert "pass@1 0.250 -> 0.500 (+0.250) from RL step 0 to 3" in lines[4]
    assert "per RL step, 1..3" in lines[5]
    assert lines[6].split() == ["reward", "▁▅█", "-0.5", "..", "0.5"]
    assert lines[9].split() == ["tool", "calls", "▁██", "1", "..", "2"]
    assert rl_report({5: {"sft/loss": 1.0}}, rl_step0=5) == "RL report: no RL steps logged"
    k1 = rl_report({0: {"rl/eval/pass@1": 0.5}, 1: {"rl/reward/mean": 1.0}}).splitlines()  # --eval_k=1
    assert k1[1].split() == ["RL", "step", "pass@1", "tool", "calls"] and k1[2].split() == ["0", "0.500", "nan"]
