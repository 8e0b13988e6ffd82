"""The engine's attention as Pallas (Triton) kernels: a decode step's attention block for every slot of the pool
(`decode_attention`), and the attention of appended chunks (`chunk_attention`: prompts, tool results).

Decode.

Slot s brings one new token at position n_s (it holds n_s cached keys / values: positions [0, n_s) of its rows
in the "bshd" cache buffers [slots, L, kv_heads, head_dim]) with the raw projections of its query heads,
key and value (`qwen3.Attention.grouped_qkv`: per kv head its G = heads / kv_heads query heads, its key, its
value). The kernel finishes the projections as the model does (Qwen3: RMSNorm per head, then RoPE at n_s),

    q_i = RoPE(RMSNorm_q(q_i)),  k' = RoPE(RMSNorm_k(k)),

writes k', v' at position n_s of the cache, in place (the buffers are aliased to the outputs), and attends:

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j   over j in [0, n_s) and the new key / value,

the new token's attention in a causal decoder (flash-decoding's online softmax, Dao et al., FlashAttention-2,
arXiv 2307.08691: running max m, normaliser l and unnormalised output, rescaled by exp(m_old - m_new) per key
block). So a decode step needs no separate norm, RoPE or key / value scatter kernels.

One program per (slot, kv head): it loads the group's rows as one tile of T = max(16, 2^ceil(log2(G + 2)))
rows (rows past G masked out of the queries: the tensor cores need 16; on a GPU masked rows are never read, the
interpreter reads the tile padded), then streams the slot's keys and values of that kv head in blocks of
`block_k` positions, each key and value read once for all G heads (cuDNN's fused attention runs one program per
query head). Keys are read in two halves (RoPE's rotate-half pairs feature i with i + D/2), so the rotation
needs no shuffle: q . k = q_lo . k_lo + q_hi . k_hi. A slot with write=False (stopped, free, or absorbing
appended tokens in the lane) reads no cached key: its output is its own value row, which the caller discards.

On a GPU this is a Triton kernel; elsewhere Pallas interprets it (how the CPU tests run it). H100, Qwen3-1.7B,
64 slots, prompt 256 + 256 steps: 3.138 ms per decode step against 3.433 with cuDNN attention and the separate
norm / RoPE / scatter kernels (docs/benchmarks.md, session 14); blocks of 32 keys rather than 64: 3.07 -> 3.04 ms
(session 18). jax 0.11 marks Pallas' Triton backend deprecated (its successor on GPU is Mosaic GPU); setup.cfg
pins jax < 0.12.

Chunks. Row r appends T tokens to slot rows[r] at positions starts[r] + t, given as raw grouped projections
like a slot's. The kernel finishes them as the decode kernel does (norms, RoPE, key / value writes for the real
tokens), and query t attends to the slot's keys [0, starts[r] + t] (its cached prefix, then the chunk causally):

    out_t = sum_j softmax_j(scale * q_t . k_j) v_j   over j <= starts[r] + t,

in one pass with the same online softmax: the prefix streamed from the cache, the chunk's keys from the
projections (no program reads back another's writes), so no separate norm, RoPE, scatter or merge kernels. One
program per (row, kv head, tile of tokens); its G query heads share each key block read. H100, 1.7B, a decode
lane step (4 rows x 64 tokens at length 600): +1.81 / +2.08 ms of device time with 1 / 4 rows filled when the
XLA ops finished the projections and wrote the keys / values for a kernel that only attended, +1.45 / +1.64 ms
with this one (docs/benchmarks.md, session 20), +1.39 / +1.59 ms with 32 query rows per program for such small
grids (+1.47 / +1.66 ms with 64 in the same run; session 21).

A decode step with a lane runs both kernels on its one flat batch of rows (the chunks' tokens first, then the
slots): each reads its rows of the projection GEMM's output in place, and the decode kernel writes its rows into
the chunk kernel's output buffer. Where the lane's width is a whole number of the chunk kernel's tiles, XLA
slices and concatenates nothing (session 23 counted three such copies per layer, ~4 MB in all for a 4 x 64 lane
at 1.7B). Running both as one launch was slower (session 24).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

Array = jax.Array
_F32 = jnp.float32
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: masked keys never give inf - inf


def _norm_rope(lo: Array, hi: Array, weight_ref, cos: Array, sin: Array, eps: float, dtype):
    """RMSNorm over the D features given as halves lo, hi [..., D/2], then rotate-half RoPE; rounded to `dtype`
    where the model rounds (after the norm, after the weight, after the rotation)."""
    half = lo.shape[-1]
    lo, hi = lo.astype(_F32), hi.astype(_F32)
    inv = lax.rsqrt((jnp.sum(lo * lo, axis=-1, keepdims=True) + jnp.sum(hi * hi, axis=-1, keepdims=True))
                    / (2 * half) + eps)
    w_lo, w_hi = (weight_ref[pl.ds(i * half, half)].astype(_F32) for i in (0, 1))
    lo = (lo * inv).astype(dtype).astype(_F32) * w_lo
    hi = (hi * inv).astype(dtype).astype(_F32) * w_hi
    lo, hi = lo.astype(dtype).astype(_F32), hi.astype(dtype).astype(_F32)
    return (lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)


def _online_softmax_block(carry, s: Array, v: Array):
    """One key block of the online softmax (FlashAttention-2): carry = (acc [rows, D] unnormalised output,
    m [rows] running max, l [rows] normaliser), s [rows, block] scaled scores (masked ones _MASKED), v [block, D]:
        m' = max(m, max_j s_j),  acc' = exp(m - m') acc + exp(s - m') v,  l' = exp(m - m') l + sum_j exp(s_j - m')."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    rescale = jnp.exp(m - m_new)
    return acc * rescale[:, None] + plt.dot(p.astype(v.dtype), v), m_new, l * rescale + jnp.sum(p, axis=1)


def _scores(q: tuple[Array, Array], k_lo: Array, k_hi: Array, scale: float) -> Array:
    """scale * q . k for query rows q = (lo, hi) [rows, D/2] and keys given as halves [block, D/2]: [rows, block]."""
    return (plt.dot(q[0], k_lo, trans_b=True) + plt.dot(q[1], k_hi, trans_b=True)) * scale


def _kernel(keys_ref, write_ref, grouped_ref, cos_ref, sin_ref, q_norm_ref, k_norm_ref, k_ref, v_ref,
            out_ref, k_out_ref, v_out_ref, *, group: int, block_k: int, scale: float, eps: float):
    tile, d = grouped_ref.shape
    half = d // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    dtype = k_ref.dtype
    cos, sin = cos_ref[...].astype(_F32), sin_ref[...].astype(_F32)
    is_query = (jnp.arange(tile) < group)[:, None]
    q_lo, q_hi = _norm_rope(plt.load(grouped_ref.at[:, lo], mask=is_query, other=0.0),
                            plt.load(grouped_ref.at[:, hi], mask=is_query, other=0.0), q_norm_ref, cos, sin, eps,
                            dtype)                                 # [tile, D/2] each
    k_lo, k_hi = _norm_rope(grouped_ref[group, lo], grouped_ref[group, hi], k_norm_ref, cos, sin, eps, dtype)
    v_new = grouped_ref[group + 1, :]
    # The new key first: the running max is finite from the start.
    m = (jnp.sum(q_lo.astype(_F32) * k_lo.astype(_F32)[None, :], axis=1)
         + jnp.sum(q_hi.astype(_F32) * k_hi.astype(_F32)[None, :], axis=1)) * scale
    l = jnp.ones_like(m)
    acc = jnp.broadcast_to(v_new.astype(_F32)[None, :], (tile, d))
    n = keys_ref[0]

    def block(i, carry):
        rows = pl.ds(i * block_k, block_k)
        s = _scores((q_lo, q_hi), k_ref[rows, lo], k_ref[rows, hi], scale)
        s = jnp.where((i * block_k + jnp.arange(block_k) < n)[None, :], s, _MASKED)   # [tile, block_k] f32
        return _online_softmax_block(carry, s, v_ref[rows, :])

    acc, m, l = lax.fori_loop(0, pl.cdiv(n, block_k), block, (acc, m, l))
    plt.store(out_ref, (acc / l[:, None]).astype(out_ref.dtype), mask=is_query)
    write = jnp.full((1, 1), write_ref[0] != 0)
    row = pl.ds(n, 1)
    plt.store(k_out_ref.at[row, lo], k_lo[None, :], mask=write)
    plt.store(k_out_ref.at[row, hi], k_hi[None, :], mask=write)
    plt.store(v_out_ref.at[row, :], v_new[None, :], mask=write)


def supports(head_dim: int) -> bool:
    """Whether the kernel takes this head_dim: a power of two >= 32 (each half is a tensor-core operand)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def decode_attention(grouped: Array, cache_k: Array, cache_v: Array, lengths: Array, write: Array, cos: Array,
                     sin: Array, q_norm: Array, k_norm: Array, *, eps: float, scale: float, first: int = 0,
                     out: Array | None = None, block_k: int = 32, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool | None = None) -> tuple[Array, Array, Array]:
    """Norms, RoPE and attention of each slot's new token over its cache prefix and itself; writes its key /
    value.

    grouped [first + S, K, G + 2, D]: raw projections (`qwen3.Attention.grouped_qkv`), slot s's in row first + s
    (read in place: a decode step with a lane puts its chunks' rows first, see `chunk_attention`); cache_k, cache_v
    [S, L, K, D] ("bshd"); lengths [S] int32: the new token's position = the number of cached keys it reads;
    write [S] bool: running slots (write=False: read nothing, write nothing); cos, sin [S, D / 2]: the RoPE table
    at `lengths` (`qwen3.rotary_cos_sin`); q_norm, k_norm [D]: the RMSNorm weights, eps their epsilon. Needs
    lengths < L where write, and L a multiple of block_k. Returns (out [first + S, N, D] in grouped's dtype,
    slot s's heads in row first + s: rows before `first` are those of `out` [first + S, N, D], updated in place,
    or unset where out is None; cache_k, cache_v with k', v' of slot s at row lengths[s] where write).
    interpret=None: compiled on a GPU, interpreted elsewhere.
    """
    s = lengths.shape[0]
    n, kv_heads, rows, d = grouped.shape if grouped.ndim == 4 else (0,) * 4
    group = rows - 2
    length = cache_k.shape[1]
    if group < 1 or cache_k.shape[2] != kv_heads or cache_k.shape[3] != d or d % 2 or n != first + s:
        raise ValueError(f"decode_attention: grouped projections {grouped.shape} do not fit the cache "
                         f"{cache_k.shape} and {s} slots after row {first} (expected [first + S, K, G + 2, D] with the "
                         "cache's K and an even D)")
    if not supports(d):
        raise ValueError(f"decode_attention: head_dim {d} is not supported (needs a power of two >= 32: its halves "
                         "are tensor-core operands)")
    if length % block_k:
        raise ValueError(f"decode_attention: cache length {length} is not a multiple of block_k={block_k}")
    tile = max(16, 1 << (rows - 1).bit_length())
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    write = write.astype(jnp.int32)
    keys = jnp.where(write != 0, lengths, 0).astype(jnp.int32)
    dtype = cache_k.dtype
    per_slot = pl.BlockSpec((1,), lambda b, h: (b,))
    rope = pl.BlockSpec((None, d // 2), lambda b, h: (b, 0))
    weight = pl.BlockSpec((d,), lambda b, h: (0,))
    head_tile = pl.BlockSpec((None, None, tile, d), lambda b, h: (first + b, h, 0, 0))
    cache_rows = pl.BlockSpec((None, length, None, d), lambda b, h: (b, 0, h, 0))
    kernel = functools.partial(_kernel, group=group, block_k=block_k, scale=scale, eps=eps)
    out_dtype = grouped.dtype
    operands = [keys, write, grouped.astype(dtype), cos, sin, q_norm.astype(dtype), k_norm.astype(dtype), cache_k,
                cache_v]
    in_specs = [per_slot, per_slot, head_tile, rope, rope, weight, weight, cache_rows, cache_rows]
    aliases = {7: 1, 8: 2}
    if out is not None:  # updated in place: its other rows are kept
        if out.shape != (n, kv_heads * group, d):
            raise ValueError(f"decode_attention: out {out.shape} is not [first + S, N, D] = {(n, kv_heads * group, d)}")
        operands.append(out.astype(out_dtype).reshape(n, kv_heads, group, d))
        in_specs.append(head_tile)
        aliases[len(operands) - 1] = 0
        kernel = functools.partial(_skip_ref, kernel, len(operands) - 1)
    out, cache_k, cache_v = pl.pallas_call(
        kernel,
        grid=(s, kv_heads),
        in_specs=in_specs,
        out_specs=[head_tile, cache_rows, cache_rows],
        out_shape=[jax.ShapeDtypeStruct((n, kv_heads, group, d), out_dtype),
                   jax.ShapeDtypeStruct(cache_k.shape, dtype), jax.ShapeDtypeStruct(cache_v.shape, dtype)],
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*operands)
    return out.reshape(n, kv_heads * group, d), cache_k, cache_v


def _skip_ref(kernel, index: int, *refs):
    """kernel(*refs) without refs[index]: an input aliased to an output, seen by the kernel through the output."""
    return kernel(*refs[:index], *refs[index + 1:])


def _chunk_kernel(slot_ref, start_ref, count_ref, tile_ref, grouped_ref, cos_ref, sin_ref, q_norm_ref, k_norm_ref,
                  k_ref, v_ref, out_ref, k_out_ref, v_out_ref, *, group: int, heads: int, block_k: int, scale: float,
                  eps: float):
    block_t, _, d = tile_ref.shape                  # this program's tokens: [block_t, >= G + 2, D] raw projections
    half = d // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    dtype = k_ref.dtype
    rows = block_t * heads                          # query rows: (token, head) pairs, heads = G rounded up to 2^n
    head, tile = pl.program_id(1), pl.program_id(2)
    first = tile * block_t                          # the tile's first token (index into the chunk)
    slot, start, count = slot_ref[0], start_ref[0], count_ref[0]
    token = first + jnp.arange(block_t)             # [block_t] chunk indices of the tile's tokens
    query_token = first + jnp.arange(rows) // heads  # [rows]

    def rope(t0):
        """The RoPE table (cos, sin) [block_t, D/2] of chunk tokens t0.."""
        return tuple(ref[pl.ds(t0, block_t), :].astype(_F32) for ref in (cos_ref, sin_ref))

    cos, sin = rope(first)
    is_query = (jnp.arange(heads) < group)[None, :, None]
    q_lo, q_hi = _norm_rope(*(plt.load(tile_ref.at[:, pl.ds(0, heads), part], mask=is_query, other=0.0)
                              for part in (lo, hi)), q_norm_ref, cos[:, None], sin[:, None], eps, dtype)
    queries = (q_lo.reshape(rows, half), q_hi.reshape(rows, half))   # [block_t, heads, D/2] -> [rows, D/2]
    k_lo, k_hi = _norm_rope(tile_ref[:, group, lo], tile_ref[:, group, hi], k_norm_ref, cos, sin, eps, dtype)
    v_new = tile_ref[:, group + 1, :]
    # The tile's keys / values go to the cache at their positions (real tokens of real rows only); the other tiles'
    # programs normalise and rotate their own copies from the raw projections, so no program reads them back.
    kept = (token < count)[:, None]
    positions = pl.ds(start + first, block_t)
    plt.store(k_out_ref.at[slot, positions, head, lo], k_lo, mask=kept)
    plt.store(k_out_ref.at[slot, positions, head, hi], k_hi, mask=kept)
    plt.store(v_out_ref.at[slot, positions, head, :], v_new, mask=kept)

    def attend(carry, k_lo, k_hi, v, visible):
        return _online_softmax_block(carry, jnp.where(visible, _scores(queries, k_lo, k_hi, scale), _MASKED), v)

    def prefix_block(j, carry):                     # the slot's cached keys [0, start)
        cols = pl.ds(j * block_k, block_k)
        visible = (j * block_k + jnp.arange(block_k) < start)[None, :]
        return attend(carry, k_ref[slot, cols, head, lo], k_ref[slot, cols, head, hi], v_ref[slot, cols, head, :],
                      visible)

    def chunk_block(c, carry):                      # an earlier tile of the chunk: all its keys are visible
        t0 = c * block_t
        tokens = pl.ds(t0, block_t)
        k_c = _norm_rope(grouped_ref[tokens, group, lo], grouped_ref[tokens, group, hi], k_norm_ref, *rope(t0),
                         eps, dtype)
        return attend(carry, *k_c, grouped_ref[tokens, group + 1, :], True)

    init = (jnp.zeros((rows, d), _F32), jnp.full((rows,), _MASKED, _F32), jnp.zeros((rows,), _F32))
    carry = lax.fori_loop(0, pl.cdiv(start, block_k), prefix_block, init)
    carry = lax.fori_loop(0, tile, chunk_block, carry)
    acc, _, l = attend(carry, k_lo, k_hi, v_new, token[None, :] <= query_token[:, None])  # the tile, causally
    plt.store(out_ref.at[:, pl.ds(0, heads), :], (acc / l[:, None]).astype(out_ref.dtype).reshape(block_t, heads, d),
              mask=is_query)


def _tile_tokens(rows_per_program: int, heads: int, t: int) -> int:
    """Tokens per tile of `chunk_attention`: rows_per_program // heads as a power of two, at least 16, no more
    than the chunk needs."""
    per_head = max(1, rows_per_program // heads)
    return max(16, min(1 << (per_head.bit_length() - 1), 1 << (t - 1).bit_length()))


def chunk_rows_per_program(r: int, kv_heads: int, t: int, heads: int) -> int:
    """`chunk_attention`'s default query rows per program: 64, or 32 where 64 leaves the grid (r rows x kv_heads x
    tiles) under 128 programs, fewer than an H100's 132 SMs. H100, 1.7B, 28 layers (docs/benchmarks.md, session
    21): a decode lane of 4 x 64 tokens (64 programs at 64 rows) took 0.692 ms at 64 rows, 0.628 at 32 (the lane
    step with 4 appends: +1.66 -> +1.59 ms); a prefill of 16 x 64 tokens (256 programs) 1.435 ms at 64, 1.566 at
    32."""
    return 64 if r * kv_heads * pl.cdiv(t, _tile_tokens(64, heads, t)) >= 128 else 32


def chunk_attention(grouped: Array, cache_k: Array, cache_v: Array, rows: Array, starts: Array, num_new: Array,
                    cos: Array, sin: Array, q_norm: Array, k_norm: Array, *, eps: float, scale: float,
                    block_k: int = 64, rows_per_program: int | None = None, num_warps: int = 4, num_stages: int = 3,
                    interpret: bool | None = None) -> tuple[Array, Array, Array]:
    """Norms, RoPE, cache writes and attention of appended chunks, from their raw projections.

    grouped [R, T, K, G + 2, D]: the raw projections (`qwen3.Attention.grouped_qkv`) of token t of row r, at
    position starts[r] + t of slot rows[r] (rows, starts, num_new [R] int32; a row whose slot is out of range is
    padding: nothing written, its output garbage, as is that of a token past num_new[r]); cos, sin [R, T, D/2]:
    the RoPE table at those positions; q_norm, k_norm [D]: the RMSNorm weights, eps their epsilon; cache_k,
    cache_v [S, L, K, D] ("bshd"), L a multiple of block_k. Writes the real tokens' keys k' = RoPE(RMSNorm_k(k))
    and values, and attends: query t reads its slot's keys [0, starts[r] + t]. Returns (out [R, T, N, D] in
    grouped's dtype, cache_k, cache_v). interpret=None: compiled on a GPU, interpreted elsewhere.

    A decode step with a lane passes its whole flat batch instead, grouped [M, K, G + 2, D] (one projection GEMM's
    output): token t of row r in row r * T + t, the slots' rows after the R * T chunk tokens. Then out is
    [M, N, D] with the rows past R * T unset, for `decode_attention(first=R * T, out=out)` to fill in place: where
    T is a whole number of tiles nothing is sliced, padded or concatenated.

    One program per (row, kv head, tile of tokens), the tile holding rows_per_program // G' tokens (at least 16;
    rows_per_program=None: `chunk_rows_per_program`) for each of the G query heads (G' = G rounded up to a power
    of two; its rows are the (token, head) pairs, one operand of each product): it streams the slot's cached
    prefix [0, starts[r]) once for all G, then the chunk's earlier tiles (their keys normed and rotated again from
    the raw projections), then its own tile. A chunk that is not a whole number of tiles is copied, padded with
    zero projections (never visible to a real token).
    """
    r, t = cos.shape[:2]
    rows_of_chunks = grouped.ndim == 5 and grouped.shape[:2] == (r, t)
    flat = grouped.reshape((r * t,) + grouped.shape[2:]) if rows_of_chunks else grouped
    n, kv_heads, width, d = flat.shape if flat.ndim == 4 else (0,) * 4
    group = width - 2
    slots, length = cache_k.shape[:2]
    if group < 1 or n < r * t or cache_k.shape[2:] != (kv_heads, d) or cache_v.shape != cache_k.shape \
            or any(a.shape != (r,) for a in (rows, starts, num_new)) or cos.shape != (r, t, d // 2) \
            or sin.shape != cos.shape:
        raise ValueError(f"chunk_attention: projections {grouped.shape}, rows / starts / num_new {rows.shape} / "
                         f"{starts.shape} / {num_new.shape} and RoPE table {cos.shape} do not fit the cache "
                         f"{cache_k.shape} / {cache_v.shape} (expected grouped [R, T, K, G + 2, D] with the cache's K "
                         "and D, [R] rows, [R, T, D / 2] tables)")
    if not supports(d):
        raise ValueError(f"chunk_attention: head_dim {d} is not supported (needs a power of two >= 32)")
    if length % block_k:
        raise ValueError(f"chunk_attention: cache length {length} is not a multiple of block_k={block_k}")
    heads = 1 << (group - 1).bit_length()          # the group's query heads as a power-of-two tile (masked rows)
    if rows_per_program is None:
        rows_per_program = chunk_rows_per_program(r, kv_heads, t, heads)
    block_t = _tile_tokens(rows_per_program, heads, t)
    if t % block_t:  # a tile must not run into the next row's tokens: whole tiles, padded, in a copy
        padded = pl.cdiv(t, block_t) * block_t
        pad = lambda a: jnp.pad(a, ((0, 0), (0, padded - t)) + ((0, 0),) * (a.ndim - 2))
        out, cache_k, cache_v = chunk_attention(
            pad(flat[:r * t].reshape((r, t) + flat.shape[1:])), cache_k, cache_v, rows, starts, num_new, pad(cos),
            pad(sin), q_norm, k_norm, eps=eps, scale=scale, block_k=block_k, rows_per_program=rows_per_program,
            num_warps=num_warps, num_stages=num_stages, interpret=interpret)
        out = out[:, :t]
        return (out if rows_of_chunks else jnp.pad(out.reshape((r * t,) + out.shape[2:]),
                                                   ((0, n - r * t), (0, 0), (0, 0)))), cache_k, cache_v
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    dtype = cache_k.dtype
    real = (rows >= 0) & (rows < slots)
    per_row = [jnp.where(real, a, 0).astype(jnp.int32) for a in (rows, starts, num_new)]
    tiles = t // block_t
    row_spec = pl.BlockSpec((1,), lambda i, h, j: (i,))
    tile_spec = pl.BlockSpec((block_t, None, max(width, heads), d), lambda i, h, j: (i * tiles + j, h, 0, 0))
    chunk_spec = pl.BlockSpec((t, None, width, d), lambda i, h, j: (i, h, 0, 0))
    rope_spec = pl.BlockSpec((None, t, d // 2), lambda i, h, j: (i, 0, 0))
    weight = pl.BlockSpec((d,), lambda i, h, j: (0,))
    cache = pl.BlockSpec(cache_k.shape, lambda i, h, j: (0, 0, 0, 0))   # the slot is data: indexed in the kernel
    out_spec = pl.BlockSpec((block_t, None, heads, d), lambda i, h, j: (i * tiles + j, h, 0, 0))
    out, cache_k, cache_v = pl.pallas_call(
        functools.partial(_chunk_kernel, group=group, heads=heads, block_k=block_k, scale=scale, eps=eps),
        grid=(r, kv_heads, tiles),
        in_specs=[row_spec, row_spec, row_spec, tile_spec, chunk_spec, rope_spec, rope_spec, weight, weight, cache,
                  cache],
        out_specs=[out_spec, cache, cache],
        out_shape=[jax.ShapeDtypeStruct((n, kv_heads, group, d), grouped.dtype),
                   jax.ShapeDtypeStruct(cache_k.shape, dtype), jax.ShapeDtypeStruct(cache_v.shape, dtype)],
        input_output_aliases={9: 1, 10: 2},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="chunk_attention",
    )(*per_row, *(flat.astype(dtype),) * 2, cos, sin, q_norm.astype(dtype), k_norm.astype(dtype), cache_k, cache_v)
    return out.reshape(((r, t) if rows_of_chunks else (n,)) + (kv_heads * group, d)), cache_k, cache_v
