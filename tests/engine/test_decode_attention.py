"""The Pallas attention kernels (decode step, appended chunks) against float64 references (interpreted on the CPU,
compiled on a GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.engine import decode_attention as da
from aepo_jax.models import qwen3

EPS = 1e-6


def _norm_rope(x, weight, cos, sin):
    """float64 RoPE(RMSNorm(x) * weight), rotate-half layout; x [..., D], cos / sin [D / 2]."""
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)


def _reference(grouped, cache_k, cache_v, lengths, write, cos, sin, q_w, k_w, scale):
    """float64: each slot's query heads (normed, rotated) attend to their kv head's first lengths[s] cached keys
    (none where write is False) and the new key (normed, rotated); also returns the new keys."""
    s, kv, rows, d = grouped.shape
    group = rows - 2
    out = np.zeros((s, kv * group, d))
    new_k = np.zeros((s, kv, d))
    for b in range(s):
        count = lengths[b] if write[b] else 0
        for h in range(kv):
            q = _norm_rope(grouped[b, h, :group], q_w, cos[b], sin[b])
            new_k[b, h] = _norm_rope(grouped[b, h, group], k_w, cos[b], sin[b])
            keys = np.concatenate([cache_k[b, :count, h], new_k[b, h][None]])
            vals = np.concatenate([cache_v[b, :count, h], grouped[b, h, group + 1][None]])
            scores = q @ keys.T * scale
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, h * group:(h + 1) * group] = p @ vals / p.sum(-1, keepdims=True)
    return out, new_k


def _inputs(rng, slots, length, kv_heads, group, d, lengths):
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # what the kernel sees
    grouped = bf16(rng.standard_normal((slots, kv_heads, group + 2, d)) * 3)
    cache_k, cache_v = (bf16(rng.standard_normal((slots, length, kv_heads, d))) for _ in range(2))
    q_w, k_w = (bf16(1 + 0.3 * rng.standard_normal(d)) for _ in range(2))
    cos, sin = (np.asarray(a, np.float64) for a in
                qwen3.rotary_cos_sin(jnp.asarray(lengths), 10_000.0, d, jnp.bfloat16))
    return grouped, cache_k, cache_v, cos, sin, q_w, k_w


@pytest.mark.parametrize("kv_heads,group,block_k", [(2, 2, 16), (2, 3, 32), (2, 1, 64), (1, 14, 16)])
def test_kernel_matches_float64_attention_and_writes_only_the_new_rows(kv_heads, group, block_k):
    """Group sizes 2, 3 (not a power of two), 1 and 14 (a tile of 16 rows exactly); lengths at 0, inside a
    block, at block boundaries and at the cache's last position; an idle slot (write=False) reads and writes
    nothing."""
    rng = np.random.default_rng(group * 10 + block_k)
    slots, length, d = 6, 128, 64
    lengths = np.array([0, 5, block_k - 1, block_k, 97, length - 1], np.int32)
    write = np.array([True, True, True, True, False, True])
    grouped, cache_k, cache_v, cos, sin, q_w, k_w = _inputs(rng, slots, length, kv_heads, group, d, lengths)
    scale = d ** -0.5
    as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    out, new_k, new_v = jax.jit(da.decode_attention, static_argnames=("eps", "scale", "block_k"))(
        as_bf16(grouped), as_bf16(cache_k), as_bf16(cache_v), jnp.asarray(lengths), jnp.asarray(write),
        as_bf16(cos), as_bf16(sin), as_bf16(q_w), as_bf16(k_w), eps=EPS, scale=scale, block_k=block_k)
    assert out.shape == (slots, kv_heads * group, d) and out.dtype == jnp.bfloat16
    expected, expected_k = _reference(grouped, cache_k, cache_v, lengths, write, cos, sin, q_w, k_w, scale)
    err = np.abs(np.asarray(out, np.float64) - expected).max()
    assert err < 0.03, err
    new_k, new_v = np.asarray(new_k, np.float64), np.asarray(new_v, np.float64)
    written = np.flatnonzero(write)
    # rows written: the normed, rotated key (bf16 roundings of its steps) and the raw value, exactly
    np.testing.assert_allclose(new_k[written, lengths[written]], expected_k[written], atol=0.05, rtol=0.02)
    np.testing.assert_array_equal(new_v[written, lengths[written]], grouped[written, :, group + 1])
    untouched = np.ones((slots, length), bool)
    untouched[written, lengths[written]] = False
    np.testing.assert_array_equal(new_k[untouched], cache_k[untouched])
    np.testing.assert_array_equal(new_v[untouched], cache_v[untouched])


def test_idle_slot_output_is_its_own_value_row():
    """write=False: no cached key is read, so the softmax is over the new key alone."""
    rng = np.random.default_rng(0)
    grouped = jnp.asarray(rng.standard_normal((2, 2, 4, 32)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((2, 64, 2, 32)), jnp.bfloat16)
    ones, rope = jnp.ones(32, jnp.bfloat16), jnp.ones((2, 16), jnp.bfloat16)
    out, _, _ = da.decode_attention(grouped, cache, cache, jnp.array([30, 7]), jnp.array([False, False]), rope,
                                    rope, ones, ones, eps=EPS, scale=0.25, block_k=16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.repeat(grouped[:, :, 3], 2, axis=1)))


def test_bad_shapes_are_named():
    cache = jnp.zeros((2, 64, 2, 32), jnp.bfloat16)
    lengths, write, rope, w = jnp.zeros(2, jnp.int32), jnp.ones(2, bool), jnp.ones((2, 16)), jnp.ones(32)
    call = lambda grouped, cache, **kw: da.decode_attention(grouped, cache, cache, lengths, write, rope, rope, w, w,
                                                           eps=EPS, scale=1.0, **kw)
    with pytest.raises(ValueError, match=r"grouped projections \(2, 3, 4, 32\) do not fit the cache"):
        call(jnp.zeros((2, 3, 4, 32)), cache)
    with pytest.raises(ValueError, match="cache length 64 is not a multiple of block_k=128"):
        call(jnp.zeros((2, 2, 4, 32)), cache, block_k=128)
    with pytest.raises(ValueError, match="head_dim 16 is not supported"):
        call(jnp.zeros((2, 2, 4, 16)), jnp.zeros((2, 64, 2, 16)))
    assert [da.supports(d) for d in (16, 32, 64, 96, 128, 256)] == [False, True, True, False, True, True]


def _chunk_reference(grouped, cache_k, cache_v, rows, starts, cos, sin, q_w, k_w, scale):
    """float64: token t of row r (normed, rotated queries; head n reads kv head n // G) attends to the cached keys
    [0, starts[r]) of slot rows[r] and to the chunk's own keys (normed, rotated) [0, t]; also returns those keys."""
    r, t, kv, width, d = grouped.shape
    group = width - 2
    out = np.zeros((r, t, kv * group, d))
    new_k = np.zeros((r, t, kv, d))
    for i in range(r):
        for h in range(kv):
            new_k[i, :, h] = _norm_rope(grouped[i, :, h, group], k_w, cos[i], sin[i])
            for j in range(t):
                keys = np.concatenate([cache_k[rows[i], :starts[i], h], new_k[i, :j + 1, h]])
                vals = np.concatenate([cache_v[rows[i], :starts[i], h], grouped[i, :j + 1, h, group + 1]])
                q = _norm_rope(grouped[i, j, h, :group], q_w, cos[i, j], sin[i, j])
                scores = q @ keys.T * scale
                p = np.exp(scores - scores.max(-1, keepdims=True))
                out[i, j, h * group:(h + 1) * group] = p @ vals / p.sum(-1, keepdims=True)
    return out, new_k


@pytest.mark.parametrize("kv_heads,group,t,block_k,rows_per_program", [
    (2, 2, 24, 16, 32), (2, 3, 20, 32, 64), (1, 14, 5, 64, 64), (2, 1, 1, 64, 64), (2, 2, 40, 16, 16)])
def test_chunk_kernel_matches_float64_attention_and_writes_only_the_real_tokens(kv_heads, group, t, block_k,
                                                                                 rows_per_program):
    """Rows at offset 0 (a fresh prompt), mid-cache, ending at the cache's last position, and a padding row (slot
    out of range: its output is not checked, nothing written); rows with fewer real tokens than T (the rest not
    written); tiles of 16 tokens that split the chunk (T = 24, 40: earlier tiles' keys re-derived) or run past it;
    group sizes 3 and 14; T = 1."""
    rng = np.random.default_rng(group * 100 + t)
    slots, length, d = 5, 128, 32
    rows, starts = np.array([3, 0, 1, 9]), np.array([0, 37, length - t, 4])
    num_new = np.array([t, max(t - 3, 1), t, t])
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # what the kernel sees
    grouped = bf16(rng.standard_normal((4, t, kv_heads, group + 2, d)) * 3)
    cache_k, cache_v = (bf16(rng.standard_normal((slots, length, kv_heads, d))) for _ in range(2))
    q_w, k_w = (bf16(1 + 0.3 * rng.standard_normal(d)) for _ in range(2))
    positions = starts[:, None] + np.arange(t)
    cos, sin = (np.asarray(a, np.float64) for a in
                qwen3.rotary_cos_sin(jnp.asarray(positions), 10_000.0, d, jnp.bfloat16))
    scale = d ** -0.5
    as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    as_i32 = lambda a: jnp.asarray(a, jnp.int32)
    out, new_k, new_v = jax.jit(da.chunk_attention, static_argnames=("eps", "scale", "block_k", "rows_per_program"))(
        as_bf16(grouped), as_bf16(cache_k), as_bf16(cache_v), as_i32(rows), as_i32(starts), as_i32(num_new),
        as_bf16(cos), as_bf16(sin), as_bf16(q_w), as_bf16(k_w), eps=EPS, scale=scale, block_k=block_k,
        rows_per_program=rows_per_program)
    assert out.shape == (4, t, kv_heads * group, d) and out.dtype == jnp.bfloat16
    expected, expected_k = _chunk_reference(grouped[:3], cache_k, cache_v, rows[:3], starts[:3], cos[:3], sin[:3],
                                            q_w, k_w, scale)
    real = np.arange(t)[None, :] < num_new[:3, None]       # only real tokens' outputs are defined
    # bf16 output: within a rounding or two of the float64 value (values reach ~10: a bf16 step there is 0.06)
    np.testing.assert_allclose(np.asarray(out[:3], np.float64)[real], expected[real], atol=0.03, rtol=0.01)
    new_k, new_v = np.asarray(new_k, np.float64), np.asarray(new_v, np.float64)
    written = np.zeros((slots, length), bool)
    for i in range(3):
        at = starts[i] + np.arange(num_new[i])
        written[rows[i], at] = True
        np.testing.assert_allclose(new_k[rows[i], at], expected_k[i, :num_new[i]], atol=0.05, rtol=0.02)
        np.testing.assert_array_equal(new_v[rows[i], at], grouped[i, :num_new[i], :, group + 1])
    np.testing.assert_array_equal(new_k[~written], cache_k[~written])
    np.testing.assert_array_equal(new_v[~written], cache_v[~written])


def test_chunk_rows_per_program_halves_only_grids_that_leave_the_gpu_idle():
    """32 query rows per program (twice the programs) only where 64 rows give fewer than 128: the 1.7B preset
    (8 kv heads, 2 query heads each) in a 4 x 64 decode lane (64 programs) and a 4 x 16 chunk, not a 16 x 64
    prefill (256) or an 8 x 64 lane (128)."""
    assert da.chunk_rows_per_program(4, 8, 64, 2) == 32
    assert da.chunk_rows_per_program(4, 8, 16, 2) == 32
    assert da.chunk_rows_per_program(16, 8, 64, 2) == 64
    assert da.chunk_rows_per_program(8, 8, 64, 2) == 64
    assert da.chunk_rows_per_program(1, 2, 64, 16) == 32   # 16 heads: 16-token tiles either way, 8 programs


def test_chunk_kernel_bad_shapes_are_named():
    cache = jnp.zeros((2, 64, 2, 32), jnp.bfloat16)
    ids, rope, w = jnp.zeros(1, jnp.int32), jnp.ones((1, 4, 16)), jnp.ones(32)
    call = lambda grouped, cache, rows=ids, rope=rope, **kw: da.chunk_attention(
        grouped, cache, cache, rows, ids, ids, rope, rope, w, w, eps=EPS, scale=1.0, **kw)
    with pytest.raises(ValueError, match=r"projections \(1, 4, 3, 4, 32\), rows / starts / num_new \(1,\) / "
                                         r"\(1,\) / \(1,\) and RoPE table \(1, 4, 16\) do not fit the cache"):
        call(jnp.zeros((1, 4, 3, 4, 32)), cache)
    with pytest.raises(ValueError, match=r"rows / starts / num_new \(2,\)"):
        call(jnp.zeros((1, 4, 2, 4, 32)), cache, rows=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match=r"RoPE table \(1, 5, 16\)"):
        call(jnp.zeros((1, 4, 2, 4, 32)), cache, rope=jnp.ones((1, 5, 16)))
    with pytest.raises(ValueError, match="cache length 64 is not a multiple of block_k=128"):
        call(jnp.zeros((1, 4, 2, 4, 32)), cache, block_k=128)
    with pytest.raises(ValueError, match="head_dim 16 is not supported"):
        call(jnp.zeros((1, 4, 2, 4, 16)), jnp.zeros((2, 64, 2, 16)), rope=jnp.ones((1, 4, 8)))


def test_chunk_benchmark_matches_its_float32_reference(tmp_path, monkeypatch):
    """tools/benchmark_chunk_attention.py on CPU (tiny shapes, interpreted): every tile setting agrees with the
    float32 reference it prints, is timed, and lands in the JSON."""
    import json

    from tools import benchmark_chunk_attention
    monkeypatch.setenv("OUT", str(tmp_path))
    records = benchmark_chunk_attention.main(["--rows", "2", "--chunk", "20", "--start", "40", "--slots", "4",
                                              "--heads", "4", "--kv_heads", "2", "--head_dim", "32", "--layers", "2",
                                              "--repeats", "1", "--configs", "16:32:4:2,32:16:4:3"])
    assert [r["variant"] for r in records] == ["16:32:4:2", "32:16:4:3"]
    assert all(r["rel_error"] < 1e-2 and r["ms_per_call"] > 0 for r in records), records
    assert json.loads((tmp_path / "chunk_attention_bench.json").read_text())["results"] == records


@pytest.mark.parametrize("t", [32, 20])
def test_a_lane_step_reads_its_flat_batch_in_place_and_equals_the_separate_calls(t):
    """A decode step with a lane: chunk_attention on the whole flat batch (chunk tokens first), then
    decode_attention(first=R * T, out=...) into the same output, gives exactly (bit for bit) the outputs and caches
    of the chunk and decode kernels called on their own rows. T = 32 is two whole tiles of 16 (read in place); T = 20
    is not (the chunk is copied and padded). The lane's slots (1 and 4) and a padding row do not decode."""
    rng = np.random.default_rng(t)
    slots, length, kv_heads, group, d = 6, 128, 2, 2, 32
    rows, starts, num_new = np.array([4, 1, 9]), np.array([37, 0, 5]), np.array([t, t - 7, t])
    lengths = np.array([50, 0, 9, 64, 70, 3])
    write = np.array([True, False, True, True, False, False])
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    flat = bf16(rng.standard_normal((3 * t + slots, kv_heads, group + 2, d)) * 3)
    cache_k, cache_v = (bf16(rng.standard_normal((slots, length, kv_heads, d))) for _ in range(2))
    q_w, k_w = (bf16(1 + 0.3 * rng.standard_normal(d)) for _ in range(2))
    rope = lambda positions: qwen3.rotary_cos_sin(jnp.asarray(positions), 10_000.0, d, jnp.bfloat16)
    chunk_rope, slot_rope = rope(starts[:, None] + np.arange(t)), rope(lengths)
    chunk_args = [jnp.asarray(a, jnp.int32) for a in (rows, starts, num_new)] + list(chunk_rope) + [q_w, k_w]
    slot_args = [jnp.asarray(lengths, jnp.int32), jnp.asarray(write)] + list(slot_rope) + [q_w, k_w]
    kw = dict(eps=EPS, scale=d ** -0.5)

    @jax.jit
    def lane(flat, cache_k, cache_v):
        out, cache_k, cache_v = da.chunk_attention(flat, cache_k, cache_v, *chunk_args, **kw)
        return da.decode_attention(flat, cache_k, cache_v, *slot_args, first=3 * t, out=out, **kw)

    @jax.jit
    def separate(flat, cache_k, cache_v):
        chunk = flat[:3 * t].reshape(3, t, kv_heads, group + 2, d)
        out_c, cache_k, cache_v = da.chunk_attention(chunk, cache_k, cache_v, *chunk_args, **kw)
        out_s, cache_k, cache_v = da.decode_attention(flat[3 * t:], cache_k, cache_v, *slot_args, **kw)
        return jnp.concatenate([out_c.reshape(3 * t, kv_heads * group, d), out_s]), cache_k, cache_v

    got, want = lane(flat, cache_k, cache_v), separate(flat, cache_k, cache_v)
    assert got[0].shape == (3 * t + slots, kv_heads * group, d)
    defined = np.concatenate([(np.arange(t)[None, :] < num_new[:, None]) & (rows[:, None] < slots),
                              np.ones((1, slots), bool)], axis=None)   # real chunk tokens and every slot row
    np.testing.assert_array_equal(np.asarray(got[0])[defined], np.asarray(want[0])[defined])
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
