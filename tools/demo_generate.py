"""Interim demo: a tiny random Qwen3 written as an HF checkpoint, loaded back, decoded through the cache.

  python tools/demo_generate.py [--preset tiny] [--slots 4] [--new_tokens 32]
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aepo_jax.models import qwen3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prompt_len", type=int, default=12)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parser.parse_args(argv)

    config = qwen3.preset(args.preset)
    print(qwen3.config_summary(config))
    with tempfile.TemporaryDirectory() as tmp:
        qwen3.save_pretrained(qwen3.Qwen3(config, rngs=nnx.Rngs(0)), tmp)
        model = qwen3.load_pretrained(tmp)
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (args.slots, args.prompt_len))
    cache = qwen3.KVCache.create(config, args.slots, args.prompt_len + args.new_tokens)

    @jax.jit
    def step(model, tokens, cache):
        hidden, cache = model.extend(tokens, cache)
        return jnp.argmax(model.logits(hidden[:, -1]), axis=-1), cache

    token, cache = step(model, jnp.asarray(prompts), cache)
    out = [token]
    step(model, token[:, None], cache)[0].block_until_ready()  # compile the one-token step
    start = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        token, cache = step(model, token[:, None], cache)
        out.append(token)
    tokens = np.stack(jax.device_get(out), axis=1)
    elapsed = time.perf_counter() - start
    for row, prompt in zip(tokens, prompts):
        print(f"prompt {prompt[:6].tolist()}... -> {row[:12].tolist()}...")
    print(f"{args.slots * (args.new_tokens - 1) / elapsed:.0f} tokens/s on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
