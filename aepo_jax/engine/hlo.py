"""Reads compiled HLO text to check that the decode loop never copies the KV cache.

A decode step must read each layer's cache once and write one row per slot in place. XLA inserts a `copy`
(or a `transpose`) of a whole buffer when a loop-carried value cannot be updated in place or when a matmul
wants another layout; either turns a memory-bound step into several passes over the cache. `cache_copies`
lists every copy / transpose instruction whose result has the cache buffer's shape.
"""

from __future__ import annotations

import re

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+)\[([\d,]*)\](\{[^}]*\})?\s+([\w\-]+)\(")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_COPY_OPS = {"copy", "transpose", "copy-start"}


def instructions(hlo_text: str):
    """Yields (computation, name, dtype, dims, layout, opcode) for each array-shaped instruction."""
    computation = None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            name, dtype, dims, layout, opcode = m.groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            yield computation, name, dtype, shape, layout or "", opcode
            continue
        c = _COMPUTATION.match(line)
        if c and "=" not in line:
            computation = c.group(1)


def cache_copies(hlo_text: str, shape: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(computation, instruction, opcode) of each copy / transpose producing an array of `shape`."""
    shape = tuple(shape)
    return [(comp, name, op) for comp, name, _, dims, _, op in instructions(hlo_text)
            if dims == shape and (op in _COPY_OPS or "transpose" in name or name.startswith("copy"))]


def cache_shaped(hlo_text: str, shape: tuple[int, ...]) -> dict[str, int]:
    """Counts of the opcodes that produce arrays of `shape` (for a quick look at what touches the cache)."""
    counts: dict[str, int] = {}
    for _, _, _, dims, _, op in instructions(hlo_text):
        if dims == tuple(shape):
            counts[op] = counts.get(op, 0) + 1
    return counts
