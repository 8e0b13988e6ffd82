"""One decode step's attention block over a KV cache, all layers: the XLA + cuDNN path (q / k RMSNorm and RoPE,
key / value scatter, cuDNN fused attention with per-slot key lengths) against the Pallas kernel
`engine.decode_attention` (all of it in one kernel per layer), for a few Pallas tile settings, on the same bf16
caches and raw projections.

  python tools/benchmark_decode_attention.py [--slots 64 --heads 16 --kv_heads 8 --head_dim 128 --layers 28
                                              --lengths 384,1024 --configs 64:4:2,32:4:3,64:8:2]

Each config is block_k:num_warps:num_stages. Every layer has its own cache buffers (so the 50 MB L2 cannot
hold them), donated, slots of the given length (+-8 positions). Bytes = every slot's valid keys and values of
every layer read once; GB/s = bytes / median time (5 chained calls per sample). Each variant's first layer
output is compared with a float32 reference (relative error), and the written value rows must be exact.
Prints one table; with $OUT set, writes decode_attention_bench.json there.
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
from flax import nnx

from aepo_jax.engine import decode_attention as da
from aepo_jax.engine import forward
from aepo_jax.models import qwen3


def _attention_block(heads, kv_heads, head_dim, rng):
    """A `qwen3.Attention` (only its q / k norms and RoPE are used) with random bf16 norm weights."""
    config = qwen3.Qwen3Config(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=head_dim)
    attn = qwen3.Attention(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    for norm in (attn.q_norm, attn.k_norm):
        norm.weight[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(head_dim), jnp.bfloat16)
    return attn


def _finish(attn, grouped, lengths):
    """The model's q / k norms and RoPE on the raw grouped projections [S, K, G + 2, D]: q [S, 1, N, D], k, v."""
    q, k, v = attn.ungroup(grouped[:, None])
    return (*attn.normalize_and_rotate(q, k, lengths[:, None]), v)


def _cudnn_step(attn, grouped, keys, values, lengths, scale):
    rows = jnp.arange(grouped.shape[0], dtype=jnp.int32)
    outs, new_k, new_v = [], [], []
    for ck, cv in zip(keys, values):
        q, k, v = _finish(attn, grouped, lengths)
        ck = forward.write_kv(ck, rows, lengths[:, None], k, "bshd")
        cv = forward.write_kv(cv, rows, lengths[:, None], v, "bshd")
        outs.append(jax.nn.dot_product_attention(q, ck, cv, scale=scale, key_value_seq_lengths=lengths + 1,
                                                 implementation="cudnn")[:, 0])
        new_k.append(ck)
        new_v.append(cv)
    return outs, tuple(new_k), tuple(new_v)


def _pallas_step(attn, grouped, keys, values, lengths, scale, block_k, num_warps, num_stages):
    write = jnp.ones(lengths.shape, bool)
    c = attn.config
    cos, sin = qwen3.rotary_cos_sin(lengths, c.rope_theta, c.head_dim, grouped.dtype)
    outs, new_k, new_v = [], [], []
    for ck, cv in zip(keys, values):
        out, ck, cv = da.decode_attention(grouped, ck, cv, lengths, write, cos, sin, attn.q_norm.weight[...],
                                          attn.k_norm.weight[...], eps=c.rms_norm_eps, scale=scale, block_k=block_k,
                                          num_warps=num_warps, num_stages=num_stages)
        outs.append(out)
        new_k.append(ck)
        new_v.append(cv)
    return outs, tuple(new_k), tuple(new_v)


def _reference(attn, grouped, ck, cv, lengths, scale):
    """float32 attention of each slot over its first lengths keys and the new one."""
    up = lambda a: a.astype(jnp.float32)
    q, k, v = _finish(attn, up(grouped), lengths)
    s = q.shape[0]
    ck = up(ck).at[jnp.arange(s), lengths].set(k[:, 0])
    cv = up(cv).at[jnp.arange(s), lengths].set(v[:, 0])
    mask = jnp.arange(ck.shape[1])[None, None, :] <= lengths[:, None, None]
    return forward.attention(q, ck, cv, mask, "bshd", scale)[:, 0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--lengths", default="384,1024")
    p.add_argument("--configs", default="64:4:2,32:4:2,32:4:3,32:4:4,16:4:4,64:4:3,64:8:3")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",") if c]
    s, n, kv, d = args.slots, args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    records = []
    for length in (int(x) for x in args.lengths.split(",")):
        cache_len = forward.cache_length(length + 16, "pallas")
        rng = np.random.default_rng(length)
        lengths = jnp.asarray(length + rng.integers(-8, 8, s), jnp.int32)
        bf = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        grouped = bf(s, kv, n // kv + 2, d)
        attn = _attention_block(n, kv, d, rng)
        keys = tuple(bf(s, cache_len, kv, d) for _ in range(args.layers))
        values = tuple(bf(s, cache_len, kv, d) for _ in range(args.layers))
        num_bytes = 2 * args.layers * int(np.sum(np.asarray(lengths) + 1)) * kv * d * 2
        ref = _reference(attn, grouped, keys[0], values[0], lengths, scale)
        variants = [("cudnn", None)] + [(f"pallas {b}:{w}:{st}", (b, w, st)) for b, w, st in configs]
        for name, cfg in variants:
            rec = dict(length=length, variant=name)
            try:
                if cfg is None:
                    step = lambda g, ks, vs, ln, attn=attn: _cudnn_step(attn, g, ks, vs, ln, scale)
                else:
                    step = lambda g, ks, vs, ln, attn=attn, cfg=cfg: _pallas_step(attn, g, ks, vs, ln, scale, *cfg)
                fn = jax.jit(step, donate_argnums=(1, 2))
                outs, keys, values = fn(grouped, keys, values, lengths)
                err = float(jnp.linalg.norm(outs[0].astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                rec["rel_error"] = err
                rec["rows_exact"] = bool(jnp.array_equal(values[0][jnp.arange(s), lengths], grouped[:, :, -1]))
                times = []
                for _ in range(args.repeats):  # 5 chained calls per sample: dispatch overlaps the kernels
                    t0 = time.perf_counter()
                    for _ in range(5):
                        outs, keys, values = fn(grouped, keys, values, lengths)
                    jax.block_until_ready(outs)
                    times.append((time.perf_counter() - t0) / 5)
                ms = 1e3 * statistics.median(times)
                rec.update(ms_per_step=ms, gb_per_s=num_bytes / ms / 1e6)
            except Exception as e:  # noqa: BLE001 - one failing setting must not lose the others
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"[{length} {name}] failed: {rec['error']}", flush=True)
            records.append(rec)
            print(json.dumps(rec), flush=True)  # as it goes: a time limit keeps what finished
    device = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=device.device_kind, jax=jax.__version__, args=vars(args))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "decode_attention_bench.json"), "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=1)
    print(f"\n{meta['date']}  {meta['device']}  jax {meta['jax']}  {s} slots, {n} / {kv} heads, head_dim {d}, "
          f"{args.layers} layers")
    print(f"{'length':>6} {'variant':>18} | {'ms/step':>8} {'GB/s':>6} {'rel err':>8} {'rows':>5}")
    for r in records:
        if "error" in r:
            print(f"{r['length']:>6} {r['variant']:>18} | error")
        else:
            print(f"{r['length']:>6} {r['variant']:>18} | {r['ms_per_step']:>8.3f} {r['gb_per_s']:>6.0f} "
                  f"{r['rel_error']:>8.1e} {str(r['rows_exact']):>5}")


if __name__ == "__main__":
    main()
