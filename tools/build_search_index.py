"""Builds the BM25 index that the `search` tool loads (`SearchTool(index_dir=OUT)`).

  python tools/build_search_index.py --corpus passages.jsonl --out INDEX_DIR [--overwrite]

The corpus has one JSON object per line: {"id": ..., "title": "...", "text": "..."} (or the FlashRAG
{"id": ..., "contents": "\"Title\"\\ntext"}). A malformed line stops the build with file:line and the problem.
A non-empty INDEX_DIR is not overwritten unless --overwrite is given.
"""

import argparse
import sys
import time

from aepo_jax.agent.tools.search import CorpusError, SearchIndex, read_corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--corpus", required=True, help="JSONL passage corpus")
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        index = SearchIndex.build(read_corpus(args.corpus))
        index.save(args.out, overwrite=args.overwrite)
    except (CorpusError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - start
    print(f"indexed {len(index)} passages from {args.corpus} -> {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
