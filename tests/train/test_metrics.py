"""MetricsWriter writes TensorBoard records that decode back to the values, and a JSONL mirror."""

import glob
import json
import math
import struct

from tensorboardX.proto import event_pb2

from aepo_jax.train.metrics import CompilationCounter, MetricsWriter, progress_line


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
