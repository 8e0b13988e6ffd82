"""The Pallas chunk kernel `engine.decode_attention.chunk_attention` alone, all layers, for a few tile settings: the
attention of appended chunks (a decode lane's tool results, a prefill) from their raw projections, with the
norms, RoPE and cache writes it does itself.

  python tools/benchmark_chunk_attention.py [--rows 4 --chunk 64 --start 600 --heads 16 --kv_heads 8
                                             --head_dim 128 --layers 28 --configs 64:64:4:3,64:32:4:3]

Each config is block_k:rows_per_program:num_warps:num_stages. Every layer has its own cache buffers (64 slots,
donated), rows at the given start (+-8 positions). Time = median over samples of 5 chained calls (dispatch
overlaps the kernels), per call of all layers. Each variant's first layer output is compared with a float32
reference (relative error). Prints one table; with $OUT set, writes chunk_attention_bench.json there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from aepo_jax.engine import decode_attention as da
from aepo_jax.engine import forward
from aepo_jax.models import qwen3

EPS = 1e-6
THETA = 1e6


def _reference(grouped, cache_k, cache_v, rows, starts, q_w, k_w, scale):
    """float32: the model's q / k norms and RoPE on the chunk's projections, its keys / values written, attention
    with the offset-causal mask over each row's slot."""
    up = lambda a: a.astype(jnp.float32)
    r, t, kv, width, d = grouped.shape
    positions = starts[:, None] + jnp.arange(t)
    norm_rope = lambda x, w: qwen3.rotary_embedding(
        x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + EPS) * up(w), positions, THETA)
    grouped = up(grouped)
    q = norm_rope(grouped[:, :, :, :-2].reshape(r, t, -1, d), q_w)
    k, v = norm_rope(grouped[:, :, :, -2], k_w), grouped[:, :, :, -1]
    keys = up(cache_k).at[rows[:, None], positions].set(k)[rows]
    values = up(cache_v).at[rows[:, None], positions].set(v)[rows]
    mask = jnp.arange(keys.shape[1])[None, None, :] <= positions[:, :, None]
    return forward.attention(q, keys, values, mask, "bshd", scale)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--start", type=int, default=600)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--configs", default="64:64:4:3,64:32:4:3,64:32:4:4,32:32:4:3,64:32:8:3,64:64:4:2")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",") if c]
    r, t, s, n, kv, d = args.rows, args.chunk, args.slots, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    rng = np.random.default_rng(0)
    cache_len = forward.cache_length(args.start + t + 16, "pallas")
    bf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    grouped = bf(r, t, kv, n // kv + 2, d)
    keys = tuple(bf(s, cache_len, kv, d) for _ in range(args.layers))
    values = tuple(bf(s, cache_len, kv, d) for _ in range(args.layers))
    rows = jnp.asarray(rng.choice(s, r, replace=False), jnp.int32)
    starts = jnp.asarray(args.start + rng.integers(-8, 8, r), jnp.int32)
    num_new = jnp.full((r,), t, jnp.int32)
    cos, sin = qwen3.rotary_cos_sin(starts[:, None] + jnp.arange(t), THETA, d, jnp.bfloat16)
    q_w, k_w = bf(d) * 0.2 + 1, bf(d) * 0.2 + 1
    ref = _reference(grouped, keys[0], values[0], rows, starts, q_w, k_w, scale)
    records = []
    for cfg in configs:
        block_k, per_program, warps, stages = cfg
        rec = dict(variant=":".join(map(str, cfg)))

        def call(g, ks, vs, block_k=block_k, per_program=per_program, warps=warps, stages=stages):
            outs, new_k, new_v = [], [], []
            for ck, cv in zip(ks, vs):
                out, ck, cv = da.chunk_attention(g, ck, cv, rows, starts, num_new, cos, sin, q_w, k_w, eps=EPS,
                                                 scale=scale, block_k=block_k, rows_per_program=per_program,
                                                 num_warps=warps, num_stages=stages)
                outs.append(out)
                new_k.append(ck)
                new_v.append(cv)
            return outs, tuple(new_k), tuple(new_v)

        try:
            fn = jax.jit(call, donate_argnums=(1, 2))
            outs, keys, values = fn(grouped, keys, values)
            rec["rel_error"] = float(jnp.linalg.norm(outs[0].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(5):
                    outs, keys, values = fn(grouped, keys, values)
                jax.block_until_ready(outs)
                times.append((time.perf_counter() - t0) / 5)
            rec["ms_per_call"] = 1e3 * statistics.median(times)
        except Exception as e:  # noqa: BLE001 - one failing setting must not lose the others
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        records.append(rec)
        print(json.dumps(rec), flush=True)  # as it goes: a time limit keeps what finished
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(args))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "chunk_attention_bench.json"), "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=1)
    print(f"\n{meta['date']}  {meta['device']}  jax {meta['jax']}  {r} rows x {t} tokens at {args.start}, "
          f"{n} / {kv} heads, head_dim {d}, {args.layers} layers")
    print(f"{'block_k:rows:warps:stages':>26} | {'ms/call':>8} {'rel err':>8}")
    for rec in records:
        print(f"{rec['variant']:>26} | " + (f"{rec['ms_per_call']:>8.3f} {rec['rel_error']:>8.1e}"
                                           if "error" not in rec else rec["error"][:80]))
    return records


if __name__ == "__main__":
    main()
