"""Stop strings detected on token ids, inside the compiled decode loop.

What is matched: exact token-id sequences. Each named stop string (e.g. "</search>") has one or more
alternative token-id sequences; a slot stops when the tokens it sampled since its last prefill end with
any alternative of any stop string enabled for it. Given a string and a tokenizer, the alternative is
`tokenizer.encode(string, add_special_tokens=False)`: the tokenisation of the string on its own. A model
can spell the same text with other tokens (a merge with the previous or next character, e.g. ">\\n" as one
token); pass those spellings as extra alternatives when your tokenizer produces them. Tokens of the prompt
or of an appended tool result never take part in a match (the history is cleared by every prefill).

Device side: each slot keeps its last `width` sampled tokens (width = the longest alternative), newest
last, -1 where empty; the alternatives form a right-aligned table [A, width] with a validity mask, so a
match is one comparison of [S, A, width] per step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class StopTable:
    """The registered stop strings of an engine (fixed at construction, so decode never recompiles)."""

    def __init__(self, stops: Mapping[str, Any] | Sequence[str] | None = None, tokenizer=None):
        """stops: {name: token ids | [alternative token ids, ...] | text} or a list of texts.

        Texts (a str value, or the names of a list) are tokenised with `tokenizer`.
        """
        if stops is None:
            stops = {}
        if not isinstance(stops, Mapping):
            stops = {s: s for s in stops}
        self.names: list[str] = []
        self.alternatives: list[list[tuple[int, ...]]] = []
        for name, spec in stops.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"stop string names must be non-empty str, got {name!r}")
            alts = self._alternatives(name, spec, tokenizer)
            self.names.append(name)
            self.alternatives.append(alts)
        flat = [(i, alt) for i, alts in enumerate(self.alternatives) for alt in alts]
        self.width = max([len(a) for _, a in flat], default=1)
        n = max(len(flat), 1)
        table = np.full((n, self.width), -2, np.int32)
        valid = np.zeros((n, self.width), bool)
        owner = np.zeros((n,), np.int32)
        for row, (i, alt) in enumerate(flat):
            table[row, self.width - len(alt):] = alt
            valid[row, self.width - len(alt):] = True
            owner[row] = i
        if not flat:
            valid[0, -1] = True  # a row that can never match (-2 is no token and -1 marks empty history)
        self.table, self.valid, self.owner = table, valid, owner

    @staticmethod
    def _alternatives(name, spec, tokenizer) -> list[tuple[int, ...]]:
        if isinstance(spec, str):
            if tokenizer is None:
                raise ValueError(f"stop string {name!r} is given as text ({spec!r}) but no tokenizer was "
                                 "passed; pass token ids or a tokenizer")
            specs = [tokenizer.encode(spec, add_special_tokens=False)]
        else:
            specs = list(spec)
            if specs and all(isinstance(t, (int, np.integer)) for t in specs):
                specs = [specs]
        alts = []
        for alt in specs:
            if isinstance(alt, str):
                if tokenizer is None:
                    raise ValueError(f"stop string {name!r}: alternative {alt!r} is text but no tokenizer "
                                     "was passed")
                alt = tokenizer.encode(alt, add_special_tokens=False)
            alt = tuple(int(t) for t in alt)
            if not alt or any(t < 0 for t in alt):
                raise ValueError(f"stop string {name!r}: alternative {alt!r} must be a non-empty sequence "
                                 "of token ids >= 0")
            alts.append(alt)
        if not alts:
            raise ValueError(f"stop string {name!r} has no token-id sequence")
        return alts

    def __len__(self) -> int:
        return len(self.names)

    def mask(self, names: Sequence[str] | None) -> np.ndarray:
        """Boolean [max(1, len(self))] enabling `names` (None = all); unknown names raise a ValueError."""
        out = np.zeros((max(1, len(self)),), bool)
        if names is None:
            out[:len(self)] = True
            return out
        if isinstance(names, str):
            names = [names]
        for name in names:
            if name not in self.names:
                raise ValueError(f"unknown stop string {name!r}; this engine was built with stop strings "
                                 f"{self.names} (pass stop_strings= to Engine)")
            out[self.names.index(name)] = True
        return out


def push_history(history: Array, tokens: Array, push: Array) -> Array:
    """Shifts tokens [S] in as the newest entry of history [S, W] for rows where push [S] is True."""
    shifted = jnp.concatenate([history[:, 1:], tokens[:, None].astype(history.dtype)], axis=1)
    return jnp.where(push[:, None], shifted, history)


def match(history: Array, enabled: Array, table: np.ndarray, valid: np.ndarray,
          owner: np.ndarray) -> tuple[Array, Array]:
    """(hit [S] bool, stop index [S] int32, -1 where no hit) of history [S, W] vs the table.

    enabled: [S, num_stops] bool, which stop strings apply to each slot.
    """
    eq = (history[:, None, :] == jnp.asarray(table)[None]) | ~jnp.asarray(valid)[None]
    owner = jnp.asarray(owner)
    hits = jnp.all(eq, axis=-1) & jnp.take(enabled, owner, axis=1)       # [S, A]
    any_hit = jnp.any(hits, axis=-1)
    which = owner[jnp.argmax(hits, axis=-1)]
    return any_hit, jnp.where(any_hit, which, -1).astype(jnp.int32)
