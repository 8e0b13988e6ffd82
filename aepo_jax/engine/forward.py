"""The Qwen3 forward pass over the engine's slot cache: chunk prefill and one-token decode.

The engine owns its KV-cache layout: it runs the model's own `embed_tokens`, `DecoderLayer`s and `norm`,
handing each layer an attention function (written here) that writes the new keys / values into the cache
and attends over it:

  layout "bshd": per layer [slots, max_len, kv_heads, head_dim]
  layout "bhsd": per layer [slots, kv_heads, max_len, head_dim]  (head-major: each (slot, head) is one
                 contiguous [max_len, head_dim] matrix, the batch-matmul operand layout of the decode step)

A decode step writes one key / value row per running slot and attends in place (no gather, no copy):
  "xla" attention  einsums over the whole max_len with a position mask. With "bhsd" the batch dimensions
                   of both matmuls are the buffer's leading dimensions; with "bshd" XLA:GPU transposes
                   every layer's cache every step (measured: 112 cache-sized transposes in the loop).
  "cudnn"          `jax.nn.dot_product_attention(implementation="cudnn")` on the "bshd" buffer (its BTNH
                   layout) with per-slot key lengths, so each slot reads only its valid prefix.
  "pallas"         `decode_attention.decode_attention` on the "bshd" buffer: one Pallas (Triton) kernel per
                   layer applies the q / k norms and RoPE to the slots' raw projections, writes their key /
                   value rows and reads each slot's valid prefix once per kv head (not once per query head).
A prefill appends chunks to some slots; its queries start at each slot's own offset, which cuDNN's top-left
causal mask cannot express. The "xla" attention gathers the rows' first `window` positions and applies the
offset-causal mask [R, T, window] to float32 scores. "cudnn" splits each row's keys in two: the slot's cache
prefix [0, start), read in place as pages by cuDNN paged attention with a padding mask, and the chunk's own keys,
causal (cuDNN's top-left mask is exact there); the two outputs are merged through their log-sum-exps
(`merge_partial_attention`). "pallas" finishes the chunk's raw projections as the decode kernel does (norms,
RoPE, key / value writes) and reads each row's slot prefix in place, then the chunk causally, in one pass
(`decode_attention.chunk_attention`). No window is gathered and no mask tensor exists. A decode step can
carry such chunks too (its "lane": tool results appended while the other slots decode), in the same flat
batch of rows as its decode tokens: the chunks' tokens first, then one row per slot, so that with "pallas" both
kernels read the one projection output in place and write one attention output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from aepo_jax.engine import decode_attention
from aepo_jax.models import qwen3

Array = jax.Array
LAYOUTS = ("bshd", "bhsd")
_F32 = jnp.float32
PAGE = 64  # positions per page when cuDNN reads the cache as pages (cuDNN needs a power of two)
IMPLS = ("xla", "cudnn", "pallas")  # decode attention (see the module docstring)


def cache_length(max_len: int, impl: str) -> int:
    """Positions per slot in the cache buffers: max_len, rounded up to whole pages for "cudnn" and "pallas"
    attention (cuDNN reads appended chunks' prefixes as pages; the Pallas kernels read blocks of a page)."""
    return max_len if impl == "xla" else -(-max_len // PAGE) * PAGE


def cache_shape(config, num_slots: int, max_len: int, layout: str) -> tuple[int, ...]:
    """Shape of one layer's key (or value) buffer."""
    if layout == "bshd":
        return (num_slots, max_len, config.num_kv_heads, config.head_dim)
    if layout == "bhsd":
        return (num_slots, config.num_kv_heads, max_len, config.head_dim)
    raise ValueError(f"unknown KV-cache layout {layout!r}; expected one of {LAYOUTS}")


def _seq_axis(layout: str) -> int:
    return 1 if layout == "bshd" else 2


def write_kv(buf: Array, rows: Array, positions: Array, kv: Array, layout: str) -> Array:
    """Scatters kv [B, T, K, D] into buf at (rows[b], positions[b, t]); out-of-range indices are dropped."""
    kv = kv.astype(buf.dtype)
    if layout == "bshd":
        return buf.at[rows[:, None], positions].set(kv, mode="drop")
    # Advanced indices separated by a slice put the broadcast [B, T] dimensions first: [B, T, K, D].
    return buf.at[rows[:, None], :, positions].set(kv, mode="drop")


def attention(q: Array, k: Array, v: Array, mask: Array, layout: str, scale: float) -> Array:
    """softmax(q k^T * scale + mask) v with grouped-query heads.

    q: [B, T, N, D]; k, v: [B, S, K, D] ("bshd") or [B, K, S, D] ("bhsd"); mask: [B, T, S] (True =
    attend). Scores and softmax in float32, as `jax.nn.dot_product_attention`; returns [B, T, N, D].
    """
    b, t, n, d = q.shape
    kh = k.shape[2] if layout == "bshd" else k.shape[1]
    dtype = q.dtype
    # XLA:CPU has no batched bf16 x bf16 -> f32 matmul for some operand layouts; compute those in f32 there.
    op_dtype = _F32 if jax.default_backend() == "cpu" and dtype == jnp.bfloat16 else dtype
    qg = q.reshape(b, t, kh, n // kh, d).astype(op_dtype)
    kv_spec = "bskd" if layout == "bshd" else "bksd"
    scores = jnp.einsum(f"btkgd,{kv_spec}->bkgts", qg, k.astype(op_dtype), preferred_element_type=_F32)
    scores = jnp.where(mask[:, None, None], scores * scale, jnp.finfo(_F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).astype(op_dtype)
    out = jnp.einsum(f"bkgts,{kv_spec}->btkgd", probs, v.astype(op_dtype), preferred_element_type=_F32)
    return out.astype(dtype).reshape(b, t, n, d)


def merge_partial_attention(o1: Array, lse1: Array, o2: Array, lse2: Array) -> Array:
    """Attention over the union of two disjoint key sets, from each set's own attention.

    o_i [B, T, N, D]: softmax-weighted values over key set i; lse_i [B, N, T]: the log-sum-exp of its
    scaled scores (-inf: no keys). With l = logaddexp(lse1, lse2), the softmax over the union is
        out = exp(lse1 - l) o1 + exp(lse2 - l) o2
    (the split-key combine of FlashAttention-2 / flash-decoding: exact up to rounding). float32 result; the
    second set must have keys (l finite), and o1 must be finite where lse1 = -inf.
    """
    l = jnp.logaddexp(lse1, lse2)
    w1, w2 = (jnp.exp(lse - l).transpose(0, 2, 1)[..., None] for lse in (lse1, lse2))
    return w1 * o1.astype(_F32) + w2 * o2.astype(_F32)


def page_table(rows: Array, num_slots: int, length: int, num_rows: int) -> Array:
    """cuDNN paged-attention table [num_rows, 1, P, 1] into a cache [num_slots, length, ...] read as
    num_slots * length / PAGE pages of PAGE positions: entry j of row r is page j of slot rows[r] (clipped:
    entries past the slot's last page repeat it and are never read, as key lengths stop within the slot).
    jax's wrapper needs num_rows * P = every page, so P = num_slots * length / (PAGE * num_rows); rows
    past len(rows) (padding) read slot 0."""
    per_slot = length // PAGE
    per_row = num_slots * per_slot // num_rows
    slot = jnp.zeros((num_rows,), jnp.int32).at[:rows.shape[0]].set(jnp.minimum(rows, num_slots - 1))
    table = slot[:, None] * per_slot + jnp.minimum(jnp.arange(per_row, dtype=jnp.int32), per_slot - 1)
    return table[:, None, :, None]


def table_rows(num_rows: int, num_slots: int, length: int) -> int:
    """The smallest row count >= num_rows that divides the cache's page count (see `page_table`); num_rows <=
    num_slots always has one (num_slots divides the page count)."""
    pages = num_slots * (length // PAGE)
    if num_rows > num_slots:
        raise ValueError(f"cuDNN chunk attention: {num_rows} rows for a cache of {num_slots} slots")
    return next(n for n in range(num_rows, pages + 1) if pages % n == 0)


def chunk_attention_cudnn(q: Array, k_new: Array, v_new: Array, layer_k: Array, layer_v: Array, starts: Array,
                          table: Array, scale: float) -> Array:
    """cuDNN attention of chunk rows (bshd cache): queries q [R, T, N, D] at positions starts[r] + t attend to
    their slot's cache prefix [0, starts[r]) and causally to the chunk's own keys / values k_new, v_new
    [R, T, K, D] (already written to the cache; padding tokens are only seen by padding queries).

    Two fused calls, merged by `merge_partial_attention`: paged attention over the prefix, reading the cache
    in place through `table` (`page_table`, possibly more rows than R) with key lengths starts; causal
    attention of the chunk over itself. jax has no public paged attention yet: this uses
    jax._src.cudnn.fused_attention_stablehlo (present in jax 0.10 and 0.11)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    r, t = q.shape[:2]
    num_rows, length = table.shape[0], layer_k.shape[1]
    pages = layer_k.shape[0] * length // PAGE
    pad_rows = lambda a: jnp.pad(a, ((0, num_rows - r),) + ((0, 0),) * (a.ndim - 1))
    prefix, lse1 = cudnn_attention.paged_attention(
        pad_rows(q), *(buf.astype(q.dtype).reshape((pages, PAGE) + buf.shape[2:]) for buf in (layer_k, layer_v)),
        jnp.full((num_rows,), t, jnp.int32), jnp.maximum(pad_rows(starts), 1).astype(jnp.int32),
        table, table, scale=scale, mask_type=cudnn_attention.MaskType.PADDING, return_residual=True)
    own, lse2 = cudnn_attention.dot_product_attention(
        q, k_new.astype(layer_k.dtype).astype(q.dtype), v_new.astype(layer_v.dtype).astype(q.dtype), scale=scale,
        mask_type=cudnn_attention.MaskType.CAUSAL, return_residual=True)
    # a fresh slot (start 0) has no prefix: its paged call read one unrelated key, weighted 0 here
    has_prefix = starts > 0
    prefix = jnp.where(has_prefix[:, None, None, None], prefix[:r], 0)
    lse1 = jnp.where(has_prefix[:, None, None], lse1[:r], -jnp.inf)
    return merge_partial_attention(prefix, lse1, own, lse2).astype(q.dtype)


def logits(model, hidden: Array) -> Array:
    """float32 logits [S, V] of hidden [S, H]; a tied head contracts with the embedding directly (no
    transposed copy of the [V, H] matrix)."""
    if model.lm_head is None:
        emb = model.embed_tokens.embedding[...]
        return jax.lax.dot_general(hidden, emb.astype(hidden.dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=_F32)
    return jnp.dot(hidden, model.lm_head_kernel().astype(hidden.dtype), preferred_element_type=_F32)


def _check_impl(impl: str, layout: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl!r}; expected one of {IMPLS}")
    if impl != "xla" and layout != "bshd":
        raise ValueError(f"{impl!r} attention needs the 'bshd' cache layout")


class Chunk(NamedTuple):
    """Token chunks appended to slots: tokens [R, T], row r holding num_new[r] real tokens (then padding)
    for slot rows[r] at positions starts[r] + t. A row whose slot index is out of range is padding."""

    tokens: Array
    rows: Array
    starts: Array
    num_new: Array


def decode_step(model, keys, values, tokens: Array, lengths: Array, write: Array, layout: str,
                impl: str = "xla", lane: Chunk | None = None):
    """One token for every slot of the pool: embeds tokens [S] at positions `lengths` [S].

    Rows with write=False are computed but neither written to the cache nor meant to be used. impl "xla"
    attends to the whole cache with a position mask; "cudnn" ("bshd" only) calls cuDNN's fused attention
    through `jax.nn.dot_product_attention` with per-slot key lengths, which reads only each slot's valid
    prefix (one key for a write=False row: the slots that wait for a tool or are free read no cache);
    "pallas" ("bshd" only) runs `decode_attention.decode_attention`, which also writes the rows' keys / values.

    `lane` appends chunks to other slots (ones with write=False) in the same pass: their tokens join the
    decode tokens in every projection and MLP product (the weights are read once for both) and attend as a
    prefill does (see `prefill_chunk`; "xla": key window = the whole cache). Not free: their GEMM rows and
    attention cost about what a separate prefill of them does (docs/benchmarks.md). Returns the final
    normed hidden states [S, H], that of each lane row's last real token [R, H] (None without a lane), and
    the new key / value buffers.
    """
    _check_impl(impl, layout)
    return _run_layers(model, keys, values, (tokens, lengths, write), lane, layout,
                       keys[0].shape[_seq_axis(layout)], impl)


def prefill_chunk(model, keys, values, tokens: Array, rows: Array, starts: Array, num_new: Array,
                  layout: str, window: int | None, impl: str = "xla"):
    """Appends chunks tokens [R, T] (row r: num_new[r] real tokens, then padding) to slots `rows` [R].

    Real token t of row r is written at position starts[r] + t. Rows whose slot index is out of range
    (padding rows) and padding tokens are not written. impl "xla": einsum attention over the first `window`
    positions of each row's slot (static; the caller guarantees starts + num_new <= window); "cudnn" and
    "pallas" ("bshd" only; `window` unused) read the slot's prefix in place: `chunk_attention_cudnn`,
    `decode_attention.chunk_attention`.
    Returns the hidden state [R, H] of each row's last real token and the new key / value buffers.
    """
    _check_impl(impl, layout)
    _, hidden, keys, values = _run_layers(model, keys, values, None, Chunk(tokens, rows, starts, num_new),
                                          layout, window, impl)
    return hidden, keys, values


def _run_layers(model, keys, values, slots, chunk: Chunk | None, layout: str, window: int | None, impl: str):
    """The layers over one flat batch of single-token rows: every token of `chunk` (attending to its slot up to its
    own position: "xla" over the first `window` positions, "cudnn" by `chunk_attention_cudnn`, "pallas" by
    `decode_attention.chunk_attention`), then one per slot (slots = (tokens [S], lengths [S], write [S]), see
    `decode_step`). Each layer writes all the new keys / values, then attends: every read of a cache buffer comes
    after every write to it, so XLA updates it in place ("pallas": the chunk kernel writes and reads in one call,
    then the decode kernel does, both reading the one projection output in place and writing one attention
    output). Returns the final normed hidden states of the slot rows [S, H] and of each chunk row's last real token
    [R, H] (None where a part is absent)."""
    scale = model.config.head_dim ** -0.5
    max_len = keys[0].shape[_seq_axis(layout)]
    tokens, positions = [], []
    num_slots = 0 if slots is None else slots[0].shape[0]
    r, t = (0, 0) if chunk is None else chunk.tokens.shape
    if chunk is not None:
        offsets = jnp.arange(t, dtype=jnp.int32)
        chunk_pos = chunk.starts[:, None] + offsets
        if impl == "pallas":  # the chunk kernel's RoPE table, shared by every layer
            chunk_cos, chunk_sin = qwen3.rotary_cos_sin(chunk_pos, model.config.rope_theta, model.config.head_dim,
                                                        model.dtype)
        else:
            chunk_write = jnp.where(offsets[None, :] < chunk.num_new[:, None], chunk_pos, max_len)
            if impl == "cudnn":
                table = page_table(chunk.rows, keys[0].shape[0], max_len, table_rows(r, keys[0].shape[0], max_len))
            else:
                chunk_mask = jnp.arange(window, dtype=jnp.int32)[None, None, :] <= chunk_pos[:, :, None]
        tokens.append(chunk.tokens.reshape(r * t, 1))
        positions.append(chunk_pos.reshape(r * t, 1))
    if slots is not None:
        slot_tokens, lengths, write = slots
        tokens.append(slot_tokens[:, None])
        positions.append(lengths[:, None])
        if impl == "pallas":  # the kernel writes the slot rows' keys / values; their RoPE table, shared by every layer
            cos, sin = qwen3.rotary_cos_sin(lengths, model.config.rope_theta, model.config.head_dim, model.dtype)
        else:
            slot_rows = jnp.arange(num_slots, dtype=jnp.int32)
            slot_write = jnp.where(write, lengths, max_len)[:, None]
        if impl == "xla":
            slot_mask = jnp.arange(max_len, dtype=jnp.int32)[None, None, :] <= lengths[:, None, None]
        elif impl == "cudnn":
            # cuDNN reads each slot's first kv_lengths keys: a slot that writes nothing this step (stopped, free)
            # reads one, so idle slots cost no KV bandwidth (their outputs are discarded by the caller).
            kv_lengths = jnp.where(write, jnp.minimum(lengths + 1, max_len), 1).astype(jnp.int32)

    def split(a):
        """[R*T + S, 1, ...] -> the slot rows [S, 1, ...] and the chunk rows [R, T, ...]."""
        return a[r * t:], (a[:r * t].reshape((r, t) + a.shape[2:]) if chunk is not None else None)

    def join(out_s, out_c):
        """The attention outputs of the chunk rows [R, T, N, D] and the slot rows [S, N, D] as one flat batch."""
        outs = ([out_c.reshape((r * t, 1) + out_c.shape[2:])] if chunk is not None else []) + (
            [out_s[:, None]] if num_slots else [])
        return jnp.concatenate(outs) if len(outs) > 1 else outs[0]

    def attend_pallas(attn, h, layer_k, layer_v):
        """The kernels finish the raw grouped projections (norms, RoPE, cache writes) and attend, reading the
        projections of the flat batch in place and writing one output."""
        grouped = attn.grouped_qkv(h)[:, 0]                 # [R*T + S, K, G + 2, D]
        norms = dict(q_norm=attn.q_norm.weight[...], k_norm=attn.k_norm.weight[...], eps=attn.q_norm.eps,
                     scale=scale)
        out = None
        if chunk is not None:  # first: the slots' kernel reads the cache after the chunk's writes
            out, layer_k, layer_v = decode_attention.chunk_attention(
                grouped, layer_k, layer_v, chunk.rows, chunk.starts, chunk.num_new, chunk_cos, chunk_sin, **norms)
        if num_slots:
            out, layer_k, layer_v = decode_attention.decode_attention(
                grouped, layer_k, layer_v, lengths, write, cos, sin, first=r * t, out=out, **norms)
        return out[:, None], (layer_k, layer_v)

    def attend(attn, h, pos, layer_k, layer_v):
        if impl == "pallas":
            return attend_pallas(attn, h, layer_k, layer_v)
        (q_s, q_c), (k_s, k_c), (v_s, v_c) = [split(a) for a in attn.project(h, pos)]
        writes = (([(chunk.rows, chunk_write, k_c, v_c)] if chunk is not None else [])
                  + ([(slot_rows, slot_write, k_s, v_s)] if num_slots else []))
        for rows, pos, new_k, new_v in writes:
            layer_k = write_kv(layer_k, rows, pos, new_k, layout)
            layer_v = write_kv(layer_v, rows, pos, new_v, layout)
        out_s = out_c = None
        if num_slots:
            if impl == "cudnn":
                out_s = jax.nn.dot_product_attention(
                    q_s, layer_k.astype(q_s.dtype), layer_v.astype(q_s.dtype), scale=scale,
                    key_value_seq_lengths=kv_lengths, implementation="cudnn")[:, 0]
            else:
                out_s = attention(q_s, layer_k, layer_v, slot_mask, layout, scale)[:, 0]
        if chunk is not None:
            if impl == "cudnn":
                out_c = chunk_attention_cudnn(q_c, k_c, v_c, layer_k, layer_v, chunk.starts, table, scale)
            else:
                k_win, v_win = (_rows_window(buf, chunk.rows, window, layout) for buf in (layer_k, layer_v))
                out_c = attention(q_c, k_win, v_win, chunk_mask, layout, scale)
        return join(out_s, out_c), (layer_k, layer_v)

    x = model.embed_tokens(jnp.concatenate(tokens))
    positions = jnp.concatenate(positions)
    next_norms = [layer.input_layernorm for layer in model.layers[1:]] + [model.norm]
    h = model.layers[0].input_layernorm(x)
    new_keys, new_values = [], []
    for layer, next_norm, layer_k, layer_v in zip(model.layers, next_norms, keys, values):
        x, h, (layer_k, layer_v) = layer.step(
            x, h, positions, lambda attn, h, pos, lk=layer_k, lv=layer_v: attend(attn, h, pos, lk, lv), next_norm)
        new_keys.append(layer_k)
        new_values.append(layer_v)
    slot_hidden, chunk_hidden = split(h)  # h: the final norm of every row
    slot_hidden = slot_hidden[:, 0] if num_slots else None
    if chunk is not None:
        chunk_hidden = chunk_hidden[jnp.arange(r), jnp.maximum(chunk.num_new - 1, 0)]
    return slot_hidden, chunk_hidden, tuple(new_keys), tuple(new_values)


def _rows_window(buf: Array, rows: Array, window: int, layout: str) -> Array:
    """The first `window` positions of slots `rows` (a gather of just those rows)."""
    taken = jnp.take(buf, rows, axis=0, mode="clip")
    return taken[:, :window] if layout == "bshd" else taken[:, :, :window]
