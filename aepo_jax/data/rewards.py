"""Reward functions (AEPO_SPEC.md section 2), pluggable by name.

Every reward function has the signature `(response_text, gold_answers) -> RewardResult` and the paper's
structure; only the answer scorer differs:
  bad format (`parsing.check_format`) -> -1
  else acc = max over gold answers of scorer(answer, gold), where answer = the last \\boxed{} in <answer>
  acc > 0 and both tools used -> acc + 0.1;  acc > 0 -> acc;  else 0
Scorers: "f1_format" token-F1 (the paper's reward), "exact_match", "math" (LaTeX-aware equivalence).
"""
from __future__ import annotations

import dataclasses
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

from aepo_jax.agent.parsing import check_format, extract_answer, extract_boxed, tools_used

TOOL_BONUS = 0.1
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Answers that only match exactly (HotpotQA's official F1; 'noanswer' as in the released ARPO code).
_EXACT_ONLY = ("yes", "no", "noanswer")


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """score: the reward. accuracy: the scorer's value before the tool bonus (0 when the format failed).
    answer: the extracted answer (None when the format failed). reason: a human-readable explanation."""

    score: float
    accuracy: float
    format_ok: bool
    answer: str | None
    reason: str


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles (a, an, the), squash whitespace (SQuAD / HotpotQA)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def token_f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings; yes / no / noanswer score 1 only on an exact match."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _EXACT_ONLY or ref in _EXACT_ONLY) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC_SHORTHAND = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?")
_FRACTION = re.compile(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?\d+)/(\d+)")


def normalize_math(text: str) -> str:
    """Canonical string form of a LaTeX-ish math answer (no spaces; see `math_equal`)."""
    s = text.strip()
    if s.startswith("\\boxed") and extract_boxed(s) is not None:
        s = extract_boxed(s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _LATEX_SPACING.sub("", s)
    s = _TEXT_COMMANDS.sub(r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)  # degrees
    s = s.replace("\\%", "").replace("%", "")
    s = "".join(s.split()).rstrip(".")
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "x=5" -> "5"
        s = s.split("=")[1]
    s = _FRAC_SHORTHAND.sub(lambda m: f"\\frac{{{m[1].strip('{}')}}}{{{m[2].strip('{}')}}}", s)
    s = re.sub(r"\\sqrt(\d+|[A-Za-z])", r"\\sqrt{\1}", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # .5 -> 0.5
    s = re.sub(r"(\d+\.\d*?)0+(?!\d)", r"\1", s)  # 2.50 -> 2.5, 3.0 -> 3.
    return re.sub(r"(\d)\.(?!\d)", r"\1", s)  # 3. -> 3


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a normalised number, decimal, a/b or \\frac{a}{b}; None for anything else."""
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    match = _FRACTION.fullmatch(s)
    if match is None:
        return None
    sign, num, den = (-1 if match[1] else 1), match[2] or match[4], match[3] or match[5]
    try:
        return sign * Fraction(num) / Fraction(den)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(prediction: str, gold: str) -> float:
    """1.0 if the answers are the same after `normalize_math`, or are equal numbers (exactly, as
    fractions: 0.5 == 1/2 == \\frac{1}{2}, but 0.33 != 1/3); else 0.0."""
    pred, ref = normalize_math(prediction), normalize_math(gold)
    if pred == ref:
        return 1.0
    pred_value, ref_value = _as_fraction(pred), _as_fraction(ref)
    return float(pred_value is not None and pred_value == ref_value)


def _paper_reward(scorer: Callable[[str, str], float], response_text: str,
                  gold_answers: Sequence[str]) -> RewardResult:
    if isinstance(gold_answers, str):
        gold_answers = [gold_answers]
    if not gold_answers:
        raise ValueError("gold_answers is empty: every question needs at least one gold answer")
    check = check_format(response_text)
    if not check.ok:
        return RewardResult(-1.0, 0.0, False, None, f"bad format: {check.reason}")
    answer = extract_boxed(extract_answer(response_text))
    acc = max(scorer(answer, gold) for gold in gold_answers)
    if acc > 0 and tools_used(response_text) == {"search", "python"}:
        return RewardResult(acc + TOOL_BONUS, acc, True, answer, "correct, used both tools: +0.1")
    if acc > 0:
        return RewardResult(acc, acc, True, answer, "correct")
    return RewardResult(0.0, 0.0, True, answer, "wrong answer")


def f1_format_reward(response_text: str, gold_answers: Sequence[str]) -> RewardResult:
    """The paper's reward: format check, token-F1 accuracy, +0.1 for using both tools."""
    return _paper_reward(token_f1, response_text, gold_answers)


def exact_match_reward(response_text: str, gold_answers: Sequence[str]) -> RewardResult:
    """As `f1_format_reward` with normalised exact match (0 or 1) as accuracy."""
    return _paper_reward(exact_match, response_text, gold_answers)


def math_reward(response_text: str, gold_answers: Sequence[str]) -> RewardResult:
    """As `f1_format_reward` with `math_equal` (0 or 1) as accuracy; gold answers are final answers."""
    return _paper_reward(math_equal, response_text, gold_answers)


REWARD_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], RewardResult]] = {
    "f1_format": f1_format_reward,
    "exact_match": exact_match_reward,
    "math": math_reward,
}


def get_reward_fn(name: str) -> Callable[[str, Sequence[str]], RewardResult]:
    """The reward function registered as `name`."""
    if name not in REWARD_FUNCTIONS:
        raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARD_FUNCTIONS))}")
    return REWARD_FUNCTIONS[name]
