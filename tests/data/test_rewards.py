"""Reward functions (AEPO_SPEC.md section 2) against hand-computed values."""
import pytest

from aepo_jax.data.rewards import (REWARD_FUNCTIONS, RewardResult, exact_match, get_reward_fn, math_equal,
                                   normalize_answer, token_f1)

THINK = "<think>reasoning</think>"
SEARCH = "<search>q</search> <result>\nDoc 1 (Title: t) passage\n</result>"
PYTHON = "<python>print(1)</python> <result>\n1\n</result>"


def respond(answer, *calls):
    return THINK + "".join(calls) + THINK + f"<answer>The answer is \\boxed{{{answer}}}</answer>"


f1_reward, em_reward, math_reward = (get_reward_fn(n) for n in ("f1_format", "exact_match", "math"))


# --- token F1 ------------------------------------------------------------------------------------------

def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize("prediction, gold, expected", [
    ("the Obama", "Barack Obama", 2 / 3),  # P = 1/1, R = 1/2
    ("The Eiffel Tower!", "eiffel tower", 1.0),  # articles and punctuation do not count
    ("a b c d", "b c e", 2 / 3),  # 'a' is an article: [b c d] vs [b c e], P = R = 2/3
    ("New York City", "New York", 0.8),  # P = 2/3, R = 1
    ("Paris", "London", 0.0),
    ("", "London", 0.0),
    ("yes", "Yes.", 1.0),
    ("no", "yes", 0.0),
    ("yes it is", "yes", 0.0),  # would be F1 = 0.5 without the exact-match rule for yes / no
    ("yes", "yes it is", 0.0),
])
def test_token_f1(prediction, gold, expected):
    assert token_f1(prediction, gold) == pytest.approx(expected)


def test_f1_reward_without_tools():
    assert f1_reward(respond("the Obama"), ["Barack Obama"]) == RewardResult(
        2 / 3, 2 / 3, True, "the Obama", "correct")


def test_f1_reward_both_tools_bonus():
    r = f1_reward(respond("the Obama", SEARCH, PYTHON), ["Barack Obama"])
    assert r.score == pytest.approx(2 / 3 + 0.1) and r.accuracy == pytest.approx(2 / 3)
    assert f1_reward(respond("Obama", SEARCH), ["Obama"]).score == 1.0  # one tool: no bonus
    assert f1_reward(respond("Obama", PYTHON, PYTHON), ["Obama"]).score == 1.0
    assert f1_reward(respond("Obama", PYTHON, SEARCH), ["Obama"]).score == pytest.approx(1.1)


def test_wrong_answer_gets_zero_even_with_tools():
    assert f1_reward(respond("London", SEARCH, PYTHON), ["Paris"]) == RewardResult(
        0.0, 0.0, True, "London", "wrong answer")
    assert f1_reward(respond(""), ["Paris"]).score == 0.0  # an empty box is a (wrong) answer


def test_multiple_gold_answers_take_the_best():
    r = f1_reward(respond("New York City"), ["NYC", "New York", "Big Apple"])
    assert r.score == pytest.approx(0.8)
    assert f1_reward(respond("yes"), ["no", "yes"]).score == 1.0


def test_gold_answers_as_a_single_string():
    assert f1_reward(respond("Paris"), "Paris").score == 1.0


def test_empty_gold_answers_is_an_error():
    with pytest.raises(ValueError, match="gold_answers is empty"):
        f1_reward(respond("Paris"), [])


@pytest.mark.parametrize("response, reason", [
    ("<answer>\\boxed{Paris}</answer>", "no <think>...</think> pair"),
    (THINK + "<answer>\\boxed{Paris}</answer><answer>\\boxed{Paris}</answer>",
     "expected exactly one <answer>...</answer>, found 2 <answer> and 2 </answer>"),
    (THINK + "<search>q</search><answer>\\boxed{Paris}</answer>", "<search> call: missing <result>"),
    (THINK + "<answer>Paris</answer>", "the answer has no complete \\boxed{...}"),
])
def test_bad_format_is_minus_one(response, reason):
    for reward in REWARD_FUNCTIONS.values():
        assert reward(response, ["Paris"]) == RewardResult(-1.0, 0.0, False, None, f"bad format: {reason}")


# --- exact match -------------------------------------------------------------------------------------

def test_exact_match():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert em_reward(respond("the Eiffel Tower"), ["Louvre", "Eiffel Tower"]).score == 1.0
    assert em_reward(respond("Eiffel", SEARCH, PYTHON), ["Eiffel Tower"]).score == 0.0
    assert em_reward(respond("Eiffel Tower", SEARCH, PYTHON), ["Eiffel Tower"]).score == pytest.approx(1.1)


# --- math --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, gold", [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac12", "1/2"),
    ("\\tfrac{1}{2}", ".5"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{-3}{4}", "-3/4"),
    ("2.50", "\\frac{5}{2}"),
    ("3.0", "3"),
    ("1,000,000", "1000000"),
    ("50\\%", "50"),
    ("x = 5", "5"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("\\text{12 apples}", "12apples"),
    ("\\$5", "5"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{7}", "7"),
])
def test_math_equal(prediction, gold):
    assert math_equal(prediction, gold) == 1.0


@pytest.mark.parametrize("prediction, gold", [
    ("0.33", "\\frac{1}{3}"),  # exact comparison: no rounding tolerance
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("(1,2)", "(2,1)"),
    ("1,2", "12"),  # not a thousands separator
    ("\\frac{1}{0}", "1"),
    ("x", "y"),
])
def test_math_not_equal(prediction, gold):
    assert math_equal(prediction, gold) == 0.0


def test_math_reward_with_nested_boxed_fraction():
    r = math_reward(respond("\\frac{1}{2}", PYTHON), ["0.5"])
    assert r == RewardResult(1.0, 1.0, True, "\\frac{1}{2}", "correct")
    assert f1_reward(respond("\\frac{1}{2}"), ["0.5"]).score == 0.0  # token F1 knows no LaTeX


def test_registry():
    assert sorted(REWARD_FUNCTIONS) == ["exact_match", "f1_format", "math"]
    with pytest.raises(ValueError, match="unknown reward function 'f1'; known: exact_match, f1_format, math"):
        get_reward_fn("f1")
