"""Tool-call parsing, answer extraction and the format check of AEPO_SPEC.md section 2."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aepo_jax.agent.parsing import (FormatCheck, ToolCall, blank_results, check_format, extract_answer,
                                    extract_boxed, pending_tool_call, result_block, strip_code_fences,
                                    tools_used)

GOOD = ("<think>I should look it up.</think><search> capital of France </search>"
        " <result>\nDoc 1 (Title: Paris) Paris is the capital.\n</result>"
        "<think>Check with code.</think><python>print(2 + 2)</python> <result>\n4\n</result>"
        "<think>Done.</think><answer>The answer is \\boxed{Paris}.</answer>")


# --- pending tool call -------------------------------------------------------------------------------

def test_pending_search_call():
    assert pending_tool_call("<think>hmm</think> <search>  who wrote Hamlet </search>") == ToolCall(
        "search", "who wrote Hamlet")


def test_pending_call_ignores_earlier_calls_and_trailing_whitespace():
    segment = "<search>old</search> text <search>new query</search>\n "
    assert pending_tool_call(segment) == ToolCall("search", "new query")


def test_pending_python_call_strips_fences_and_indentation():
    segment = "<think>compute</think><python>\n```python\n    x = 3\n    print(x * x)\n```\n</python>"
    assert pending_tool_call(segment) == ToolCall("python", "x = 3\nprint(x * x)")
    assert pending_tool_call("<python>\n  for i in range(2):\n      print(i)\n</python>") == ToolCall(
        "python", "for i in range(2):\n    print(i)")


def test_no_pending_call():
    assert pending_tool_call("<think>thinking</think><answer>\\boxed{1}</answer>") is None
    assert pending_tool_call("<search>query</search> and then more text") is None
    assert pending_tool_call("") is None


def test_closing_tag_without_opening_tag():
    call = pending_tool_call("<think>x</think> some code</python>")
    assert call == ToolCall("python", "",
                            "found </python> without an opening <python>; write <python>...</python>")


def test_empty_payload_is_passed_on_for_the_tool_to_reject():
    assert pending_tool_call("<search>   </search>") == ToolCall("search", "")


@pytest.mark.parametrize("code, expected", [
    ("print(1)", "print(1)"),
    ("```python\nprint(1)\n```", "print(1)"),
    ("```py\nprint(1)\n```", "print(1)"),
    ("```\nprint(1)\n```", "print(1)"),
    ("\n  ```Python\n  a = 1\n  a\n  ```  \n", "a = 1\na"),
    ("```python\nprint(1)", "print(1)"),  # unclosed fence
    ("x = '```'", "x = '```'"),  # backticks inside code are code
])
def test_strip_code_fences(code, expected):
    assert strip_code_fences(code) == expected


def test_result_block_is_the_spec_layout():
    assert result_block("4") == " <result>\n4\n</result>"


# --- boxed / answer extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("\\boxed{42}", "42"),
    ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
    ("\\boxed{\\text{a {nested} b}}", "\\text{a {nested} b}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed {x}", "x"),
    ("\\boxed{}", ""),
    ("\\boxed{unclosed", None),
    ("no box", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=20),
       st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=20))
def test_extract_boxed_returns_balanced_content(a, b):
    inner = f"{a}{{{b}}}{a}"  # one nested brace pair; no other braces or backslashes, so no other \boxed
    assert extract_boxed(f"text \\boxed{{{inner}}} tail") == inner


def test_extract_answer_uses_the_models_text():
    assert extract_answer(GOOD) == "The answer is \\boxed{Paris}."
    assert extract_answer("<result>\n<answer>fake</answer>\n</result><answer>real</answer>") == "real"
    assert extract_answer("<answer>unclosed") is None


def test_blank_results_and_tools_used():
    assert blank_results("a<result>\nx <search>y</search>\n</result>b") == "a<result></result>b"
    assert blank_results("a<result>open") == "a<result>open"
    assert tools_used(GOOD) == {"search", "python"}
    assert tools_used("<think>t</think><result>\n</python>\n</result>") == set()


# --- format check ----------------------------------------------------------------------------------

def test_good_format():
    assert check_format(GOOD) == FormatCheck(True, "ok")
    assert check_format("<think>easy</think><answer>\\boxed{4}</answer>").ok  # no tool call is fine


@pytest.mark.parametrize("text, reason", [
    ("<answer>\\boxed{4}</answer>", "no <think>...</think> pair"),
    ("<think>a</think><think>b<answer>\\boxed{4}</answer>", "<think> and </think> are not balanced"),
    ("</think>a<think><answer>\\boxed{4}</answer>", "<think> and </think> are not balanced"),
    ("<think><think>a</think></think><answer>\\boxed{4}</answer>", "<think> and </think> are not balanced"),
    ("<think>a</think>no answer tags \\boxed{4}",
     "expected exactly one <answer>...</answer>, found 0 <answer> and 0 </answer>"),
    ("<think>a</think><answer>\\boxed{4}</answer><answer>\\boxed{5}</answer>",
     "expected exactly one <answer>...</answer>, found 2 <answer> and 2 </answer>"),
    ("<think>a</think></answer>\\boxed{4}<answer>",
     "expected exactly one <answer>...</answer>, found 1 <answer> and 1 </answer>"),
    ("<think>a</think><search>q</search><answer>\\boxed{4}</answer>", "<search> call: missing <result>"),
    ("<think>a</think><python>1</python> <result>\n1\n<answer>\\boxed{4}</answer>",
     "<python> call: missing </result>"),
    ("<think>a</think><search>q <result>\nr\n</result></search><answer>\\boxed{4}</answer>",
     "<search> call: expected </search>, found <result>"),
    ("<think>a</think><search>q</search><python>1</python><result>\n1\n</result><answer>\\boxed{4}</answer>",
     "<search> call: expected <result>, found <python>"),
    ("<think>a</think><result>\nmade up\n</result><answer>\\boxed{4}</answer>",
     "<result> without a preceding tool call"),
    ("<think>a</think>q</search><answer>\\boxed{4}</answer>", "</search> without a preceding tool call"),
    ("<think>a</think><search>q</search> <result>\nr\n</result><answer>4</answer>",
     "the answer has no complete \\boxed{...}"),
    ("<think>a</think><answer>\\boxed{4</answer>", "the answer has no complete \\boxed{...}"),
    ("<think>a</think>\\boxed{4}<answer>4</answer>", "the answer has no complete \\boxed{...}"),
])
def test_bad_format(text, reason):
    assert check_format(text) == FormatCheck(False, reason)


def test_tags_inside_tool_output_do_not_count():
    # A passage or program output that contains tags is the tool's text, not the model's.
    text = ("<think>a</think><python>print('<' + 'answer>x</' + 'answer> <' + 'think>')</python>"
            " <result>\n<answer>x</answer> <think>\n</result><answer>\\boxed{4}</answer>")
    assert check_format(text) == FormatCheck(True, "ok")
