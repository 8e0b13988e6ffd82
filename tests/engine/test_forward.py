"""The engine's attention pieces: the split-key merge and cuDNN's page table (CPU), the cuDNN chunk attention
against a float64 reference (GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aepo_jax.engine import forward


def _softmax_attention(q, k, v, mask, scale):
    """float64 reference: q [B, T, N, D], k / v [B, S, K, D] (grouped heads), mask [B, T, S]; also returns the
    log-sum-exp [B, N, T] of the masked scaled scores (-inf where a query has no key)."""
    b, t, n, d = q.shape
    groups = n // k.shape[2]
    kk, vv = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnd,bsnd->bnts", q, kk) * scale
    scores = np.where(mask[:, None], scores, -np.inf)
    top = np.max(scores, -1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.exp(scores - top)
    total = e.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnd->btnd", e / np.where(total > 0, total, 1.0), vv)
    with np.errstate(divide="ignore"):
        lse = (np.log(total) + top)[..., 0]
    return out, lse


def test_merge_partial_attention_equals_softmax_over_all_keys():
    rng = np.random.default_rng(0)
    b, t, n, kh, d, s = 3, 5, 4, 2, 8, 12
    q, k, v = (rng.standard_normal(shape) for shape in ((b, t, n, d), (b, s, kh, d), (b, s, kh, d)))
    causal = np.arange(s)[None, None, :] <= (np.array([6, 0, 11])[:, None, None] + np.arange(t)[None, :, None])
    first = rng.random((b, t, s)) < 0.5
    first[1] = False  # row 1: the first key set is empty (lse -inf), as for a fresh slot's prefix
    scale = d ** -0.5
    full, _ = _softmax_attention(q, k, v, causal, scale)
    o1, l1 = _softmax_attention(q, k, v, causal & first, scale)
    o2, l2 = _softmax_attention(q, k, v, causal & ~first, scale)
    assert np.isneginf(l1[1]).all() and np.isfinite(l2).all()
    merged = forward.merge_partial_attention(*(jnp.asarray(a, jnp.float32) for a in (o1, l1, o2, l2)))
    assert merged.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(merged), full, atol=2e-6)
    np.testing.assert_allclose(np.asarray(merged)[1], o2[1], atol=2e-6)


def test_page_table_points_each_row_at_its_slots_pages():
    assert [forward.cache_length(n, "cudnn") for n in (1, 64, 100, 128)] == [64, 64, 128, 128]
    assert forward.cache_length(100, "xla") == 100
    # 4 slots x 2 pages = 8 pages: 3 rows do not divide them, so the table has 4 rows of 2 pages
    assert forward.table_rows(3, 4, 128) == 4
    table = forward.page_table(jnp.array([2, 0, 4]), 4, 128, 4)  # slot 4: a padding row (clipped to 3)
    assert table.shape == (4, 1, 2, 1)
    assert np.asarray(table)[:, 0, :, 0].tolist() == [[4, 5], [0, 1], [6, 7], [0, 1]]
    # 2 slots x 3 pages, one row: the table covers all 6 pages, entries past the slot's pages repeat its last
    assert forward.table_rows(1, 2, 192) == 1
    assert np.asarray(forward.page_table(jnp.array([1]), 2, 192, 1))[0, 0, :, 0].tolist() == [3, 4, 5, 5, 5, 5]
    with pytest.raises(ValueError, match="5 rows for a cache of 4 slots"):
        forward.table_rows(5, 4, 128)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                    reason="cuDNN attention needs a GPU; tools/gpu_benchmarks.sh runs this on the device machine")
def test_cudnn_chunk_attention_matches_float64_reference():
    """Rows appended at offsets 0 (a fresh slot: no prefix), mid-cache and up to the cache's end, 3 rows over
    5 slots x 3 pages (15 pages: the table gets 3 rows of 5), bf16 cache: the queries see their slot's prefix
    and the chunk causally, nothing of other slots or past their own position."""
    rng = np.random.default_rng(1)
    slots, length, kh, n, d, t = 5, 3 * forward.PAGE, 2, 4, 64, 16
    cache_k, cache_v = (rng.standard_normal((slots, length, kh, d)).astype(np.float32) for _ in range(2))
    rows, starts, num_new = np.array([3, 0, 1]), np.array([0, 70, length - t]), np.array([t, 9, t])
    q = rng.standard_normal((3, t, n, d)).astype(np.float32)
    new_k, new_v = (rng.standard_normal((3, t, kh, d)).astype(np.float32) for _ in range(2))
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # what the kernel sees
    for r in range(3):  # the chunk's keys are in the cache before attention, as in the engine
        cache_k[rows[r], starts[r]:starts[r] + t] = new_k[r]
        cache_v[rows[r], starts[r]:starts[r] + t] = new_v[r]
    pos = starts[:, None] + np.arange(t)
    mask = np.arange(length)[None, None, :] <= pos[:, :, None]
    expected, _ = _softmax_attention(bf(q), bf(cache_k[rows]), bf(cache_v[rows]), mask, d ** -0.5)
    table = forward.page_table(jnp.asarray(rows, jnp.int32), slots, length, forward.table_rows(3, slots, length))
    assert table.shape[0] == 3
    out = jax.jit(forward.chunk_attention_cudnn, static_argnums=7)(
        *(jnp.asarray(a, jnp.bfloat16) for a in (q, new_k, new_v, cache_k, cache_v)),
        jnp.asarray(starts, jnp.int32), table, d ** -0.5)
    valid = np.arange(t)[None, :] < num_new[:, None]
    err = np.abs(np.asarray(out, np.float64) - expected)[valid]
    assert err.max() < 0.03, err.max()


def test_pallas_decode_step_equals_the_xla_step():
    """forward.decode_step with the Pallas kernel (interpreted here) against the einsum attention, float32, same
    "bshd" cache: slots at different lengths, one that does not write (its row and cache stay untouched), two
    steps so the second reads the rows the kernel wrote in the first."""
    from flax import nnx

    from aepo_jax.models import qwen3

    config = qwen3.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=32, max_position_embeddings=128)
    model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    shape = forward.cache_shape(config, 3, forward.cache_length(64, "pallas"), "bshd")
    cache = [tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)) for _ in range(2)]
    lengths, write = jnp.array([0, 17, 40], jnp.int32), jnp.array([True, False, True])
    tokens = jnp.asarray(rng.integers(0, 64, (2, 3)), jnp.int32)
    step_fn = jax.jit(forward.decode_step, static_argnames=("layout", "impl"))
    out = {}
    for impl in ("xla", "pallas"):
        keys, values = cache
        hidden = []
        for step in range(2):
            h, _, keys, values = step_fn(model, keys, values, tokens[step], lengths + step * write, write,
                                         layout="bshd", impl=impl)
            hidden.append(np.asarray(h))
        out[impl] = hidden, [np.asarray(a) for a in keys + values]
    tol = 2e-5 if jax.default_backend() == "cpu" else 3e-3  # a GPU's float32 matmuls are TF32 in both paths
    for a, b in zip(out["xla"][0], out["pallas"][0]):
        np.testing.assert_allclose(b[[0, 2]], a[[0, 2]], atol=tol)
    for a, b, old in zip(out["xla"][1], out["pallas"][1], cache[0] + cache[1]):
        np.testing.assert_allclose(b, a, atol=tol)
        np.testing.assert_array_equal(b[1], np.asarray(old)[1])  # the idle slot's cache is untouched


@pytest.mark.parametrize("lane_width", [8, 32])
def test_pallas_chunks_equal_the_xla_chunks(lane_width):
    """forward.prefill_chunk and a decode step with a lane, Pallas kernels (interpreted here) against the einsum
    attention, float32, same "bshd" cache: a prompt at offset 0 and a chunk appended mid-cache (shorter than its
    padded width), then one step of two decoding slots while a third absorbs a chunk through the lane (a lane of 8
    tokens is padded to a 16-token tile; one of 32 is two whole tiles, read in place from the flat batch)."""
    from flax import nnx

    from aepo_jax.models import qwen3

    config = qwen3.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=6,
                               num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    model = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    length = forward.cache_length(128, "pallas")
    shape = forward.cache_shape(config, 3, length, "bshd")
    cache = tuple(tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2)) for _ in range(2))
    prompt = forward.Chunk(jnp.asarray(rng.integers(0, 64, (2, 24)), jnp.int32), jnp.array([2, 0], jnp.int32),
                           jnp.array([0, 50], jnp.int32), jnp.array([24, 13], jnp.int32))
    lane = forward.Chunk(jnp.asarray(rng.integers(0, 64, (1, lane_width)), jnp.int32), jnp.array([1], jnp.int32),
                         jnp.array([30], jnp.int32), jnp.array([lane_width - 2], jnp.int32))
    tokens, lengths = jnp.asarray(rng.integers(0, 64, 3), jnp.int32), jnp.array([63, 30, 24], jnp.int32)
    write = jnp.array([True, False, True])
    prefill = jax.jit(forward.prefill_chunk, static_argnames=("layout", "window", "impl"))
    step = jax.jit(forward.decode_step, static_argnames=("layout", "impl"))
    out = {}
    for impl in ("xla", "pallas"):
        keys, values = cache
        h1, keys, values = prefill(model, keys, values, *prompt, layout="bshd", window=length, impl=impl)
        h2, h3, keys, values = step(model, keys, values, tokens, lengths, write, layout="bshd", impl=impl, lane=lane)
        out[impl] = [np.asarray(a) for a in (h1, h2[np.array([0, 2])], h3) + keys + values]
    tol = 2e-5 if jax.default_backend() == "cpu" else 3e-3  # a GPU's float32 matmuls are TF32 in both paths
    for a, b in zip(out["xla"], out["pallas"]):
        np.testing.assert_allclose(b, a, atol=tol)
