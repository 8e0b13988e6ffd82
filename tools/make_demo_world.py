"""Writes the built-in demo world (aepo_jax/data/world.py) and its SentencePiece tokenizer.

  python tools/make_demo_world.py --seed 0 --out DEMO_DIR [--num_entities 256] [--vocab_size 512]
                                 [--guess_fraction 0.3] [--overwrite]

DEMO_DIR gets corpus.jsonl ({"id","title","text"}, the `search` tool's corpus), train.jsonl and
heldout.jsonl ({"id","question","answers"}), sft.jsonl ({"question","response"} reference traces for the
cold-start SFT; --guess_fraction of them answer with a guess, without the tools), tokenizer.model and
world.json. The same arguments give byte-identical files. Existing files are not replaced unless
--overwrite is given.
"""

import argparse
import sys
import time

from aepo_jax.data.world import DEMO_GUESS_FRACTION, DEMO_VOCAB_SIZE, build_demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num_entities", type=int, default=256, help="number of guilds (default 256)")
    parser.add_argument("--heldout_fraction", type=float, default=0.25,
                        help="fraction of guilds held out (default 0.25)")
    parser.add_argument("--max_heldout", type=int, default=128,
                        help="cap on held-out questions (default 128)")
    parser.add_argument("--vocab_size", type=int, default=DEMO_VOCAB_SIZE,
                        help=f"SentencePiece vocabulary size, an upper bound (default {DEMO_VOCAB_SIZE})")
    parser.add_argument("--guess_fraction", type=float, default=DEMO_GUESS_FRACTION,
                        help="share of SFT traces that answer with a guess, without the tools "
                             f"(default {DEMO_GUESS_FRACTION})")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        paths = build_demo(args.out, seed=args.seed, vocab_size=args.vocab_size, overwrite=args.overwrite,
                           guess_fraction=args.guess_fraction, num_entities=args.num_entities,
                           heldout_fraction=args.heldout_fraction,
                           max_heldout=args.max_heldout)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(sorted(paths))} to {args.out} in {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
