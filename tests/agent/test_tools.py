"""The tool interface: results never raise, configs round-trip through the registry, calls dispatch by tag."""
import json

import pytest

from aepo_jax.agent.parsing import ToolCall
from aepo_jax.agent.tools import TOOLS, PythonTool, Tool, ToolError, make_tool, run_tool_call


class _Echo(Tool):
    name = "echo"
    tag = "echo"

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def _run(self, text):
        if text == "boom":
            raise RuntimeError("unexpected bug")
        if text == "bad":
            raise ToolError("malformed", "bad call")
        return self.prefix + text


def test_call_turns_failures_into_results():
    tool = _Echo(">")
    ok = tool.call("hi")
    assert (ok.text, ok.ok, ok.error_kind) == (">hi", True, None) and ok.elapsed_s >= 0
    bad = tool.call("bad")
    assert (bad.text, bad.ok, bad.error_kind) == ("bad call", False, "malformed")
    crash = tool.call("boom")  # a bug inside a tool must not escape into the rollout
    assert (crash.text, crash.ok, crash.error_kind) == (
        "echo tool failed: RuntimeError: unexpected bug", False, "error")


def test_tool_error_kind_is_checked():
    with pytest.raises(ValueError, match="kind must be one of"):
        ToolError("oops", "message")


def test_registry_round_trip(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"title": "T", "text": "some text"}) + "\n")
    configs = [{"name": "python", "timeout_s": 2.0},
               {"name": "search", "corpus": str(corpus), "top_k": 1},
               {"name": "http_search", "url": "http://127.0.0.1:1/x", "cache_dir": str(tmp_path / "cache")}]
    for config in configs:
        tool = make_tool(config)
        assert isinstance(tool, TOOLS[config["name"]])
        full = tool.to_config()
        assert json.loads(json.dumps(full)) == full  # JSON-able
        assert {k: full[k] for k in config} == config  # the given keys, plus defaults for the others
        assert make_tool(full).to_config() == full


def test_registry_errors_are_clear():
    known = r"unknown tool 'calculator'; known tools: \['http_search', 'python', 'search'\]"
    with pytest.raises(ValueError, match=known):
        make_tool({"name": "calculator"})
    with pytest.raises(ValueError, match="must be a dict with a 'name' key"):
        make_tool({"timeout_s": 1})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['timeout'\] for tool 'python'") as info:
        make_tool({"name": "python", "timeout": 1})
    assert "accepted: ['extra_read_paths', 'max_file_mb'" in str(info.value)
    with pytest.raises(ValueError, match="config names tool 'search', but this is PythonTool"):
        PythonTool.from_config({"name": "search"})


def test_run_tool_call_dispatches_by_tag():
    tools = {"echo": _Echo("#")}
    assert run_tool_call(ToolCall("echo", "x"), tools).text == "#x"
    missing_open = run_tool_call(ToolCall("echo", "", "found </echo> without an opening <echo>"), tools)
    assert (missing_open.ok, missing_open.error_kind, missing_open.text) == (
        False, "malformed", "found </echo> without an opening <echo>")
    unknown = run_tool_call(ToolCall("python", "1"), tools)
    assert (unknown.ok, unknown.error_kind, unknown.text) == (
        False, "malformed", "no tool handles <python>; available: echo")
