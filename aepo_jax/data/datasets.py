"""JSONL datasets: question/answer files for RL, prompt/response files for SFT, and a resumable sampler.

Schemas (one JSON object per line; blank lines are skipped):
  QA:  {"question": str, "answers": [str, ...]}   ("answer": str is accepted for a single gold answer;
       "id" is optional and defaults to "<file>:<line>")
  SFT: {"question": str, "response": str}  the prompt is built from the question as every RL and eval prompt
       is (`world.encode_prompt`, --prompt_format), so SFT and RL see the same prompt format;
       or {"prompt": str, "response": str}  a prompt text tokenized as written. Not both.
A malformed file fails when it is read, before any compute, with `file:line: problem`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    response: str
    question: str | None = None  # rendered like the RL prompts
    prompt: str | None = None    # or a prompt text, used as written


class DataError(ValueError):
    """A data file that does not follow its schema; the message starts with `file:line:`."""


def _read_jsonl(path: str, parse: Callable[[dict[str, Any], str], Any]) -> list[Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(parse(obj, where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}"[:300])
    return value


def _parse_qa(obj: dict[str, Any], where: str) -> QARecord:
    question = _string(obj, "question", where)
    if "answers" in obj:
        answers = obj["answers"]
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise DataError(f"{where}: field 'answers' must be a non-empty list of non-empty strings, "
                            f"got {answers!r}"[:300])
    elif "answer" in obj:
        answers = [_string(obj, "answer", where)]
    else:
        raise DataError(f"{where}: missing field 'answers' (a list of gold answers)")
    return QARecord(id=str(obj.get("id", where)), question=question, answers=tuple(answers))


def _parse_sft(obj: dict[str, Any], where: str) -> SFTRecord:
    if ("question" in obj) == ("prompt" in obj):
        raise DataError(f"{where}: an SFT record needs exactly one of 'question' (rendered like the RL prompts) "
                        f"and 'prompt' (a prompt text used as written), got fields {sorted(obj)}"[:300])
    key = "question" if "question" in obj else "prompt"
    return SFTRecord(response=_string(obj, "response", where), **{key: _string(obj, key, where)})


def read_qa_jsonl(path: str | os.PathLike) -> list[QARecord]:
    """Question/answer records of a JSONL file (see the module docstring for the schema)."""
    return _read_jsonl(path, _parse_qa)


def read_sft_jsonl(path: str | os.PathLike) -> list[SFTRecord]:
    """Question (or prompt) / response records of a JSONL file (see the module docstring for the schema)."""
    return _read_jsonl(path, _parse_sft)


@dataclasses.dataclass
class EpochSampler:
    """Deterministic shuffled batches over `size` records; `position` (epoch, offset) resumes exactly.

    Epoch e uses the permutation drawn from (seed, e), so the order does not depend on how many batches a
    previous run drew; a batch may span an epoch boundary.
    """

    size: int
    seed: int
    epoch: int = 0
    offset: int = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_batch(self, batch_size: int) -> list[int]:
        indices = []
        while len(indices) < batch_size:
            take = min(batch_size - len(indices), self.size - self.offset)
            indices.extend(self._order(self.epoch)[self.offset:self.offset + take].tolist())
            self.offset += take
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return indices

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])


def batches(records: Sequence[Any], sampler: EpochSampler, batch_size: int) -> Iterator[list[Any]]:
    """Endless batches of records in the sampler's order."""
    while True:
        yield [records[i] for i in sampler.next_batch(batch_size)]
