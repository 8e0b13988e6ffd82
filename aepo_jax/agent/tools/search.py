"""The `search` tools: BM25 over a local JSONL passage corpus, or a remote search service over HTTP.

Corpus format: one JSON object per line, `{"id": ..., "title": "...", "text": "..."}`; `id` (str or int)
and `title` are optional. The FlashRAG / Search-R1 wiki format `{"id": ..., "contents": "\"Title\"\\ntext"}`
is accepted too. Blank lines are skipped; anything else that is not such an object fails with file:line.

Both tools return the top passages in the Search-R1 layout,
  Doc 1 (Title: Paris) Paris is the capital of France ...
  Doc 2 (Title: ...) ...
cut to `max_chars` characters.

BM25 is `bm25s` (Lucene variant, k1 = 1.5, b = 0.75, English stop words, lower-cased word tokens; no
stemming, so no extra dependency). A saved index is a directory:
  index.json      format marker, passage count, BM25 settings
  bm25/           the bm25s sparse score matrix and vocabulary (numpy + JSON, no pickle)
  passages.jsonl  the validated passages, normalised to {"id", "title", "text"}
  offsets.npy     byte offset of each passage line, so only the retrieved passages are read from disk
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import bm25s
import numpy as np

from aepo_jax.agent.tools.base import Tool, ToolError, require

INDEX_FORMAT = "aepo_jax.search_index"
INDEX_VERSION = 1
BM25_PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}
STOPWORDS = "en"


class CorpusError(ValueError):
    """A corpus or index file is not in the expected format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def passage_from_json(obj: Any, where: str) -> Passage:
    """Validates one corpus record (`where` = "file:line" for the error message)."""
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        title, text = obj.get("title", ""), obj["text"]
    elif "contents" in obj:  # FlashRAG / Search-R1: '"Title"\ntext'
        if not isinstance(obj["contents"], str):
            raise CorpusError(f"{where}: 'contents' must be a string, got {type(obj['contents']).__name__}")
        title, _, text = obj["contents"].partition("\n")
        title = title.strip().strip('"')
    else:
        raise CorpusError(f"{where}: missing key 'text' (or 'contents'); keys present: {sorted(obj)}")
    for key, value in (("title", title), ("text", text)):
        if not isinstance(value, str):
            raise CorpusError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    pid = obj.get("id", "")
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise CorpusError(f"{where}: 'id' must be a string or an integer, got {type(pid).__name__}")
    return Passage(str(pid), title, text)


def read_corpus(path: str) -> list[Passage]:
    """Reads and validates a JSONL corpus; errors name `path:line` and the problem."""
    passages = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise CorpusError(f"{path}: cannot read corpus: {e.strerror}") from e
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
                passages.append(passage_from_json(obj, f"{path}:{lineno}"))
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)") from e
    if not passages:
        raise CorpusError(f"{path}: the corpus has no passages")
    return passages


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def format_passages(passages: Sequence[Passage], max_chars: int) -> str:
    """'Doc i (Title: t) text' lines, cut at a word boundary to at most `max_chars` characters."""
    text = "\n".join(f"Doc {i} (Title: {p.title}) {p.text}" for i, p in enumerate(passages, 1))
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 4]
    cut = cut[: cut.rfind(" ")] if " " in cut else cut
    return cut + " ..."


class SearchIndex:
    """BM25 over passages: built in memory from a corpus (`build`) or loaded from a directory (`load`)."""

    def __init__(self, bm25: bm25s.BM25, passages: Sequence[Passage] | _PassageFile):
        self._bm25 = bm25
        self._passages = passages

    def __len__(self) -> int:
        return len(self._passages)

    @classmethod
    def build(cls, passages: list[Passage]) -> SearchIndex:
        bm25 = bm25s.BM25(**BM25_PARAMS)
        bm25.index(_tokenize([f"{p.title} {p.text}" for p in passages]), show_progress=False)
        return cls(bm25, passages)

    def save(self, out_dir: str, overwrite: bool = False) -> None:
        """Writes the index directory; refuses a non-empty `out_dir` unless `overwrite`."""
        if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
        os.makedirs(out_dir, exist_ok=True)
        self._bm25.save(os.path.join(out_dir, "bm25"))
        offsets = [0]
        with open(os.path.join(out_dir, "passages.jsonl"), "wb") as f:
            for i in range(len(self)):
                line = json.dumps(dataclasses.asdict(self._passages[i]), ensure_ascii=False).encode() + b"\n"
                f.write(line)
                offsets.append(offsets[-1] + len(line))
        np.save(os.path.join(out_dir, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "num_passages": len(self),
                "bm25": BM25_PARAMS, "stopwords": STOPWORDS}
        with open(os.path.join(out_dir, "index.json"), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, index_dir: str) -> SearchIndex:
        """Loads a directory written by `save` (the score matrix is memory-mapped)."""
        meta_path = os.path.join(index_dir, "index.json")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CorpusError(f"{meta_path}: not a search index written by build_search_index.py "
                              f"({e})") from e
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise CorpusError(f"{meta_path}: expected format {INDEX_FORMAT!r} version {INDEX_VERSION}, got "
                              f"{meta.get('format')!r} version {meta.get('version')!r}")
        try:
            bm25 = bm25s.BM25.load(os.path.join(index_dir, "bm25"), mmap=True)
            passages = _PassageFile(os.path.join(index_dir, "passages.jsonl"),
                                    np.load(os.path.join(index_dir, "offsets.npy"), mmap_mode="r"))
        except (OSError, ValueError) as e:
            raise CorpusError(f"{index_dir}: incomplete or damaged search index ({e})") from e
        expected = meta.get("num_passages")
        if len(passages) != expected or bm25.scores["num_docs"] != expected:
            raise CorpusError(f"{index_dir}: index.json says {expected} passages, but the files hold "
                              f"{len(passages)} passages and {bm25.scores['num_docs']} BM25 documents")
        return cls(bm25, passages)

    def search(self, query: str, top_k: int) -> list[Passage]:
        """The `top_k` best passages with a positive BM25 score, best first, ties in corpus order."""
        tokens = _tokenize([query])[0]
        if not tokens:
            return []
        scores = self._bm25.get_scores(tokens)
        k = min(top_k, len(scores))
        threshold = scores[np.argpartition(-scores, k - 1)[:k]].min()
        # Every passage at or above the k-th score (ties included, so ties are settled by index), but
        # never a passage that shares no word with the query.
        candidates = np.flatnonzero(scores >= threshold if threshold > 0 else scores > 0)
        best = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
        return [self._passages[int(i)] for i in best]


class _PassageFile:
    """Random access to the passages of a saved index without loading them all into memory."""

    def __init__(self, path: str, offsets: np.ndarray):
        self._path = path
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Passage:
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        with open(self._path, "rb") as f:
            f.seek(start)
            return Passage(**json.loads(f.read(end - start)))


def _query(text: str, max_query_chars: int) -> str:
    query = " ".join(text.split())
    if not query:
        raise ToolError("malformed", "empty search query: write the query between <search> and </search>")
    return query[:max_query_chars]


class SearchTool(Tool):
    """Local BM25 search. Exactly one of `index_dir` (built by tools/build_search_index.py) or `corpus`
    (a JSONL file, indexed in memory when the tool is made) must be given.

    Queries longer than `max_query_chars` are cut (a pasted document must not make a search slow).
    """

    name = "search"
    tag = "search"

    def __init__(self, index_dir: str | None = None, corpus: str | None = None, top_k: int = 3,
                 max_chars: int = 3000, max_query_chars: int = 1000):
        require((index_dir is None) != (corpus is None), "index_dir / corpus", "exactly one of them",
                {"index_dir": index_dir, "corpus": corpus})
        for key, value in (("top_k", top_k), ("max_chars", max_chars), ("max_query_chars", max_query_chars)):
            require(isinstance(value, int) and value > 0, key, "a positive integer", value)
        self.index_dir, self.corpus = index_dir, corpus
        self.top_k, self.max_chars, self.max_query_chars = top_k, max_chars, max_query_chars
        self.index = SearchIndex.load(index_dir) if index_dir else SearchIndex.build(read_corpus(corpus))

    def _run(self, text: str) -> str:
        passages = self.index.search(_query(text, self.max_query_chars), self.top_k)
        if not passages:
            return "No passages match the query."
        return format_passages(passages, self.max_chars)


class HttpSearchTool(Tool):
    """Search through an HTTP service (e.g. a retrieval server or a web-search proxy).

    Request: POST `{"query": q, "top_k": k}` as JSON to `url`, or GET `url?query=q&top_k=k`.
    Response: a JSON object `{"results": [passage, ...]}`, each passage in the corpus format above.
    Failures (connection errors, timeouts, HTTP 5xx) are retried `retries` times, waiting
    `backoff_s * 2**attempt` between tries; HTTP 4xx and malformed responses are not retried. Successful
    results are cached on disk in `cache_dir` (one JSON file per query, keyed by a hash of url, method,
    query and top_k), so repeated queries across rollouts and runs cost nothing.
    """

    name = "http_search"
    tag = "search"

    def __init__(self, url: str, method: str = "POST", top_k: int = 3, max_chars: int = 3000,
                 max_query_chars: int = 1000, timeout_s: float = 10.0, retries: int = 2,
                 backoff_s: float = 0.5, cache_dir: str | None = None):
        require(urllib.parse.urlparse(url).scheme in ("http", "https"), "url", "an http(s) URL", url)
        require(method in ("POST", "GET"), "method", "'POST' or 'GET'", method)
        for key, value in (("top_k", top_k), ("max_chars", max_chars), ("max_query_chars", max_query_chars)):
            require(isinstance(value, int) and value > 0, key, "a positive integer", value)
        require(timeout_s > 0, "timeout_s", "a positive number of seconds", timeout_s)
        require(isinstance(retries, int) and retries >= 0, "retries", "an integer >= 0", retries)
        require(backoff_s >= 0, "backoff_s", "a number of seconds >= 0", backoff_s)
        self.url, self.method, self.top_k, self.max_chars = url, method, top_k, max_chars
        self.max_query_chars, self.timeout_s, self.retries, self.backoff_s = (
            max_query_chars, timeout_s, retries, backoff_s)
        self.cache_dir = cache_dir

    def _run(self, text: str) -> str:
        query = _query(text, self.max_query_chars)
        cache_path = self._cache_path(query)
        if cache_path and os.path.exists(cache_path):
            with open(cache_path) as f:
                passages = self._passages(json.load(f)["results"])
        else:
            records = self._fetch(query)
            passages = self._passages(records)
            if cache_path:
                _atomic_write_json(cache_path, {"query": query, "results": records})
        if not passages:
            return "No passages match the query."
        return format_passages(passages[: self.top_k], self.max_chars)

    def _passages(self, records: list) -> list[Passage]:
        try:
            return [passage_from_json(r, f"{self.url} result {i}") for i, r in enumerate(records)]
        except CorpusError as e:
            raise ToolError("error", f"search service returned a malformed passage: {e}") from e

    def _cache_path(self, query: str) -> str | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.url, self.method, query, self.top_k]).encode()).hexdigest()
        return os.path.join(self.cache_dir, key[:2], key + ".json")

    def _request(self, query: str) -> urllib.request.Request:
        if self.method == "GET":
            params = urllib.parse.urlencode({"query": query, "top_k": self.top_k})
            return urllib.request.Request(f"{self.url}{'&' if '?' in self.url else '?'}{params}")
        body = json.dumps({"query": query, "top_k": self.top_k}).encode()
        return urllib.request.Request(self.url, data=body, method="POST",
                                      headers={"Content-Type": "application/json"})

    def _fetch(self, query: str) -> list:
        """The service's result records; raises ToolError after the last failed try."""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(self._request(query), timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                failure = ToolError("error", f"search service error: HTTP {e.code} {e.reason}")
                if e.code < 500:
                    raise failure from e
            except TimeoutError:
                failure = ToolError("timeout", f"search service timed out after {self.timeout_s:g} s")
            except urllib.error.URLError as e:
                kind = "timeout" if isinstance(e.reason, TimeoutError) else "error"
                failure = ToolError(kind, f"search service unreachable: {e.reason}")
            except OSError as e:  # connection reset mid-response and the like
                failure = ToolError("error", f"search service connection failed: {e}")
            else:
                return _results_of(body)
        raise failure


def _results_of(body: bytes) -> list:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolError("error", f"search service returned invalid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ToolError("error", "search service response must be a JSON object with a 'results' list")
    return data["results"]


def _atomic_write_json(path: str, obj: Any) -> None:
    """Writes via a temporary file + rename so concurrent readers never see half a cache entry."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{id(obj)}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)

