"""Converts Qwen3 checkpoints between Hugging Face format and aepo_jax's native (Orbax) format.

  python tools/convert_checkpoint.py hf_to_native --src HF_DIR --dst OUT_DIR [--dtype bfloat16]
  python tools/convert_checkpoint.py native_to_hf --src NATIVE_DIR --dst HF_OUT_DIR [--dtype bfloat16]

Neither direction overwrites a non-empty destination unless --overwrite is given.
"""

import argparse
import sys

import jax.numpy as jnp

from aepo_jax.models import native_checkpoint, qwen3

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("direction", choices=["hf_to_native", "native_to_hf"])
    parser.add_argument("--src", required=True)
    parser.add_argument("--dst", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the written parameters")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.direction == "hf_to_native":
        model = qwen3.load_pretrained(args.src, dtype=dtype)
        native_checkpoint.save_params(model, args.dst, overwrite=args.overwrite)
    else:
        model = native_checkpoint.load_params(args.src, dtype=dtype)
        qwen3.save_pretrained(model, args.dst, overwrite=args.overwrite)
    print(f"{args.direction}: {args.src} -> {args.dst} ({qwen3.config_summary(model.config)}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
