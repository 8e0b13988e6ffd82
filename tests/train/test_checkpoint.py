"""Checkpointer: round trip, keep-last-N, and fallback past truncated / corrupt / half-written steps."""

import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.train.checkpoint import Checkpointer, abstract_like, fingerprint


def _state(step):
    rng = np.random.default_rng(step)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                       "b": jnp.asarray(rng.normal(size=(32,)), jnp.bfloat16)},
            "rng": jax.random.key_data(jax.random.key(step)),
            "step": jnp.asarray(step, jnp.int32)}


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(tmp_path, steps, keep=3):
    ckpt = Checkpointer(tmp_path, keep=keep)
    for step in steps:
        ckpt.save(step, _state(step), {"data_position": step * 10})
    ckpt.wait()
    return ckpt


def test_round_trip_and_keep_last_n(tmp_path):
    ckpt = _save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    assert ckpt.steps() == [3, 4]
    step, state, meta = ckpt.restore_latest(abstract_like(_state(0)))
    assert step == 4 and meta == {"data_position": 40}
    _assert_same(state, _state(4))
    ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
    assert Checkpointer(tmp_path).restore_latest(abstract_like(_state(0))) is None


def _array_files(step_dir):
    return [p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_array_file"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage, caplog):
    _save_steps(tmp_path, [1, 2]).close()
    step_dir = tmp_path / "2"
    if damage == "truncate":
        for f in _array_files(step_dir):
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif damage == "flip_byte":
        biggest = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
        data = bytearray(biggest.read_bytes())
        data[len(data) // 2] ^= 0x40
        biggest.write_bytes(bytes(data))
    else:
        for f in _array_files(step_dir):
            os.remove(f)
    with caplog.at_level(logging.WARNING):
        restored = Checkpointer(tmp_path).restore_latest(abstract_like(_state(0)))
    assert restored is not None and restored[0] == 1
    _assert_same(restored[1], _state(1))
    assert str(step_dir) in caplog.text


def test_fingerprint_sees_a_single_bit_and_ignores_sharding():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)
    flipped = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, jnp.uint32).at[3, 5].add(1), jnp.float32)
    assert int(fingerprint([x])[0]) != int(fingerprint([flipped])[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert int(fingerprint([sharded])[0]) == int(fingerprint([x])[0])
    expected = int(np.asarray(x).view(np.uint32).astype(np.uint64).sum() % 2**32)
    assert int(fingerprint([x])[0]) == expected
