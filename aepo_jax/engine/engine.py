"""The sampling engine: a fixed pool of sequence slots over one KV cache, driven by compiled calls.

Everything on the device is one pytree, `EngineState` (the per-layer KV buffers, and per slot: length,
hidden state of the last token, PRNG key, recent-token history, stop state, sampling settings). The
`Engine` class holds it and calls jitted pure functions that take the model weights as an argument
and donate the state, so the cache is updated in place and new weights never recompile anything:

  prefill(slots, chunks)  append token chunks to chosen slots at their current positions (a prompt into a
                          free slot; a tool result into a waiting one). Chunks are padded to a bucket length
                          and the number of rows to a power of two or 1.5x one, so a few shapes cover every call.
  decode(max_steps)       a `lax.while_loop` that samples one token per running slot per step. A slot stops
                          on EOS, on a stop string (token ids, see `stops`) or at its length budget, and then
                          idles (masked) inside the loop; the loop returns when `need` slots have stopped
                          during the call (need = max(min_waiting, ceil(wait_fraction * running)); 1 = "any
                          slot", wait_fraction=1 = "all"), when no slot runs, or after max_steps. The new
                          tokens, their log-probs and entropies (see `sampling`), and why / where each slot
                          stopped come back in one `DecodeResult` of device arrays: no per-token host trip.
                          decode(max_steps, appends={slot: tokens}) first appends tool results inside the
                          loop: a few slots' next tokens ride along in each step's weight reads (the "lane")
                          while the other slots decode, instead of a prefill call that idles every slot.
  fork(src, dst)          copy slots (cache rows, length, history, stop state, settings) into free slots; the
                          child's key is derived from the parent's (fold_in) unless same_key=True.
  release(slots)          free slots.
  rewind(slots, lengths)  cut slots back to shorter lengths with a new seed (an AEPO branch re-samples
                          from its fork's prefix).

The next token of a slot is drawn from its stored hidden state (`hidden`, the final normed state of its
last cached token), so a prefill ends by storing the hidden state of the chunk's last real token, and each
decode step stores that of the token it just appended. Sampled tokens, including EOS and stop-string tokens,
are written to the cache, so a tool result appended after `</search>` follows it directly.

Randomness: each slot has a key; the token at position p is drawn with fold_in(key, p). A forked slot that
keeps its parent's key therefore reproduces the parent's continuation token for token.

Performance (see tools/benchmark_decode.py): a decode step reads the weights once and each running slot's KV
cache once (attention="pallas" / "cudnn": only its valid prefix, and nothing for a stopped or free slot; "xla":
every slot's whole max_len), writes one KV row per running slot in place (the compiled loop holds no copy of a
cache buffer: `hlo.cache_copies`; "pallas" writes it inside its attention kernel, which also applies the q / k
norms and RoPE: `decode_attention`), and computes logits only for the [S] last tokens. A prefill's arguments go to the
device, and a decode's results come back, as one packed int32 array each (`packing`: one transfer). Prefill
compiles once per (rows, chunk) bucket (and key window with "xla" attention), decode once per (output width,
sampling mode, appends or not: a call with appends runs the executable with the lane loop; session 9); fork
and release once per row bucket. Appends through the decode lane (lane_rows x lane_width tokens per step,
static) compile nothing new. On an H100 the lane costs about what the prefill call it replaces does
(docs/benchmarks.md, session 6): at 64 + 512 rows (8 x 64, the default then) the GEMMs no longer cost only their
weights. With "pallas" / "cudnn" attention appended rows read their slot's cache in place (cuDNN as pages, the
Pallas chunk kernel in blocks of a page: the buffers' length is max_len rounded up to whole pages,
`forward.cache_length`). On a GPU the decode's while loops run inside a
CUDA graph, so a decode call returns once launched and the host can queue the next one (session 7).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from aepo_jax.engine import decode_attention, forward, packing, sampling, stops as stops_lib
from aepo_jax.engine.sampling import SamplingParams
from aepo_jax.models import qwen3

Array = jax.Array

# Why a slot stopped (EngineState.reason, DecodeResult.reason).
RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
REASONS = {RUNNING: None, EOS: "eos", STOP: "stop", LENGTH: "length"}
# Per-slot settings a prefill sets (a fresh slot always; an appended-to one where given).
SETTINGS = ("temperature", "top_p", "top_k", "limit", "stops", "eos_stop")
# DecodeOutput fields that are one number per call (packed as a column repeated on every row).
SCALAR_RESULTS = ("steps", "lane_steps")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    """Device state of the slot pool. Every leaf but `keys` / `values` is per slot (leading axis S)."""

    keys: tuple[Array, ...]    # per layer, see forward.cache_shape
    values: tuple[Array, ...]
    lengths: Array             # [S] int32 cached positions (= position of the next token)
    hidden: Array              # [S, H] final normed hidden state of the last cached token
    rng: Array                 # [S, *key] uint32 PRNG key data
    history: Array             # [S, W] int32 last W sampled tokens since the last prefill, -1 = none
    running: Array             # [S] bool: the slot samples when decode runs
    reason: Array              # [S] int32 why the slot stopped (RUNNING while it runs)
    stop_id: Array             # [S] int32 index of the stop string that stopped it, else -1
    limit: Array               # [S] int32 length budget: the slot stops when lengths reaches it
    temperature: Array         # [S] f32 (0 = greedy)
    top_p: Array               # [S] f32
    top_k: Array               # [S] int32
    stops: Array               # [S, num_stop_strings] bool: stop strings enabled for the slot
    eos_stop: Array            # [S] bool: EOS ids stop the slot


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """What one decode call produced, per slot. The compiled call returns it packed into one int32 array
    (`packing`: one device-to-host transfer); `DecodeResult` fetches and unpacks it."""

    tokens: Array      # [S, W] int32 new tokens of the call, -1 past counts
    logprobs: Array    # [S, W] f32 log p(token) under softmax(logits / T), 0 past counts
    entropies: Array   # [S, W] f32 full-vocabulary entropy of softmax(logits / T), 0 past counts
    counts: Array      # [S] int32 new tokens of each slot
    stopped: Array     # [S] bool: the slot stopped during this call
    reason: Array      # [S] int32 the slot's stop state after the call (RUNNING, EOS, STOP, LENGTH)
    stop_id: Array     # [S] int32 stop-string index when reason == STOP, else -1
    lengths: Array     # [S] int32 slot lengths after the call
    steps: Array       # [] int32 decode steps run
    lane_steps: Array  # [] int32 steps that absorbed appended tokens through the lane (some also sampled)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of an engine, closed over by its compiled functions."""

    graphdef: Any
    param_treedef: Any     # the weights travel as a flat tuple of arrays (see Engine.set_weights)
    layout: str
    eos_ids: tuple[int, ...]
    stop_table: tuple      # (table, valid, owner) as nested tuples
    key_impl: str | None
    seed: int
    attention: str
    unroll: int
    lane_rows: int         # appended-token rows absorbed per decode step (0: appends are prefilled first)
    lane_width: int        # tokens per lane row


# --------------------------------------------------------------------------------- compiled functions


def _model(spec: _Spec, weights):
    return nnx.merge(spec.graphdef, jax.tree.unflatten(spec.param_treedef, weights))


def _wrap(data, impl):
    return jax.random.wrap_key_data(data, impl=impl) if impl else jax.random.wrap_key_data(data)


def _request_key_data(spec: _Spec, seeds: Array) -> Array:
    base = jax.random.key(spec.seed, impl=spec.key_impl) if spec.key_impl else jax.random.key(spec.seed)
    return jax.vmap(lambda s: jax.random.key_data(jax.random.fold_in(base, s)))(seeds)


def _put(arr: Array, rows: Array, new) -> Array:
    return arr.at[rows].set(jnp.broadcast_to(new, (rows.shape[0],) + arr.shape[1:]).astype(arr.dtype),
                            mode="drop")


def _put_if(arr: Array, rows: Array, cond: Array, new) -> Array:
    old = jnp.take(arr, rows, axis=0, mode="clip")
    new = jnp.broadcast_to(new, old.shape).astype(arr.dtype)
    cond = cond.reshape(cond.shape + (1,) * (old.ndim - 1))
    return _put(arr, rows, jnp.where(cond, new, old))


def _restarted(state: EngineState, mask) -> dict:
    """The stop state of the slots in `mask` once tokens are appended to them (a prompt, a tool result), by a
    prefill or inside a decode call alike: they run again, with no sampled history and no stop reason."""
    return dict(history=jnp.where(mask[:, None], -1, state.history), running=state.running | mask,
                reason=jnp.where(mask, RUNNING, state.reason), stop_id=jnp.where(mask, -1, state.stop_id))


def _prefill_impl(spec: _Spec, weights, state: EngineState, packed, *, layout, window: int):
    """packed: the call's per-row arguments in one int32 array (see `packing`): tokens [R, T], rows, num_new,
    fresh, seeds, and for each setting in SETTINGS its value and a flag `<name>_set`: the setting is
    overwritten only in the rows where the flag is set."""
    args = packing.unpack(packed, layout)
    tokens, rows, num_new, fresh, seeds = (args[k] for k in ("tokens", "rows", "num_new", "fresh", "seeds"))
    settings = {name: (args[name + "_set"], args[name]) for name in SETTINGS}
    model = _model(spec, weights)
    starts = jnp.where(fresh, 0, jnp.take(state.lengths, rows, mode="clip"))
    hidden, keys, values = forward.prefill_chunk(model, state.keys, state.values, tokens, rows, starts,
                                                 num_new, spec.layout, window, spec.attention)
    updates = {name: _put_if(getattr(state, name), rows, flag, value)
               for name, (flag, value) in settings.items()}
    return dataclasses.replace(
        state, keys=keys, values=values,
        lengths=_put(state.lengths, rows, starts + num_new),
        hidden=_put(state.hidden, rows, hidden),
        rng=_put_if(state.rng, rows, fresh, _request_key_data(spec, seeds)),
        **_restarted(state, jnp.zeros_like(state.running).at[rows].set(True, mode="drop")),
        **updates)


def _decode_impl(spec: _Spec, weights, state: EngineState, max_steps, min_waiting, wait_fraction, appends, *,
                 width: int, greedy_only: bool, candidates: int, lane_loop: bool):
    """appends [S, 1 + capacity] int32: per slot the number of tokens to append, then the tokens. A slot with
    tokens to append first absorbs them (see `_lane`), then samples like the others. lane_loop=False compiles
    no lane loop, for calls without appends: on an H100, with the lane loop in the same program the greedy plain
    decode steps took 3.505 instead of 3.376 ms (cause not found; not seen when sampling at T = 1: 3.444 vs
    3.437 ms; docs/benchmarks.md, sessions 9 and 10)."""
    model = _model(spec, weights)
    num_slots = state.lengths.shape[0]
    table, valid, owner = (np.asarray(a) for a in spec.stop_table)
    eos_ids = jnp.asarray(spec.eos_ids or (-1,), jnp.int32)
    pending, pending_len = appends[:, 1:], appends[:, 0]
    appending = pending_len > 0

    # A slot already at its budget stops before sampling anything (one that appends is checked once its
    # tokens are in).
    at_limit = state.running & ~appending & (state.lengths >= state.limit)
    restarted = _restarted(state, appending)
    n_start = jnp.sum(restarted["running"].astype(jnp.int32))
    need = jnp.maximum(min_waiting, jnp.ceil(wait_fraction * n_start).astype(jnp.int32))
    need = jnp.clip(need, 1, jnp.maximum(n_start, 1))
    init = dict(
        step=jnp.int32(0), keys=state.keys, values=state.values, lengths=state.lengths,
        hidden=state.hidden, history=restarted["history"], running=restarted["running"] & ~at_limit,
        reason=jnp.where(at_limit, LENGTH, restarted["reason"]), stop_id=restarted["stop_id"], stopped=at_limit,
        absorbed=jnp.zeros((num_slots,), jnp.int32), counts=jnp.zeros((num_slots,), jnp.int32),
        lane_steps=jnp.int32(0),
        tokens=jnp.full((num_slots, width), -1, jnp.int32),
        logprobs=jnp.zeros((num_slots, width), jnp.float32),
        entropies=jnp.zeros((num_slots, width), jnp.float32),
    )

    def cond(c):
        return ((c["step"] < max_steps) & jnp.any(c["running"])
                & (jnp.sum(c["stopped"].astype(jnp.int32)) < need))

    def step(c, active, lane: bool):
        """One token for every running slot (a no-op where `active` is False); with `lane`, also the next
        piece of the appended tokens of up to spec.lane_rows slots."""
        absorbing = c["absorbed"] < pending_len
        run = c["running"] & ~absorbing & active
        logits = forward.logits(model, c["hidden"])
        step_keys = jax.vmap(jax.random.fold_in)(_wrap(state.rng, spec.key_impl), c["lengths"])
        tok, logp, ent = sampling.sample(logits, state.temperature, state.top_k, state.top_p, step_keys,
                                         greedy_only=greedy_only, candidates=candidates)
        tok = jnp.where(run, tok, 0)
        # each running slot's next column (a slot that absorbed appended tokens starts sampling late)
        column = jnp.where(run, c["counts"], width)

        def col(buf, v):
            return buf.at[jnp.arange(num_slots), column].set(v.astype(buf.dtype), mode="drop")

        history = stops_lib.push_history(c["history"], tok, run)
        eos = run & state.eos_stop & jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        hit, which = stops_lib.match(history, state.stops, table, valid, owner)
        hit = run & hit & ~eos
        new_len = c["lengths"] + run.astype(jnp.int32)
        full = run & (new_len >= state.limit)
        why = jnp.where(eos, EOS, jnp.where(hit, STOP, jnp.where(full, LENGTH, RUNNING)))
        chunk = _lane(spec, pending, pending_len, c["absorbed"], c["lengths"]) if lane else None
        hidden, lane_hidden, keys, values = forward.decode_step(
            model, c["keys"], c["values"], tok, c["lengths"], run, spec.layout, spec.attention, lane=chunk)
        hidden = jnp.where(run[:, None], hidden.astype(c["hidden"].dtype), c["hidden"])
        absorbed = c["absorbed"]
        if lane:  # the lane's slots are not running: their rows above were no-ops
            new_len = new_len.at[chunk.rows].add(chunk.num_new, mode="drop")
            absorbed = absorbed.at[chunk.rows].add(chunk.num_new, mode="drop")
            hidden = hidden.at[chunk.rows].set(lane_hidden.astype(hidden.dtype), mode="drop")
            # a slot whose appended tokens are all in starts sampling at the next step, unless at its budget
            done_now = absorbing & (absorbed >= pending_len)
            over = done_now & (new_len >= state.limit)
            why = jnp.where(over, LENGTH, why)
        done = why != RUNNING
        return dict(
            step=c["step"] + active.astype(jnp.int32), keys=keys, values=values, lengths=new_len,
            hidden=hidden, history=history, running=c["running"] & ~done,
            reason=jnp.where(done, why, c["reason"]), stop_id=jnp.where(hit, which, c["stop_id"]),
            stopped=c["stopped"] | done, absorbed=absorbed, counts=c["counts"] + run.astype(jnp.int32),
            lane_steps=c["lane_steps"] + int(lane),
            tokens=col(c["tokens"], tok), logprobs=col(c["logprobs"], logp),
            entropies=col(c["entropies"], ent),
        )

    def body(c):
        # `unroll` steps per loop iteration: the exit test runs once per iteration (a device-to-host sync on
        # GPU unless the loop runs as a CUDA graph, as the engine compiles it); the later steps of an
        # iteration are masked no-ops once the loop should have ended.
        c = step(c, jnp.bool_(True), lane=False)
        for _ in range(spec.unroll - 1):
            c = step(c, cond(c), lane=False)
        return c

    c = init
    if lane_loop:
        # First the steps that absorb appended tokens, sampling alongside while the call should go on,
        # until every append is in (so none is left for the next call); then plain decode steps.
        c = lax.while_loop(lambda c: jnp.any(c["absorbed"] < pending_len),
                           lambda c: step(c, cond(c), lane=True), c)
    c = lax.while_loop(cond, body, c)
    new_state = dataclasses.replace(
        state, keys=c["keys"], values=c["values"], lengths=c["lengths"], hidden=c["hidden"],
        history=c["history"], running=c["running"], reason=c["reason"], stop_id=c["stop_id"])
    out = DecodeOutput(tokens=c["tokens"], logprobs=c["logprobs"], entropies=c["entropies"],
                       counts=c["counts"], stopped=c["stopped"], reason=c["reason"], stop_id=c["stop_id"],
                       lengths=c["lengths"], steps=c["step"], lane_steps=c["lane_steps"])
    fields = _result_fields(out)
    if packing.layout(fields) != _result_layout(width):  # trace time: the host unpacks with _result_layout
        raise AssertionError(f"decode result layout {packing.layout(fields)} != {_result_layout(width)}")
    return new_state, packing.pack(fields)


def _lane(spec: _Spec, pending, pending_len, absorbed, lengths) -> forward.Chunk:
    """The next lane_width appended tokens of up to lane_rows slots that still have some (lowest slot ids
    first), at each slot's current length; unused rows point past the pool (not written)."""
    num_slots, capacity = pending.shape
    left = pending_len - absorbed
    rows = jnp.nonzero(left > 0, size=spec.lane_rows, fill_value=num_slots)[0].astype(jnp.int32)
    clipped = jnp.minimum(rows, num_slots - 1)
    offsets = jnp.take(absorbed, clipped)[:, None] + jnp.arange(spec.lane_width, dtype=jnp.int32)
    tokens = jnp.take_along_axis(jnp.take(pending, clipped, axis=0), jnp.minimum(offsets, capacity - 1), axis=1)
    num_new = jnp.where(rows < num_slots, jnp.minimum(jnp.take(left, clipped), spec.lane_width), 0)
    return forward.Chunk(tokens, rows, jnp.take(lengths, clipped), num_new)


def _result_fields(out: DecodeOutput) -> dict:
    """A decode result's fields as per-row arrays (the step counts repeated on every row), for `packing`."""
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    xp = np if isinstance(out.counts, np.ndarray) else jnp
    for name in SCALAR_RESULTS:
        fields[name] = xp.broadcast_to(fields[name], out.counts.shape)
    return fields


@functools.lru_cache(maxsize=None)
def _result_layout(width: int):
    """The packed layout of a decode result with `width` token columns (the dtypes `_decode_impl` uses)."""
    row = lambda dtype, *shape: np.zeros((1,) + shape, dtype)
    return packing.layout(_result_fields(DecodeOutput(
        tokens=row(np.int32, width), logprobs=row(np.float32, width), entropies=row(np.float32, width),
        counts=row(np.int32), stopped=row(np.bool_), reason=row(np.int32), stop_id=row(np.int32),
        lengths=row(np.int32), **{name: np.zeros((), np.int32) for name in SCALAR_RESULTS})))


def _fork_impl(spec: _Spec, state: EngineState, src, dst, same_key, fork_ids):
    copy = lambda a: a.at[dst].set(jnp.take(a, src, axis=0, mode="clip"), mode="drop")
    new = jax.tree.map(copy, state)
    parent = _wrap(jnp.take(state.rng, src, axis=0, mode="clip"), spec.key_impl)
    child = jax.random.key_data(jax.vmap(jax.random.fold_in)(parent, fork_ids))
    rng = jnp.where(same_key.reshape((-1,) + (1,) * (child.ndim - 1)), jax.random.key_data(parent), child)
    return dataclasses.replace(new, rng=new.rng.at[dst].set(rng, mode="drop"))


def _idled(state: EngineState, rows, lengths) -> EngineState:
    """Slots cut to `lengths` that sample nothing until tokens are appended, with no history or stop reason."""
    return dataclasses.replace(
        state, lengths=_put(state.lengths, rows, lengths), running=_put(state.running, rows, False),
        reason=_put(state.reason, rows, RUNNING), stop_id=_put(state.stop_id, rows, -1),
        history=_put(state.history, rows, -1))


def _rewind_impl(spec: _Spec, state: EngineState, rows, lengths, seeds):
    """Cuts slots back to `lengths`, idle until their next prefill, with keys derived from `seeds`."""
    state = _idled(state, rows, lengths)
    return dataclasses.replace(state, rng=_put(state.rng, rows, _request_key_data(spec, seeds)))


def _release_impl(state: EngineState, rows):
    return _idled(state, rows, 0)


# ------------------------------------------------------------------------------------------- results


class DecodeResult:
    """The outcome of one `Engine.decode` call.

    `output` is the call's packed int32 device array (the call is asynchronous); any other attribute fetches
    it once (one transfer) and unpacks the `DecodeOutput` fields as numpy arrays: tokens / logprobs /
    entropies [S, W], counts, stopped, reason, stop_id, lengths [S], steps and lane_steps (scalars). The fetch
    frees `output` on the device, so that a decode call dispatched after it can reuse that buffer: its CUDA
    graph then needs no re-recording (a moved result buffer costs 1.5-3.4 ms of host time per call on an H100,
    docs/benchmarks.md session 13; on the rollout's critical path where its loop reads a result first).
    """

    def __init__(self, engine: "Engine", output: Array, width: int, version: int):
        self.output = output
        self._engine = engine
        self._width = width
        self._version = version
        self._host: dict[str, np.ndarray] | None = None

    def fetch(self) -> "DecodeResult":
        if self._host is None:
            self._host = packing.unpack(np.asarray(jax.device_get(self.output)), _result_layout(self._width))
            self.output.delete()
            for name in SCALAR_RESULTS:
                self._host[name] = self._host[name][0]
            self.__dict__.update(self._host)  # later reads are plain attributes, not __getattr__ calls
            self._engine._learn_lengths(self._host["lengths"], self._host["reason"], self._version)
        return self

    def ready(self) -> bool:
        """Whether the call has finished (without waiting for it)."""
        return self._host is not None or self.output.is_ready()

    def __getattr__(self, name):
        if name.startswith("_") or name not in {f.name for f in dataclasses.fields(DecodeOutput)}:
            raise AttributeError(name)
        return self.fetch()._host[name]

    def stopped_slots(self) -> list[int]:
        """Slots that stopped during this call (they now wait for a prefill or a release)."""
        return [int(s) for s in np.flatnonzero(self.stopped)]

    def new_tokens(self, slot: int) -> np.ndarray:
        return self.tokens[slot, :self.counts[slot]]

    def new_logprobs(self, slot: int) -> np.ndarray:
        return self.logprobs[slot, :self.counts[slot]]

    def new_entropies(self, slot: int) -> np.ndarray:
        return self.entropies[slot, :self.counts[slot]]

    def finish_reason(self, slot: int) -> str | None:
        """None (still running), 'eos', 'length', or the name of the stop string that stopped the slot."""
        reason = int(self.reason[slot])
        if reason == STOP:
            return self._engine.stop_table.names[int(self.stop_id[slot])]
        return REASONS[reason]


@dataclasses.dataclass
class Generation:
    """One completion of `Engine.generate`."""

    tokens: list[int]
    logprobs: np.ndarray
    entropies: np.ndarray
    finish_reason: str       # 'eos', 'length' or a stop-string name


# -------------------------------------------------------------------------------------------- engine


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_buckets(max_len: int) -> tuple[int, ...]:
    """Chunk-length buckets 16, 64, 256, ... (x4), capped by and ending with max_len."""
    out, b = [], 16
    while b < max_len:
        out.append(b)
        b *= 4
    return tuple(out) + (max_len,)


class Engine:
    """A pool of `num_slots` sequences of up to `max_len` tokens for one Qwen3 model.

    Args:
      model: a `qwen3.Qwen3` (separate projections); its compute dtype is the engine's activation dtype. Only
        its weights are used (see `set_weights`), the module itself is not kept. The engine holds them with
        each layer's q|k|v and gate|up kernels concatenated (`qwen3.fuse_projections`: one GEMM each).
      num_slots, max_len: pool size (static).
      cache_dtype: KV-cache dtype (bf16 default).
      eos_ids: token ids that end a sequence (e.g. Qwen3's <|im_end|> and <|endoftext|>).
      stop_strings: named stop strings, see `stops.StopTable` (token ids, or text with `tokenizer`).
      prefill_buckets: chunk lengths prefill pads to (default 16, 64, 256, ..., max_len).
      attention: "pallas" (GPU, bf16/f16, "bshd" layout: each decode step's q / k norms, RoPE, key / value
        write and attention over each slot's valid prefix run as one Pallas kernel per layer,
        `decode_attention`; appended chunks attend in one pass over their slot's cache in place,
        `decode_attention.chunk_attention`), "cudnn" (cuDNN fused attention, same
        requirements: decode passes per-slot key lengths, so each slot reads only its valid prefix; appended
        chunks read their slot's prefix in place as cache pages, see `forward.chunk_attention_cudnn`) or "xla"
        (einsum attention with a position mask, float32 scores; any backend). None = "pallas" on GPU when the
        dtypes and head_dim allow (`decode_attention.supports`), else "cudnn" on GPU, else "xla".
      layout: KV-cache layout, "bshd" or "bhsd" (see `forward`). None = "bshd" with pallas / cudnn attention,
        else "bhsd" (head-major: the XLA attention's batch-matmul layout).
      seed: base of the per-request PRNG keys; key_impl: a `jax.random` implementation name (None = default).
      unroll: decode steps per while-loop iteration (the exit test runs once per iteration).
      lane_rows, lane_width, lane_capacity: the in-loop append lane of `decode(appends=...)`: each decode
        step absorbs up to lane_width appended tokens of each of up to lane_rows slots; a slot's appends of
        up to lane_capacity tokens go through the lane, longer ones are prefilled before the loop.
        lane_rows=0: every append is prefilled (a separate call before the loop).
    """

    def __init__(self, model, *, num_slots: int, max_len: int, cache_dtype=jnp.bfloat16,
                 eos_ids: Sequence[int] = (), stop_strings: Mapping[str, Any] | Sequence[str] | None = None,
                 tokenizer=None, prefill_buckets: Sequence[int] | None = None, layout: str | None = None,
                 seed: int = 0, key_impl: str | None = None, attention: str | None = None, unroll: int = 1,
                 lane_rows: int = 4, lane_width: int = 64, lane_capacity: int = 256):
        if num_slots < 1 or max_len < 2:
            raise ValueError(f"Engine needs num_slots >= 1 and max_len >= 2, got {num_slots}, {max_len}")
        config = model.config
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        half = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        if attention is None:
            gpu_dtypes = (jax.default_backend() == "gpu" and jnp.dtype(model.dtype) in half
                          and jnp.dtype(cache_dtype) == jnp.dtype(model.dtype))
            attention = ("xla" if not gpu_dtypes else
                         "pallas" if decode_attention.supports(config.head_dim) else "cudnn")
        if attention not in forward.IMPLS:
            raise ValueError(f"unknown attention {attention!r}; expected one of {forward.IMPLS}")
        if layout is None:
            layout = "bhsd" if attention == "xla" else "bshd"
        if attention != "xla" and layout != "bshd":
            raise ValueError(f"attention={attention!r} needs layout='bshd'")
        if attention != "xla" and not (jnp.dtype(model.dtype) in half
                                       and jnp.dtype(cache_dtype) == jnp.dtype(model.dtype)):
            raise ValueError(f"attention={attention!r} needs a bf16 / f16 model with a cache of the same dtype, "
                             f"got model {jnp.dtype(model.dtype).name}, cache {jnp.dtype(cache_dtype).name}")
        if attention == "pallas" and not decode_attention.supports(config.head_dim):
            raise ValueError(f"attention='pallas' needs a head_dim that is a power of two >= 32, got "
                             f"{config.head_dim} (use 'cudnn')")
        if unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {unroll}")
        if lane_rows < 0 or lane_width < 1 or lane_capacity < 1:
            raise ValueError(f"lane_rows must be >= 0 and lane_width, lane_capacity >= 1, got {lane_rows}, "
                             f"{lane_width}, {lane_capacity}")
        self.lane_capacity = min(lane_capacity, max_len) if lane_rows else 0
        self.lane_rows = int(min(lane_rows, num_slots))
        self.lane_width = int(min(lane_width, max_len))
        forward.cache_shape(config, 1, 1, layout)  # validates layout
        self.attention = attention
        self.config = config
        self.num_slots, self.max_len, self.layout = num_slots, max_len, layout
        self.eos_ids = tuple(int(t) for t in eos_ids)
        for t in self.eos_ids:
            if not 0 <= t < config.vocab_size:
                raise ValueError(f"eos id {t} outside the vocabulary [0, {config.vocab_size})")
        self.stop_table = stops_lib.StopTable(stop_strings, tokenizer)
        for alts in self.stop_table.alternatives:
            for alt in alts:
                if max(alt) >= config.vocab_size:
                    raise ValueError(f"stop-string token id {max(alt)} outside the vocabulary")
        buckets = sorted({min(int(b), max_len) for b in (prefill_buckets or default_buckets(max_len))}
                         | {max_len})
        if buckets[0] < 1:
            raise ValueError(f"prefill_buckets must be positive, got {prefill_buckets}")
        self.buckets = tuple(buckets)
        self.cache_dtype = jnp.dtype(cache_dtype)
        source_leaves, self._source_treedef = jax.tree.flatten(nnx.state(model))
        self._source_shapes = [(a.shape, a.dtype) for a in source_leaves]
        graphdef, params = nnx.split(qwen3.fuse_projections(model))
        leaves, treedef = jax.tree.flatten(params)
        self._weights = tuple(leaves)
        self.dtype = jnp.dtype(model.dtype)
        spec = _Spec(graphdef=graphdef, param_treedef=treedef, layout=layout, eos_ids=self.eos_ids,
                     stop_table=tuple(tuple(map(tuple, a)) if a.ndim == 2 else tuple(a)
                                      for a in (self.stop_table.table, self.stop_table.valid,
                                                self.stop_table.owner)),
                     key_impl=key_impl, seed=int(seed), attention=attention, unroll=int(unroll),
                     lane_rows=self.lane_rows, lane_width=self.lane_width)
        self._spec = spec
        # Command buffers (CUDA graphs) are off for the prefill: updating and launching its graph cost more
        # host time than launching its kernels one by one (H100: 13.84 -> 12.96 ms per call). The decode's
        # while loops go into the graph too (conditional nodes): by default XLA:GPU tests a loop's exit
        # condition on the host after every iteration, so a decode call would return only when its loop
        # ends; as a graph it returns once launched (H100, 1.7B: after 4.6 ms for a 67 ms call, same step
        # time), and the host can queue the next call or read the last one's result meanwhile.
        gpu = jax.default_backend() == "gpu"
        prefill_options = dict(xla_gpu_enable_command_buffer="") if gpu else None
        graphs = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
        decode_options = dict(xla_gpu_enable_command_buffer=graphs) if gpu else None
        self._prefill = jax.jit(functools.partial(_prefill_impl, spec), static_argnames=("layout", "window"),
                                donate_argnums=(1,), compiler_options=prefill_options)
        self._decode = jax.jit(functools.partial(_decode_impl, spec),
                               static_argnames=("width", "greedy_only", "candidates", "lane_loop"),
                               donate_argnums=(1,), compiler_options=decode_options)
        self._fork = jax.jit(functools.partial(_fork_impl, spec), donate_argnums=(0,))
        self._release = jax.jit(_release_impl, donate_argnums=(0,))
        self._rewind = jax.jit(functools.partial(_rewind_impl, spec), donate_argnums=(0,))
        self.state = self._initial_state(key_impl)
        # Host mirror: which slots are in use, their sampling settings, their lengths where known. Every call
        # that changes the state bumps _version; _length_version[s] is the version of the last call that set
        # slot s's length or may have changed it by appending to it. _idle[s]: slot s stopped (as a read result
        # said) or was rewound, and nothing was appended since, so no decode call moves it.
        self._occupied = np.zeros(num_slots, bool)
        self._idle = np.zeros(num_slots, bool)
        self._sampling: list[SamplingParams | None] = [None] * num_slots
        self._lengths = np.zeros(num_slots, np.int64)
        self._lengths_known = np.ones(num_slots, bool)
        self._version = 0
        self._length_version = np.zeros(num_slots, np.int64)
        self._request_counter = itertools.count()
        self._fork_counter = itertools.count()

    def _initial_state(self, key_impl) -> EngineState:
        c, s = self.config, self.num_slots
        shape = forward.cache_shape(c, s, forward.cache_length(self.max_len, self.attention), self.layout)
        key = jax.random.key(0, impl=key_impl) if key_impl else jax.random.key(0)
        key_data = jax.random.key_data(key)
        return EngineState(
            keys=tuple(jnp.zeros(shape, self.cache_dtype) for _ in range(c.num_layers)),
            values=tuple(jnp.zeros(shape, self.cache_dtype) for _ in range(c.num_layers)),
            lengths=jnp.zeros((s,), jnp.int32), hidden=jnp.zeros((s, c.hidden_size), self.dtype),
            rng=jnp.zeros((s,) + key_data.shape, key_data.dtype),
            history=jnp.full((s, self.stop_table.width), -1, jnp.int32),
            running=jnp.zeros((s,), bool), reason=jnp.zeros((s,), jnp.int32),
            stop_id=jnp.full((s,), -1, jnp.int32), limit=jnp.full((s,), self.max_len, jnp.int32),
            temperature=jnp.ones((s,), jnp.float32), top_p=jnp.ones((s,), jnp.float32),
            top_k=jnp.zeros((s,), jnp.int32), stops=jnp.zeros((s, max(1, len(self.stop_table))), bool),
            eos_stop=jnp.ones((s,), bool))

    # -- weights --

    def set_weights(self, model_or_params) -> None:
        """Replaces the weights: a model, or its nnx.State, of the same structure, shapes and dtypes as the
        engine's (separate projections; nothing recompiles). Fuses them as the constructor does.

        The compiled calls take them as one flat tuple of arrays: flattening the nnx.State pytree (then 310
        leaves for 28 layers, 226 fused) on every call cost ~0.7 ms of host time per call."""
        params = model_or_params if isinstance(model_or_params, nnx.State) else nnx.state(model_or_params)
        leaves, treedef = jax.tree.flatten(params)
        if treedef != self._source_treedef or [(a.shape, a.dtype) for a in leaves] != self._source_shapes:
            raise ValueError("set_weights: the new weights differ in structure, shape or dtype from the "
                             "engine's model")
        fused = jax.tree.unflatten(self._spec.param_treedef, self._weights)
        nnx.replace_by_pure_dict(fused, qwen3.fuse_projection_params(nnx.to_pure_dict(params), self.config))
        self._weights = tuple(jax.tree.leaves(fused))

    # -- slots --

    @property
    def occupied(self) -> np.ndarray:
        """[S] bool copy: slots holding a sequence (prefilled and not released)."""
        return self._occupied.copy()

    def free_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self._occupied)]

    def lengths(self) -> np.ndarray:
        """Current slot lengths (waits for queued device work)."""
        lengths = np.asarray(jax.device_get(self.state.lengths)).astype(np.int64)
        self._lengths[:] = lengths
        self._lengths_known[:] = True
        return lengths.copy()

    def _learn_lengths(self, lengths: np.ndarray, reason: np.ndarray, version: int) -> None:
        """Learns slot lengths from the result of the decode call of `version`: all of them if no call came
        after it; else those of the slots that had stopped by its end (no later decode call moves them unless
        it appends to them) and that no later call set or appended to. So a caller that queues the next decode
        call before reading this one can still append to the slots that stopped without a sync."""
        learn = (reason != RUNNING) & (self._length_version <= version)
        if version == self._version:
            learn[:] = True
        self._lengths[learn] = lengths[learn]
        self._lengths_known[learn] = True
        self._idle[learn] = reason[learn] != RUNNING

    def _set_lengths(self, slots, lengths) -> None:
        """Records lengths the host just set (after the call that sets them bumped _version)."""
        self._lengths[slots] = lengths
        self._lengths_known[slots] = True
        self._length_version[slots] = self._version

    def _check_slots(self, slots, what: str) -> list[int]:
        if isinstance(slots, (int, np.integer)):
            slots = [slots]
        slots = [int(s) for s in slots]
        if len(slots) > self.num_slots:
            raise ValueError(f"{what}: {len(slots)} slots requested but the engine has {self.num_slots}")
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise ValueError(f"{what}: slot ids {bad} out of range [0, {self.num_slots})")
        if len(set(slots)) != len(slots):
            raise ValueError(f"{what}: slot ids must be distinct, got {slots}")
        return slots

    @staticmethod
    def _row_bucket(n: int) -> int:
        """Rows a call of n slots is padded to: the smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (the powers
        of two and 1.5x them) >= n, so padding costs at most a third of a call's rows (a prefill's time grows
        with its rows) while a pool of S slots compiles ~2 log2(S) row shapes."""
        p = _next_pow2(n)
        return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @staticmethod
    def _per_row(value, n: int, what: str) -> list:
        if isinstance(value, (list, tuple)) and not isinstance(value, SamplingParams):
            if len(value) != n:
                raise ValueError(f"{what}: {len(value)} values for {n} slots")
            return list(value)
        return [value] * n

    def _token_chunks(self, slots, chunks, what: str) -> list[np.ndarray]:
        chunks = [np.asarray(c, np.int64).reshape(-1) for c in chunks]
        vocab = self.config.vocab_size
        for s, c in zip(slots, chunks):
            if c.size == 0:
                raise ValueError(f"{what}: the chunk for slot {s} is empty")
            if c.min() < 0 or c.max() >= vocab:
                raise ValueError(f"{what}: the chunk for slot {s} has token ids outside [0, {vocab})")
        return chunks

    def _current_lengths(self, needed: list[int], slots: list[int]) -> np.ndarray:
        """The lengths of `slots`, synchronising with the device if one of `needed` is not known."""
        if needed and not self._lengths_known[needed].all():
            self.lengths()
        return self._lengths[slots]

    def _check_fit(self, slots, sizes, starts, fresh, what: str) -> None:
        for s, size, start, new in zip(slots, sizes, starts, fresh):
            if start + size > self.max_len:
                part = "prompt" if new else f"chunk appended at length {start}"
                raise ValueError(f"{what}: the {part} of {size} tokens for slot {s} does not fit the engine's "
                                 f"max_len={self.max_len}")

    # -- the four operations --

    def prefill(self, slots: Sequence[int] | int, chunks: Sequence[Sequence[int]], *,
                sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                stops: Sequence[str] | None = None, max_length: int | Sequence[int] | None = None,
                ignore_eos: bool | None = None, seed: int | Sequence[int] | None = None) -> None:
        """Appends chunks[i] to slots[i] at its current length; the slot then runs at the next decode.

        A free slot starts a new sequence (at length 0) with the given settings; defaults: SamplingParams(),
        every registered stop string (stops=None), max_length = max_len, EOS stops it, a key from `seed` or
        the engine's request counter. An occupied slot (normally one waiting after a stop) gets the tokens
        appended (a tool result) and keeps each setting that is left as None. Bad input raises ValueError
        before anything runs, so no slot changes.
        """
        slots = self._check_slots(slots, "prefill")
        if isinstance(chunks, np.ndarray):
            chunks = list(chunks)
        if len(chunks) != len(slots):
            raise ValueError(f"prefill: {len(chunks)} chunks for {len(slots)} slots")
        if not slots:
            return
        chunks = self._token_chunks(slots, chunks, "prefill")
        n = len(slots)
        fresh = ~self._occupied[slots]
        params_list = self._per_row(sampling, n, "prefill sampling")
        for p in params_list:
            if p is not None and not isinstance(p, SamplingParams):
                raise ValueError(f"prefill: sampling must be SamplingParams, got {type(p).__name__}")
        limits = self._per_row(max_length, n, "prefill max_length")
        seeds = self._per_row(seed, n, "prefill seed")
        stop_mask = self.stop_table.mask(stops)  # raises on an unknown stop string
        sizes = np.array([c.size for c in chunks])
        starts = np.where(fresh, 0, self._current_lengths([s for s, f in zip(slots, fresh) if not f], slots))
        self._check_fit(slots, sizes, starts, fresh, "prefill")
        for i, s in enumerate(slots):
            lim = limits[i]
            if lim is not None and not 1 <= int(lim) <= self.max_len:
                raise ValueError(f"prefill: max_length {lim} for slot {s} must be in [1, max_len={self.max_len}]")
            if fresh[i] and lim is not None and sizes[i] > int(lim):
                raise ValueError(f"prefill: the prompt of {sizes[i]} tokens for slot {s} is longer than its "
                                 f"max_length={lim}")
        # Everything is valid: build the padded call.
        rows_b = min(self._row_bucket(n), self.num_slots)  # no more rows than slots (see forward.table_rows)
        width = self._bucket(int(sizes.max()))
        # the xla attention's key window (cudnn reads each slot's prefix in place: one executable for all)
        window = self._bucket(int((starts + sizes).max())) if self.attention == "xla" else None
        tokens = np.zeros((rows_b, width), np.int32)
        for i, c in enumerate(chunks):
            tokens[i, :c.size] = c

        def pad(a, fill, dtype):
            a = np.asarray(a, dtype)
            return np.concatenate([a, np.full((rows_b - n,) + a.shape[1:], fill, dtype)])

        sp = [p if p is not None else SamplingParams() for p in params_list]
        has_sp = [p is not None for p in params_list]
        seeds = [int(sd) if sd is not None else next(self._request_counter) for sd in seeds]
        args = dict(tokens=tokens, rows=pad(slots, self.num_slots, np.int32), num_new=pad(sizes, 0, np.int32),
                    fresh=pad(fresh, False, bool),
                    seeds=pad(np.asarray(seeds, np.int64) % (2 ** 31), 0, np.int32))
        for name, given, value, fill, dtype in (
                ("temperature", has_sp, [p.temperature for p in sp], 1.0, np.float32),
                ("top_p", has_sp, [p.top_p for p in sp], 1.0, np.float32),
                ("top_k", has_sp, [p.top_k for p in sp], 0, np.int32),
                ("limit", [lim is not None for lim in limits],
                 [self.max_len if lim is None else int(lim) for lim in limits], 0, np.int32),
                ("stops", [stops is not None] * n, np.broadcast_to(stop_mask, (n, stop_mask.size)), False, bool),
                ("eos_stop", [ignore_eos is not None] * n, [not ignore_eos] * n, True, bool)):
            args[name + "_set"] = pad(fresh | np.asarray(given, bool), False, bool)
            args[name] = pad(value, fill, dtype)
        self.state = self._prefill(self._weights, self.state, packing.pack(args), layout=packing.layout(args),
                                   window=window)
        for i, s in enumerate(slots):
            if fresh[i] or has_sp[i]:
                self._sampling[s] = sp[i]
        self._occupied[slots] = True
        self._idle[slots] = False
        self._version += 1
        self._set_lengths(slots, starts + sizes)

    def decode(self, max_steps: int, *, min_waiting: int = 1, wait_fraction: float = 0.0,
               appends: Mapping[int, Sequence[int]] | None = None) -> DecodeResult:
        """Samples for every running slot until `need` of them stop, none runs, or max_steps.

        need = clip(max(min_waiting, ceil(wait_fraction * running)), 1, running): min_waiting=1 returns at
        the first stop; wait_fraction=1.0 when every slot has stopped. Stopped slots idle (masked) until the
        host appends to them or releases them. The result's arrays are fetched on first use.

        appends {slot: token ids}: chunks appended to occupied slots (tool results) as by `prefill` before
        the call, with the same result, but absorbed inside the loop while the other slots decode: up to
        lane_rows slots' next lane_width tokens ride along in each step (see `forward.decode_step`). Each
        such slot then runs (it counts as running for `need`). Every append is in when the call returns.
        max_steps counts the call's sampling steps, so a slot that absorbs appends samples in fewer of them;
        steps that only absorb (after max_steps or `need` is reached) sample nothing and are not counted.
        The host checks that each append fits its slot. A slot whose length it does not know (one that ran in a
        call whose result has not been read) makes that check read the lengths from the device: a sync, which
        drains queued calls. Known are the lengths of slots that had stopped by a read result and of rewound
        slots, through any later decode calls that do not append to them (the rollout appends only to those).
        """
        if max_steps < 1:
            raise ValueError(f"decode: max_steps must be >= 1, got {max_steps}")
        if not 0.0 <= wait_fraction <= 1.0:
            raise ValueError(f"decode: wait_fraction must be in [0, 1], got {wait_fraction}")
        packed = self._pack_appends(dict(appends or {}))
        static = self._decode_static(max_steps, lane_loop=bool(packed[:, 0].any()))
        self.state, out = self._decode(self._weights, self.state, np.int32(max_steps), np.int32(min_waiting),
                                       np.float32(wait_fraction), packed, **static)
        self._version += 1
        appended = packed[:, 0] > 0
        self._idle[appended] = False
        self._lengths_known[self._occupied & ~self._idle] = False  # an idle slot's length stays known
        self._length_version[appended] = self._version
        return DecodeResult(self, out, static["width"], self._version)

    def _pack_appends(self, appends: dict) -> np.ndarray:
        """Checks decode's appends (bad input raises before anything runs) and packs those that fit the
        lane into [S, 1 + lane_capacity] int32 (count, tokens); longer ones are prefilled now."""
        packed = np.zeros((self.num_slots, 1 + self.lane_capacity), np.int32)
        if not appends:
            return packed
        slots = self._check_slots(list(appends), "decode appends")
        free = [s for s in slots if not self._occupied[s]]
        if free:
            raise ValueError(f"decode appends: slots {free} hold no sequence (start one with prefill)")
        chunks = self._token_chunks(slots, [appends[s] for s in slots], "decode appends")
        sizes = [c.size for c in chunks]
        self._check_fit(slots, sizes, self._current_lengths(slots, slots), [False] * len(slots), "decode appends")
        long = [i for i, c in enumerate(chunks) if c.size > self.lane_capacity]
        if long:
            self.prefill([slots[i] for i in long], [chunks[i] for i in long])
        for s, c in zip(slots, chunks):
            if c.size <= self.lane_capacity:
                packed[s, 0] = c.size
                packed[s, 1:1 + c.size] = c
        return packed

    def _decode_static(self, max_steps: int, lane_loop: bool) -> dict:
        greedy_only, candidates = sampling.sampling_mode(
            [p for p, o in zip(self._sampling, self._occupied) if o and p is not None],
            self.config.vocab_size)
        return dict(width=max(8, _next_pow2(max_steps)), greedy_only=greedy_only, candidates=candidates,
                    lane_loop=bool(self._spec.lane_rows) and lane_loop)

    def decode_hlo(self, max_steps: int = 16, *, lane_loop: bool = False) -> str:
        """Optimised HLO text of the decode executable `decode(max_steps)` would run now (no state change);
        lane_loop=True: that of a call with appends (its lane loop compiled in, when the engine has a lane)."""
        lowered = self._decode.lower(self._weights, self.state, np.int32(max_steps), np.int32(1),
                                     np.float32(0.0), self._pack_appends({}),
                                     **self._decode_static(max_steps, lane_loop))
        return lowered.compile().as_text()

    def cache_buffer_shape(self) -> tuple[int, ...]:
        """Shape of one layer's key (or value) buffer."""
        return tuple(self.state.keys[0].shape)

    def fork(self, src: int | Sequence[int], dst: int | Sequence[int], *, same_key: bool = False) -> None:
        """Copies slot src[i] into the free slot dst[i] (all at once; sources are read before any write).

        The child gets the parent's cache rows, length, pending next-token state, history, stop state and
        settings. Its key is fold_in(parent key, fork counter), or the parent's own key with same_key=True
        (then both continue identically).
        """
        src = [int(s) for s in ([src] if isinstance(src, (int, np.integer)) else src)]
        bad = [s for s in src if not 0 <= s < self.num_slots]
        if bad:
            raise ValueError(f"fork: source slot ids {bad} out of range [0, {self.num_slots})")
        dst = self._check_slots(dst, "fork dst")
        if len(src) != len(dst):
            raise ValueError(f"fork: {len(src)} sources for {len(dst)} destinations")
        if not src:
            return
        not_occupied = [s for s in src if not self._occupied[s]]
        if not_occupied:
            raise ValueError(f"fork: source slots {not_occupied} hold no sequence")
        busy = [d for d in dst if self._occupied[d]]
        if busy:
            raise ValueError(f"fork: destination slots {busy} are in use (release them first)")
        n, p = len(src), self._row_bucket(len(src))
        pad = lambda a, fill, dtype: np.concatenate([np.asarray(a, dtype), np.full(p - n, fill, dtype)])
        ids = [next(self._fork_counter) % (2 ** 31) for _ in range(n)]
        self.state = self._fork(self.state, pad(src, 0, np.int32), pad(dst, self.num_slots, np.int32),
                                pad([same_key] * n, True, bool), pad(ids, 0, np.int32))
        self._version += 1
        for s, d in zip(src, dst):
            self._occupied[d] = True
            self._sampling[d] = self._sampling[s]
            self._lengths[d] = self._lengths[s]
            self._lengths_known[d] = self._lengths_known[s]
            self._idle[d] = self._idle[s]
            self._length_version[d] = self._version

    def rewind(self, slots: int | Sequence[int], lengths: int | Sequence[int], *,
               seed: int | Sequence[int]) -> None:
        """Cuts occupied slots back to their first `lengths` positions; each then idles until a prefill.

        The slot's key becomes the one a fresh request with `seed` gets, so a branch's randomness depends
        on its seed only (not on how many forks came before). Typical use (a branch restarting right after
        a tool result at position L): fork(parent, child); rewind(child, L - 1, seed=s); prefill(child,
        [token L - 1]) recomputes the next-token state from the cached prefix.
        """
        slots = self._check_slots(slots, "rewind")
        lengths = [int(n) for n in np.broadcast_to(np.asarray(lengths), (len(slots),))]
        seeds = [int(x) for x in np.broadcast_to(np.asarray(seed), (len(slots),))]
        free = [s for s in slots if not self._occupied[s]]
        if free:
            raise ValueError(f"rewind: slots {free} hold no sequence")
        bad = [(s, n) for s, n in zip(slots, lengths)
               if n < 1 or (self._lengths_known[s] and n > self._lengths[s]) or n > self.max_len]
        if bad:
            raise ValueError(f"rewind: lengths must be in [1, current length]; got (slot, length) {bad}")
        p = self._row_bucket(len(slots))
        pad = lambda a, fill: np.concatenate([np.asarray(a, np.int32), np.full(p - len(a), fill, np.int32)])
        self.state = self._rewind(self.state, pad(slots, self.num_slots), pad(lengths, 0), pad(seeds, 0))
        self._version += 1
        self._idle[slots] = True
        self._set_lengths(slots, lengths)

    def release(self, slots: int | Sequence[int]) -> None:
        """Frees slots (releasing a free slot is a no-op)."""
        slots = self._check_slots(slots, "release")
        if not slots:
            return
        p = self._row_bucket(len(slots))
        rows = np.concatenate([np.asarray(slots, np.int32), np.full(p - len(slots), self.num_slots, np.int32)])
        self.state = self._release(self.state, rows)
        self._occupied[slots] = False
        self._idle[slots] = False
        self._version += 1
        self._set_lengths(slots, 0)
        for s in slots:
            self._sampling[s] = None

    # -- convenience --

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 stops: Sequence[str] | None = (), ignore_eos: bool = False,
                 seed: int | Sequence[int] | None = None) -> list[Generation]:
        """Completes each prompt in its own free slot (all at once) and frees the slots again.

        Stops at EOS, at the stop strings named in `stops` (default none; None = all registered) or after
        max_new_tokens (or max_len). Needs an engine with no other occupied slot (they would decode too).
        """
        prompts = [list(p) for p in prompts]
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if self._occupied.any():
            raise ValueError(f"generate: slots {np.flatnonzero(self._occupied).tolist()} are in use; "
                             "generate needs an engine with no occupied slot")
        if len(prompts) > self.num_slots:
            raise ValueError(f"generate: {len(prompts)} prompts but the engine has {self.num_slots} slots")
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if len(p) > self.max_len:
                raise ValueError(f"generate: prompt {i} has {len(p)} tokens, more than max_len={self.max_len}")
        slots = list(range(len(prompts)))
        limits = [min(self.max_len, max(len(p), 1) + max_new_tokens) for p in prompts]
        self.prefill(slots, prompts, sampling=sampling, stops=stops, max_length=limits,
                     ignore_eos=ignore_eos, seed=seed)
        try:
            tokens = [[] for _ in slots]
            logps = [[] for _ in slots]
            ents = [[] for _ in slots]
            reasons: list[str | None] = [None] * len(slots)
            while any(r is None for r in reasons):
                res = self.decode(max_new_tokens, wait_fraction=1.0).fetch()
                for i, s in enumerate(slots):
                    tokens[i].extend(res.new_tokens(s).tolist())
                    logps[i].extend(res.new_logprobs(s).tolist())
                    ents[i].extend(res.new_entropies(s).tolist())
                    reasons[i] = res.finish_reason(s)
            return [Generation(t, np.asarray(lp, np.float32), np.asarray(e, np.float32), r)
                    for t, lp, e, r in zip(tokens, logps, ents, reasons)]
        finally:
            self.release(slots)
