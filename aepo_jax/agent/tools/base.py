"""The interface every agent tool implements, and the result the rollout loop appends as `<result>`.

A tool is called with the text the model wrote between its tags (`<search>query</search>` -> "query") and
returns a `ToolResult`. `Tool.call` never raises: a malformed call, a timeout or a crash inside the tool
becomes the result text with `ok=False`, because one bad tool call must not kill a rollout (DESIGN.md).

Tools are built from JSON-able configs: `tool.to_config()` gives `{"name": ..., **constructor kwargs}` and
`make_tool(config)` (in `aepo_jax.agent.tools`) turns that dict back into an equal tool.
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

log = logging.getLogger(__name__)

ERROR_KINDS = ("timeout", "error", "malformed")


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a tool call produced.

    text: what the model sees inside `<result>..</result>` (also on failure: an error message).
    ok: False when the call failed; `error_kind` then says how: 'timeout', 'error' (the tool or the code
      it ran failed) or 'malformed' (the model's call itself was unusable, e.g. an empty query).
    elapsed_s: wall-clock seconds the call took (for the "time the accelerator waits on tools" metric).
    """

    text: str
    ok: bool
    error_kind: str | None = None
    elapsed_s: float = 0.0


class ToolError(Exception):
    """Raised inside `Tool._run` to end a call with `ok=False`; the message becomes the result text."""

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"ToolError kind must be one of {ERROR_KINDS}, got {kind!r}")
        super().__init__(message)
        self.kind = kind


class Tool(abc.ABC):
    """Base class: subclasses set `name` (registry key) and `tag` (the XML tag), and implement `_run`.

    Every constructor argument must be stored under an attribute of the same name and be JSON-able:
    `to_config` reads them back from the constructor signature.
    """

    name: ClassVar[str]
    tag: ClassVar[str]

    def call(self, text: str) -> ToolResult:
        """Runs the tool on the model-written `text`; never raises."""
        start = time.monotonic()
        try:
            out = self._run(text)
            return ToolResult(out, True, None, time.monotonic() - start)
        except ToolError as e:
            return ToolResult(str(e), False, e.kind, time.monotonic() - start)
        except Exception as e:  # a bug or an unexpected library error: report it, keep the rollout alive
            log.exception("%s tool crashed", self.name)
            return ToolResult(f"{self.name} tool failed: {type(e).__name__}: {e}", False, "error",
                              time.monotonic() - start)

    @abc.abstractmethod
    def _run(self, text: str) -> str:
        """Returns the result text, or raises `ToolError` for a failure the model should read about."""

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """The constructor's keyword arguments, i.e. the keys `from_config` accepts besides 'name'."""
        params = inspect.signature(cls.__init__).parameters
        return tuple(p for p in params if p != "self")

    def to_config(self) -> dict[str, Any]:
        """A JSON-able dict that `make_tool` / `from_config` turn back into an equal tool."""
        return {"name": self.name, **{k: getattr(self, k) for k in self.config_keys()}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Tool:
        """Builds the tool from `config`; unknown keys are an error that lists the accepted ones."""
        kwargs = {k: v for k, v in config.items() if k != "name"}
        if config.get("name", cls.name) != cls.name:
            raise ValueError(f"config names tool {config['name']!r}, but this is {cls.__name__} "
                             f"({cls.name!r})")
        unknown = sorted(set(kwargs) - set(cls.config_keys()))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} for tool {cls.name!r}; "
                             f"accepted: {sorted(cls.config_keys())}")
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_config()})"


def require(condition: bool, key: str, expected: str, got: Any) -> None:
    """Constructor argument check with a message that names the key and what was expected."""
    if not condition:
        raise ValueError(f"tool config {key!r}: expected {expected}, got {got!r}")
