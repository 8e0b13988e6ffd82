"""Compiled memory of value+grad of per-token log-probs and entropy: vocab-chunked vs dense logits.

Lowers and compiles `jax.value_and_grad` of sum(log p) + sum(H) with respect to the hidden
states and the LM head, and prints XLA's memory analysis of each executable. The dense version
materialises [B, T, V] float32 logits (19.9 GB at the default shape) and is never run; the chunked
one must not materialise them.

  python tools/measure_logprob_memory.py                       # Qwen3-1.7B shape, default backend
  python tools/measure_logprob_memory.py --chunk_sizes 1024 2048 4096 --batch 8 --seq 4096
  python tools/measure_logprob_memory.py --chunk_sizes 1024 --skip_dense --execute   # on a GPU

--execute also runs the first chunk size on random inputs and prints the device's peak memory in use
(`memory_stats()["peak_bytes_in_use"]`, GPU / TPU only: run one chunk size per process) and the time of
one value+grad call.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.core.logprobs import logprobs_and_entropy_from_logits, token_logprobs_and_entropy

_GB = 1e9


def _analysis(fn, *shapes):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*shapes).compile()
    stats = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    return {f: getattr(stats, f) for f in fields}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--skip_dense", action="store_true")
    parser.add_argument("--execute", action="store_true")
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    hidden = jax.ShapeDtypeStruct((args.batch, args.seq, args.hidden), dtype)
    lm_head = jax.ShapeDtypeStruct((args.hidden, args.vocab), dtype)
    targets = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    hidden_bytes = args.batch * args.seq * args.hidden * dtype.itemsize
    head_bytes = args.hidden * args.vocab * dtype.itemsize
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__}")
    print(f"B={args.batch} T={args.seq} H={args.hidden} V={args.vocab} dtype={dtype.name}: "
          f"hidden states {hidden_bytes / _GB:.3f} GB, LM head {head_bytes / _GB:.3f} GB, "
          f"dense f32 logits {args.batch * args.seq * args.vocab * 4 / _GB:.1f} GB")

    def report(name, stats):
        print(f"{name:>14}: temp {stats['temp_size_in_bytes'] / _GB:7.3f} GB "
              f"({stats['temp_size_in_bytes'] / hidden_bytes:5.1f} x hidden)  "
              f"argument {stats['argument_size_in_bytes'] / _GB:.3f} GB  "
              f"output {stats['output_size_in_bytes'] / _GB:.3f} GB")

    def chunked_fn(chunk):
        def chunked(h, w, y):
            logp, entropy = token_logprobs_and_entropy(h, w, y, chunk_size=chunk)
            return jnp.sum(logp) + jnp.sum(entropy)
        return chunked

    for chunk in args.chunk_sizes:
        report(f"chunked {chunk}", _analysis(chunked_fn(chunk), hidden, lm_head, targets))

    if args.execute:
        _execute(chunked_fn(args.chunk_sizes[0]), hidden, lm_head, targets, hidden_bytes)

    if not args.skip_dense:
        def dense(h, w, y):
            logp, entropy = logprobs_and_entropy_from_logits(
                jnp.einsum("bth,hv->btv", h, w, preferred_element_type=jnp.float32), y)
            return jnp.sum(logp) + jnp.sum(entropy)
        report("dense", _analysis(dense, hidden, lm_head, targets))


def _execute(fn, hidden, lm_head, targets, hidden_bytes):
    # Inputs are made on the host so that the device's peak counts only them and the step.
    rng = np.random.default_rng(0)
    h = jax.device_put(rng.standard_normal(hidden.shape, np.float32).astype(hidden.dtype))
    w = jax.device_put((rng.standard_normal(lm_head.shape, np.float32) / lm_head.shape[0] ** 0.5)
                       .astype(lm_head.dtype))
    y = jax.device_put(rng.integers(0, lm_head.shape[1], targets.shape, np.int32))
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    jax.block_until_ready(step(h, w, y))  # one call: the peak below is inputs + this call
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    start, calls = time.perf_counter(), 5
    for _ in range(calls):
        jax.block_until_ready(step(h, w, y))
    elapsed = (time.perf_counter() - start) / calls
    inputs = h.nbytes + w.nbytes + y.nbytes
    grads = h.nbytes + w.nbytes
    if peak is None:
        print(f"executed: {elapsed * 1e3:.1f} ms per value+grad; no memory_stats on this backend")
    else:
        rest = peak - inputs - grads
        print(f"executed: {elapsed * 1e3:.1f} ms per value+grad; peak in use {peak / _GB:.3f} GB = inputs "
              f"{inputs / _GB:.3f} GB + gradients {grads / _GB:.3f} GB + {rest / _GB:.3f} GB "
              f"({rest / hidden_bytes:.1f} x hidden)")


if __name__ == "__main__":
    main()
