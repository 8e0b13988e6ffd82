"""JSONL schemas fail with file:line; the epoch sampler covers every record and resumes exactly."""

import json

import pytest
from hypothesis import given, strategies as st

from aepo_jax.data.datasets import DataError, EpochSampler, SFTRecord, read_qa_jsonl, read_sft_jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_qa_records(tmp_path):
    f = _write(tmp_path / "qa.jsonl", [json.dumps({"id": "a", "question": "Q1?", "answers": ["x", "y"]}), "",
                                       json.dumps({"question": "Q2?", "answer": "z"})])
    records = read_qa_jsonl(f)
    assert [(r.id, r.question, r.answers) for r in records] == [
        ("a", "Q1?", ("x", "y")), (f"{f}:3", "Q2?", ("z",))]


@pytest.mark.parametrize("line,problem", [
    ('{"question": "Q", "answers": ["a"]', "not valid JSON"),
    ('["Q", "a"]', "expected a JSON object, got list"),
    ('{"answers": ["a"]}', "field 'question' must be a non-empty string"),
    ('{"question": "Q"}', "missing field 'answers'"),
    ('{"question": "Q", "answers": []}', "field 'answers' must be a non-empty list"),
    ('{"question": "Q", "answers": ["a", 3]}', "field 'answers' must be a non-empty list"),
])
def test_malformed_qa_names_file_and_line(tmp_path, line, problem):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"question": "ok", "answers": ["a"]}), line])
    with pytest.raises(DataError, match=f"^{f}:2: {problem}"):
        read_qa_jsonl(f)


def test_sft_records_and_errors(tmp_path):
    f = _write(tmp_path / "sft.jsonl", [json.dumps({"prompt": "p", "response": "r"}),
                                        json.dumps({"question": "q", "response": "s"})])
    assert read_sft_jsonl(f) == [SFTRecord(response="r", prompt="p"), SFTRecord(response="s", question="q")]
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p"})])
    with pytest.raises(DataError, match=f"^{bad}:1: field 'response'"):
        read_sft_jsonl(bad)
    for fields in ({"response": "r"}, {"prompt": "p", "question": "q", "response": "r"}):
        bad = _write(tmp_path / "bad.jsonl", [json.dumps(fields)])
        with pytest.raises(DataError, match=f"^{bad}:1: an SFT record needs exactly one of 'question'"):
            read_sft_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_sft_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no records"):
        read_sft_jsonl(_write(tmp_path / "empty.jsonl", [""]))


@given(size=st.integers(1, 20), batch=st.integers(1, 7), split=st.integers(0, 10), seed=st.integers(0, 99))
def test_sampler_epochs_cover_all_and_resume_exactly(size, batch, split, seed):
    straight = EpochSampler(size, seed)
    drawn = [straight.next_batch(batch) for _ in range(split + 5)]
    flat = sum(drawn, [])
    for e in range(len(flat) // size):  # every full epoch is a permutation
        assert sorted(flat[e * size:(e + 1) * size]) == list(range(size))
    first = EpochSampler(size, seed)
    for _ in range(split):
        first.next_batch(batch)
    resumed = EpochSampler(size, seed)
    resumed.restore(json.loads(json.dumps(first.position)))
    assert [resumed.next_batch(batch) for _ in range(5)] == drawn[split:]
