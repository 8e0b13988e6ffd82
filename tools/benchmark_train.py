"""Train-step throughput / MFU against HF transformers + PyTorch, and peak memory of a long-sequence step.

  python tools/benchmark_train.py throughput [--preset 1.7b --batch 8 --seq 1024] [--skip_hf]
  python tools/benchmark_train.py memory [--preset 1.7b --batch 8 --seq 4096]   (run in its own process)

Ours: the jitted RL train step (AEPO loss, entropy-aware advantage, vocab-chunked log-probs and entropy),
bf16 compute, float32 master weights and AdamW state, on synthetic data. HF: Qwen3ForCausalLM with float32
weights under bf16 autocast, its cross-entropy loss, fused AdamW. FLOPs per step (both): 6 x matmul params x
tokens + 3 x the causal attention forward (recomputation under remat not counted). Writes JSON to $OUT.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aepo_jax.models import qwen3
from aepo_jax.train import step as step_lib


def step_flops(config, batch, seq):
    c = config
    matmul_params = qwen3.count_params(c) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    attention = 2 * 2 * c.num_layers * c.num_heads * c.head_dim * seq * seq / 2
    return batch * (6 * matmul_params * seq + 3 * attention)


def _batch(config, batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    mask[:, :64] = 0  # a prompt
    return {"tokens": jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq)), jnp.int32),
            "attention_mask": jnp.ones((batch, seq), jnp.int32), "loss_mask": jnp.asarray(mask),
            "old_logprobs": jnp.full((batch, seq), -np.log(config.vocab_size), jnp.float32),
            "advantages": jnp.asarray(rng.normal(size=(batch,)), jnp.float32)}


def ours(config, batch, seq, repeats, remat, attention):
    model = qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat, rngs=nnx.Rngs(0))
    model.attention = attention
    optimizer = step_lib.make_optimizer(1e-6)
    graphdef, state = step_lib.init_train_state(model, optimizer)
    del model
    step = step_lib.jit_train_step(graphdef, optimizer, step_lib.LossConfig(policy_loss="aepo"))
    data = _batch(config, batch, seq)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), float(metrics["loss"])


def hf(config, batch, seq, repeats):
    import torch
    import transformers

    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                                             if k not in ("architectures", "model_type", "dtype")})
    model = transformers.Qwen3ForCausalLM(hf_config).to("cuda").train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, fused=True)
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)), device="cuda")
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    del model, optimizer
    torch.cuda.empty_cache()
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("what", choices=["throughput", "memory"])
    parser.add_argument("--preset", default="1.7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--attention", default="cudnn,xla",
                        help="comma-separated training attention implementations to time (qwen3.ATTENTION_IMPLS)")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    parser.add_argument("--skip_hf", action="store_true")
    args = parser.parse_args(argv)
    config = qwen3.preset(args.preset)
    rows = []
    if args.what == "throughput":
        seq = args.seq or 1024
        flops = step_flops(config, args.batch, seq)
        # HF first: it frees its memory before JAX starts (JAX preallocates most of the GPU at start).
        runs = [] if args.skip_hf else [("hf_transformers", lambda: hf(config, args.batch, seq, args.repeats))]
        for impl in args.attention.split(","):
            runs.append((f"aepo_jax ({impl} attention)",
                         lambda impl=impl: ours(config, args.batch, seq, args.repeats, args.remat, impl)[0]))
        for name, run in runs:
            try:
                seconds = run()
                rows.append(dict(impl=name, preset=args.preset, batch=args.batch, seq=seq, remat=args.remat,
                                 ms=seconds * 1e3, tokens_per_s=args.batch * seq / seconds,
                                 mfu=flops / seconds / 1e12 / args.peak_tflops))
            except Exception as e:  # keep the other row
                rows.append(dict(impl=name, error=repr(e)[:400]))
    else:
        seq = args.seq or 4096
        impl = args.attention.split(",")[0]
        seconds, loss = ours(config, args.batch, seq, 1, args.remat, impl)
        stats = jax.devices()[0].memory_stats() or {}
        rows.append(dict(impl=f"aepo_jax ({impl} attention)", preset=args.preset, batch=args.batch, seq=seq,
                         remat=args.remat, ms=seconds * 1e3, loss=loss, peak_gb=stats.get("peak_bytes_in_use", 0) / 1e9,
                         dense_f32_logits_gb=args.batch * seq * config.vocab_size * 4 / 1e9))
    device = jax.devices()[0].device_kind
    if os.environ.get("OUT"):
        name = f"train_{args.what}_{args.seq or ''}{'_remat' if args.remat else ''}.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(dict(device=device, rows=rows), f, indent=2)
    print(f"device: {device}")
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
