"""Forward-pass timing of a Qwen3 preset (random bf16 weights) against HF transformers in the same run.

  python tools/benchmark_forward.py [--presets 1.7b] [--batch 8] [--seq 1024] [--skip_hf]

Prints a table (ms per forward, tokens/s, model TFLOP/s, MFU against --peak_tflops) and writes JSON to
$OUT/forward_bench.json when OUT is set. FLOPs per forward: 2 * matmul params * tokens (LM head included)
plus causal attention 2 * 2 * layers * heads * head_dim * T^2 / 2 per sequence.
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


def forward_flops(config: qwen3.Qwen3Config, batch: int, seq: int) -> float:
    c = config
    # The embedding lookup is free; the LM head (tied or not) is one V x H matmul.
    matmul_params = qwen3.count_params(c) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    attention = 2 * 2 * c.num_layers * c.num_heads * c.head_dim * seq * seq / 2
    return batch * (2 * matmul_params * seq + attention)


def _median_time(fn, repeats):
    fn()  # warm-up (compile)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_ours(config, batch, seq, repeats):
    model = qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)))

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return _median_time(lambda: forward(state, ids).block_until_ready(), repeats)


def time_hf(config, batch, seq, repeats):
    import torch
    import transformers

    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_hf_dict().items()
                                             if k not in ("architectures", "model_type", "dtype")})
    model = transformers.Qwen3ForCausalLM(hf_config).to("cuda", torch.bfloat16).eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)), device="cuda")

    def run():
        with torch.no_grad():
            model(input_ids=ids)
        torch.cuda.synchronize()

    result = _median_time(run, repeats)
    del model
    torch.cuda.empty_cache()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", default="1.7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--skip_hf", action="store_true")
    args = parser.parse_args(argv)

    rows = []
    for name in args.presets.split(","):
        config = qwen3.preset(name)
        flops = forward_flops(config, args.batch, args.seq)
        for impl, timer in (("aepo_jax", time_ours), ("hf_transformers", None if args.skip_hf else time_hf)):
            if timer is None:
                continue
            try:
                seconds = timer(config, args.batch, args.seq, args.repeats)
                rows.append(dict(preset=name, impl=impl, batch=args.batch, seq=args.seq, ms=seconds * 1e3,
                                 tokens_per_s=args.batch * args.seq / seconds, tflops=flops / seconds / 1e12,
                                 mfu=flops / seconds / 1e12 / args.peak_tflops))
            except Exception as e:  # one failure (e.g. OOM) must not lose the other rows
                rows.append(dict(preset=name, impl=impl, error=repr(e)[:300]))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "forward_bench.json"), "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), rows=rows), f, indent=2)
    print(f"device: {jax.devices()[0].device_kind}")
    print(f"{'preset':8} {'impl':16} {'B x T':>10} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:8} {r['impl']:16} ERROR {r['error']}")
        else:
            print(f"{r['preset']:8} {r['impl']:16} {r['batch']:>4} x {r['seq']:<5} {r['ms']:9.2f} "
                  f"{r['tokens_per_s']:11.0f} {r['tflops']:8.1f} {r['mfu']:6.1%}")
    return rows


if __name__ == "__main__":
    main()
