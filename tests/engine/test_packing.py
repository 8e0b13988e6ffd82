"""engine.packing: per-row fields through one int32 array, exactly, on the host and inside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.engine import packing


def _fields(rows=3):
    rng = np.random.default_rng(0)
    floats = rng.normal(size=(rows, 4)).astype(np.float32)
    floats[0, :3] = [np.nan, -np.inf, -0.0]  # bit-exact, not value-exact, round trips
    return dict(tokens=rng.integers(-1, 151_936, (rows, 4)).astype(np.int32), logprobs=floats,
                flag=np.array([True, False, True][:rows]), count=np.arange(rows, dtype=np.int32),
                temperature=np.linspace(0.1, 2.0, rows).astype(np.float32))


def _assert_same(got, want):
    assert list(got) == list(want)
    for name, a in want.items():
        b = np.asarray(got[name])
        assert b.dtype == a.dtype and b.shape == a.shape, name
        assert a.tobytes() == np.ascontiguousarray(b).tobytes(), name


def test_host_round_trip_is_bit_exact():
    fields = _fields()
    packed = packing.pack(fields)
    assert packed.dtype == np.int32 and packed.shape == (3, 4 + 4 + 1 + 1 + 1)
    _assert_same(packing.unpack(packed, packing.layout(fields)), fields)


def test_host_to_device_and_back():
    """Packed on the host, unpacked inside jit (a prefill's arguments), packed there, unpacked on the host
    (a decode result): every field arrives with its dtype, shape and bits."""
    fields = _fields()
    spec = packing.layout(fields)
    through = jax.jit(lambda p: packing.pack(packing.unpack(p, spec)))(packing.pack(fields))
    assert through.dtype == jnp.int32
    _assert_same(packing.unpack(np.asarray(through), spec), fields)
    assert packing.layout({k: jnp.asarray(v) for k, v in fields.items()}) == spec


def test_bad_fields_and_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="field 'x'.*int32 / bool / float32"):
        packing.layout({"x": np.zeros(3, np.float64)})
    with pytest.raises(ValueError, match="field 'y'"):
        packing.layout({"y": np.zeros((3, 2, 2), np.int32)})
    fields = _fields()
    with pytest.raises(ValueError, match="layout covers 10 columns, the array has 11"):
        packing.unpack(packing.pack(fields), packing.layout({k: v for k, v in fields.items() if k != "count"}))
