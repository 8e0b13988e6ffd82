"""Agent tools (AEPO_SPEC.md section 1): `<search>` and `<python>`, behind one interface.

  tool = make_tool({"name": "python", "timeout_s": 5})      # or SearchTool(corpus="wiki.jsonl"), ...
  result = tool.call("print(1 + 1)")                          # ToolResult(text="2\\n", ok=True, ...)
  result = run_tool_call(pending_tool_call(segment), {"search": search, "python": python})

Registry (config "name" -> class): "search" (local BM25), "http_search" (remote service), "python"
(sandboxed interpreter). `Tool.call` never raises; see `base.py`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aepo_jax.agent.parsing import ToolCall
from aepo_jax.agent.tools.base import Tool, ToolError, ToolResult
from aepo_jax.agent.tools.python_tool import PythonTool, sandbox_status
from aepo_jax.agent.tools.search import CorpusError, HttpSearchTool, SearchIndex, SearchTool

TOOLS: dict[str, type[Tool]] = {cls.name: cls for cls in (SearchTool, HttpSearchTool, PythonTool)}

__all__ = ["TOOLS", "CorpusError", "HttpSearchTool", "PythonTool", "SearchIndex", "SearchTool", "Tool",
           "ToolError", "ToolResult", "make_tool", "run_tool_call", "sandbox_status"]


def make_tool(config: Mapping[str, Any]) -> Tool:
    """Builds a tool from a `to_config()`-style dict; the 'name' key picks the class from `TOOLS`."""
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"a tool config must be a dict with a 'name' key, got {config!r}")
    if config["name"] not in TOOLS:
        raise ValueError(f"unknown tool {config['name']!r}; known tools: {sorted(TOOLS)}")
    return TOOLS[config["name"]].from_config(config)


def run_tool_call(call: ToolCall, tools: Mapping[str, Tool]) -> ToolResult:
    """Runs a parsed call with the tool registered for its tag (`tools`: tag -> tool); never raises.

    A call the parser flagged as malformed, or a tag no tool handles, becomes a 'malformed' result.
    """
    if call.error is not None:
        return ToolResult(call.error, False, "malformed")
    if call.tag not in tools:
        return ToolResult(f"no tool handles <{call.tag}>; available: {', '.join(sorted(tools))}", False,
                          "malformed")
    return tools[call.tag].call(call.payload)
