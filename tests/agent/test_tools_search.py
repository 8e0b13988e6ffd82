"""The local BM25 `search` tool, its corpus validation and index files, and the build CLI."""
import json
import subprocess
import sys
import time

import pytest

from aepo_jax.agent.tools import CorpusError, SearchIndex, SearchTool
from aepo_jax.agent.tools.search import Passage, format_passages, read_corpus

PASSAGES = [
    {"id": "p1", "title": "Paris", "text": "Paris is the capital and most populous city of France."},
    {"id": "p2", "title": "Berlin", "text": "Berlin is the capital and largest city of Germany."},
    {"id": 3, "title": "Python (programming language)",
     "text": "Python is a high-level programming language created by Guido van Rossum."},
    {"id": "p4", "title": "Mount Everest", "text": "Mount Everest is the highest mountain above sea level."},
    {"id": "p5", "title": "Photosynthesis", "text": "Plants convert light energy into chemical energy."},
    {"id": "p6", "title": "Danube", "text": "The Danube flows through Vienna, Budapest and Belgrade."},
]


def _write_corpus(path, records, blank_line_at=None):
    lines = [json.dumps(r) for r in records]
    if blank_line_at is not None:
        lines.insert(blank_line_at, "   ")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "passages.jsonl", PASSAGES, blank_line_at=2)


@pytest.fixture(scope="module")
def tool(corpus):
    return SearchTool(corpus=corpus, top_k=2)


def test_each_passage_is_retrieved_first_for_its_own_text(tool):
    for record in PASSAGES:
        r = tool.call(record["text"])
        assert r.ok
        assert r.text.split("\n")[0] == f"Doc 1 (Title: {record['title']}) {record['text']}", r.text


def test_result_format_and_ranking(tool):
    r = tool.call("capital city of Germany")
    assert r.text == ("Doc 1 (Title: Berlin) Berlin is the capital and largest city of Germany.\n"
                      "Doc 2 (Title: Paris) Paris is the capital and most populous city of France.")


def test_ties_are_broken_by_corpus_order(tmp_path):
    records = [{"title": f"T{i}", "text": "unrelated words" if i % 3 else "shared phrase"} for i in range(12)]
    tool = SearchTool(corpus=_write_corpus(tmp_path / "c.jsonl", records), top_k=2)
    expected = "Doc 1 (Title: T0) shared phrase\nDoc 2 (Title: T3) shared phrase"
    assert tool.call("shared phrase").text == expected


def test_passages_without_a_matching_word_are_not_returned(tool):
    r = tool.call("who created python")
    assert r.text.count("Doc ") == 1 and "(Title: Python (programming language))" in r.text


def test_no_match_and_stopword_only_queries(tool):
    for query in ("zyxwv qwerty", "the of and"):
        assert (tool.call(query).ok, tool.call(query).text) == (True, "No passages match the query.")


def test_empty_query_is_malformed(tool):
    for query in ("", "  \n "):
        r = tool.call(query)
        assert (r.ok, r.error_kind) == (False, "malformed") and "empty search query" in r.text


def test_huge_query_is_cut_and_fast(tool):
    query = "Everest highest mountain " + "lorem ipsum dolor sit amet " * 200_000  # ~5.4 MB
    start = time.monotonic()
    r = tool.call(query)
    assert time.monotonic() - start < 2.0
    assert r.ok and r.text.startswith("Doc 1 (Title: Mount Everest)")


def test_output_is_cut_to_max_chars(corpus):
    r = SearchTool(corpus=corpus, top_k=3, max_chars=60).call("populous capital")
    assert r.text == "Doc 1 (Title: Paris) Paris is the capital and most ..."
    assert len(r.text) <= 60


def test_format_passages_short_text_untouched():
    passages = [Passage("1", "A", "alpha beta"), Passage("2", "B", "gamma")]
    assert format_passages(passages, 1000) == "Doc 1 (Title: A) alpha beta\nDoc 2 (Title: B) gamma"


def test_flashrag_contents_format(tmp_path):
    record = {"id": "0", "contents": '"Aaron"\nAaron is a prophet in the Bible.'}
    path = _write_corpus(tmp_path / "c.jsonl", [record])
    assert read_corpus(path) == [Passage("0", "Aaron", "Aaron is a prophet in the Bible.")]


@pytest.mark.parametrize("bad_line, problem", [
    ('{"title": "x", "text": "y"', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ('{"title": "x"}', "missing key 'text' (or 'contents')"),
    ('{"title": 5, "text": "y"}', "'title' must be a string, got int"),
    ('{"id": [1], "text": "y"}', "'id' must be a string or an integer, got list"),
])
def test_malformed_corpus_line_names_file_and_line(tmp_path, bad_line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PASSAGES[0]) + "\n\n" + bad_line + "\n" + json.dumps(PASSAGES[1]) + "\n")
    with pytest.raises(CorpusError) as info:
        SearchTool(corpus=str(path))
    assert str(info.value).startswith(f"{path}:3: ") and problem in str(info.value)


def test_missing_or_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="cannot read corpus"):
        read_corpus(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(CorpusError, match="no passages"):
        read_corpus(str(tmp_path / "empty.jsonl"))


def test_saved_index_matches_in_memory_index(tool, tmp_path):
    tool.index.save(str(tmp_path / "index"))
    loaded = SearchTool(index_dir=str(tmp_path / "index"), top_k=2)
    for query in ("capital city", "Vienna river", "light energy plants", "nothing matches zzz"):
        assert loaded.call(query).text == tool.call(query).text
    with pytest.raises(FileExistsError, match="not empty"):
        tool.index.save(str(tmp_path / "index"))


def test_loading_a_directory_that_is_not_an_index(tmp_path):
    with pytest.raises(CorpusError, match="not a search index"):
        SearchIndex.load(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(CorpusError, match="expected format 'aepo_jax.search_index' version 1"):
        SearchIndex.load(str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "aepo_jax.search_index", "version": 1}))
    with pytest.raises(CorpusError, match="incomplete or damaged search index"):
        SearchIndex.load(str(tmp_path))


def _build_cli(*args):
    return subprocess.run([sys.executable, "tools/build_search_index.py", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_build_cli(corpus, tool, tmp_path):
    done = _build_cli("--corpus", corpus, "--out", tmp_path / "idx")
    assert done.returncode == 0, done.stderr
    assert f"indexed {len(PASSAGES)} passages" in done.stdout
    assert SearchTool(index_dir=str(tmp_path / "idx"), top_k=2).call("Guido").text == tool.call("Guido").text
    again = _build_cli("--corpus", corpus, "--out", tmp_path / "idx")
    assert again.returncode == 1 and "not empty" in again.stderr
    assert _build_cli("--corpus", corpus, "--out", tmp_path / "idx", "--overwrite").returncode == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 1}\n')
    failed = _build_cli("--corpus", bad, "--out", tmp_path / "idx2")
    assert failed.returncode == 1 and f"{bad}:2: 'text' must be a string, got int" in failed.stderr


def test_config_needs_exactly_one_source(corpus):
    with pytest.raises(ValueError, match="'index_dir / corpus': expected exactly one of them"):
        SearchTool()
    with pytest.raises(ValueError, match="'top_k': expected a positive integer, got 0"):
        SearchTool(corpus=corpus, top_k=0)
