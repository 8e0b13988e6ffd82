"""Parsing of the agent's tagged output (AEPO_SPEC.md sections 1-2).

The model writes `<think>..</think>`, calls tools with `<search>query</search>` / `<python>code</python>`,
the rollout loop appends ` <result>\\n{text}\\n</result>` after each call, and the model ends with
`<answer>..\\boxed{..}</answer>`. This module finds the pending tool call in a freshly generated segment,
checks the format of a finished response (spec section 2) and extracts the answer. Pure string functions.

Tool output is not the model's writing: the format check looks at the response with the bodies of
`<result>..</result>` blocks blanked out, so a search passage or a program that prints a tag cannot
break (or fake) the structure.
"""
from __future__ import annotations

import dataclasses
import re
import textwrap

TOOL_TAGS = ("search", "python")

_FENCE = re.compile(r"\A\s*```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n[ \t]*```\s*)?\Z", re.S | re.I)
_BOXED = re.compile(r"\\boxed\s*\{")
_TOOL_OR_RESULT_TAG = re.compile(r"</?(?:search|python|result)>")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A tool call the model just finished writing. `error` is set when the call is unusable (then the
    rollout loop should append `error` as the result, see `tools.run_tool_call`)."""

    tag: str
    payload: str
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class FormatCheck:
    ok: bool
    reason: str  # "ok", or what is wrong


def result_block(text: str) -> str:
    """The text the rollout loop appends after a tool call (spec section 1)."""
    return f" <result>\n{text}\n</result>"


def strip_code_fences(code: str) -> str:
    """Code inside `<python>`, without a surrounding ```python fence and common indentation."""
    match = _FENCE.match(code)
    if match:
        code = match.group(1)
    return textwrap.dedent(code).strip("\n")


def pending_tool_call(segment: str) -> ToolCall | None:
    """The call at the end of `segment` (decoding stopped right after `</search>` / `</python>`), or None.

    The payload is the text between the last opening tag and the closing tag: stripped for search,
    de-fenced and de-indented for python. A closing tag without an opening one gives a call with `error`.
    """
    text = segment.rstrip()
    for tag in TOOL_TAGS:
        close = f"</{tag}>"
        if text.endswith(close):
            end = len(text) - len(close)
            start = text.rfind(f"<{tag}>", 0, end)
            if start < 0:
                return ToolCall(tag, "", f"found {close} without an opening <{tag}>; write <{tag}>...{close}")
            payload = text[start + len(tag) + 2: end]
            return ToolCall(tag, strip_code_fences(payload) if tag == "python" else payload.strip())
    return None


def blank_results(text: str) -> str:
    """`text` with every `<result>..</result>` body removed (tags kept); an unclosed body is kept."""
    out, pos = [], 0
    while (start := text.find("<result>", pos)) >= 0:
        end = text.find("</result>", start)
        if end < 0:
            break
        out.append(text[pos: start + len("<result>")])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces allowed); None if absent or unclosed."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    depth, start = 1, matches[-1].end()
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def extract_answer(text: str) -> str | None:
    """Content of the first `<answer>..</answer>` of the model's own text, or None."""
    model_text = blank_results(text)
    start = model_text.find("<answer>")
    end = model_text.find("</answer>", start)
    if start < 0 or end < 0:
        return None
    return model_text[start + len("<answer>"): end]


def tools_used(text: str) -> set[str]:
    """Tags of the tools the model called (closed calls in its own text)."""
    model_text = blank_results(text)
    return {tag for tag in TOOL_TAGS if f"</{tag}>" in model_text}


def check_format(text: str) -> FormatCheck:
    """Spec section 2: balanced `<think>` tags (>= 1 pair); exactly one `<answer>..</answer>`; every
    `<search>` / `<python>` followed in order by its closing tag and a `<result>..</result>` (and no
    `<result>` without a call); a `\\boxed{}` in the answer."""
    t = blank_results(text)
    think = re.findall(r"</?think>", t)
    if not think:
        return FormatCheck(False, "no <think>...</think> pair")
    if any(tag != ("<think>", "</think>")[i % 2] for i, tag in enumerate(think)) or len(think) % 2:
        return FormatCheck(False, "<think> and </think> are not balanced")
    n_open, n_close = t.count("<answer>"), t.count("</answer>")
    if n_open != 1 or n_close != 1 or t.find("<answer>") > t.find("</answer>"):
        return FormatCheck(False, f"expected exactly one <answer>...</answer>, found {n_open} <answer> and "
                                  f"{n_close} </answer>")
    problem = _tool_structure_problem(t)
    if problem:
        return FormatCheck(False, problem)
    if extract_boxed(extract_answer(text)) is None:
        return FormatCheck(False, "the answer has no complete \\boxed{...}")
    return FormatCheck(True, "ok")


def _tool_structure_problem(t: str) -> str | None:
    """Walks the tool and result tags: each call must read <tag> </tag> <result> </result>."""
    expected, call = None, None  # the tag that must come next (None: a new call or nothing)
    for match in _TOOL_OR_RESULT_TAG.finditer(t):
        tag = match.group()
        if expected is None:
            if tag in ("<search>", "<python>"):
                call, expected = tag[1:-1], f"</{tag[1:-1]}>"
                continue
            return f"{tag} without a preceding tool call"
        if tag != expected:
            return f"<{call}> call: expected {expected}, found {tag}"
        expected = {"<result>": "</result>", "</result>": None}.get(tag, "<result>")
    if expected is not None:
        return f"<{call}> call: missing {expected}"
    return None
