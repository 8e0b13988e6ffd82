"""The `http_search` tool against a local HTTP server on 127.0.0.1 (no outside network)."""
import http.server
import json
import threading
import time
import urllib.parse

import pytest

from aepo_jax.agent.tools import HttpSearchTool

RESULTS = [{"title": "Ada Lovelace", "text": "Ada Lovelace wrote the first published algorithm."},
           {"contents": '"Analytical Engine"\nA proposed mechanical general-purpose computer.'}]


class _Handler(http.server.BaseHTTPRequestHandler):
    """Path picks the behaviour: /ok, /slow (1 s), /error500, /error404, /badjson. Requests are recorded."""

    def _respond(self, query):
        self.server.requests.append((self.command, self.path, query))
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        status, body = {"/error500": (500, b"{}"), "/error404": (404, b"{}"),
                        "/badjson": (200, b"not json")}.get(self.path.split("?")[0],
                                                            (200, json.dumps({"results": RESULTS}).encode()))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._respond(body)

    def do_GET(self):
        self._respond(dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query)))

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


EXPECTED = ("Doc 1 (Title: Ada Lovelace) Ada Lovelace wrote the first published algorithm.\n"
            "Doc 2 (Title: Analytical Engine) A proposed mechanical general-purpose computer.")


def test_post_success(server):
    httpd, url = server
    r = HttpSearchTool(url=f"{url}/search").call("  first   algorithm ")
    assert (r.ok, r.text) == (True, EXPECTED)
    assert httpd.requests == [("POST", "/search", {"query": "first algorithm", "top_k": 3})]


def test_get_success_and_top_k(server):
    httpd, url = server
    r = HttpSearchTool(url=f"{url}/search", method="GET", top_k=1).call("algorithm")
    assert (r.ok, r.text) == (True, EXPECTED.split("\n")[0])
    assert httpd.requests == [
        ("GET", "/search?query=algorithm&top_k=1", {"query": "algorithm", "top_k": "1"})]


def test_cache_hit_does_not_call_the_server_again(server, tmp_path):
    httpd, url = server
    first = HttpSearchTool(url=f"{url}/search", cache_dir=str(tmp_path)).call("algorithm")
    second = HttpSearchTool(url=f"{url}/search", cache_dir=str(tmp_path)).call("algorithm")  # a new tool
    assert first.text == second.text == EXPECTED
    assert len(httpd.requests) == 1
    HttpSearchTool(url=f"{url}/search", cache_dir=str(tmp_path)).call("another query")
    assert len(httpd.requests) == 2


def test_timeout_becomes_result_text(server):
    httpd, url = server
    start = time.monotonic()
    r = HttpSearchTool(url=f"{url}/slow", timeout_s=0.2, retries=0).call("algorithm")
    assert time.monotonic() - start < 0.9
    assert (r.ok, r.error_kind, r.text) == (False, "timeout", "search service timed out after 0.2 s")


def test_server_error_is_retried_then_reported(server, tmp_path):
    httpd, url = server
    r = HttpSearchTool(url=f"{url}/error500", retries=2, backoff_s=0.01, cache_dir=str(tmp_path)).call("q")
    assert (r.ok, r.error_kind) == (False, "error")
    assert r.text == "search service error: HTTP 500 Internal Server Error"
    assert len(httpd.requests) == 3  # first try + 2 retries
    assert not any(tmp_path.iterdir())  # failures are not cached


def test_client_error_is_not_retried(server):
    httpd, url = server
    r = HttpSearchTool(url=f"{url}/error404", retries=2, backoff_s=0.01).call("q")
    assert (r.ok, r.text) == (False, "search service error: HTTP 404 Not Found")
    assert len(httpd.requests) == 1


def test_invalid_json_and_unreachable_service(server):
    httpd, url = server
    r = HttpSearchTool(url=f"{url}/badjson", retries=0).call("q")
    assert not r.ok and r.text.startswith("search service returned invalid JSON")
    closed_port_url = "http://127.0.0.1:9"  # discard port: nothing listens there
    r = HttpSearchTool(url=closed_port_url, retries=1, backoff_s=0.01).call("q")
    assert (r.ok, r.error_kind) == (False, "error") and r.text.startswith("search service unreachable")


def test_empty_query_never_reaches_the_server(server):
    httpd, url = server
    r = HttpSearchTool(url=url).call("   ")
    assert (r.ok, r.error_kind) == (False, "malformed")
    assert httpd.requests == []


def test_config_round_trip_and_validation():
    tool = HttpSearchTool(url="http://localhost:8000/retrieve", retries=1)
    config = tool.to_config()
    assert config["name"] == "http_search" and config["retries"] == 1
    assert HttpSearchTool.from_config(config).to_config() == config
    with pytest.raises(ValueError, match="'url': expected an http\\(s\\) URL, got 'localhost:8000'"):
        HttpSearchTool(url="localhost:8000")
