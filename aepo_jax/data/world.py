"""The built-in synthetic demo world: invented guilds, a passage corpus, questions and reference traces.

A seeded generator of a small world the agent can only answer by searching (AEPO_SPEC.md section 1):

  world = make_world(seed=0)
  world.corpus        # [{"id", "title", "text"}], one passage per guild, for the `search` tool
  world.train         # [Question], answers need one or two searches and sometimes `python`
  world.heldout       # [Question] about guilds no train question touches
  sft_examples(world) # [{"question", "response"}], a correct trace in the agent format per train question
  sft_examples(world, guess_fraction=0.3)  # 30% of them answer with a guess, without the tools
  write_world(world, "demo/")   # corpus.jsonl, train.jsonl, heldout.jsonl, sft.jsonl
  build_demo("demo/", seed=0)   # the same + tokenizer.model (SentencePiece) + world.json
  demo_model_config(vocab_size) # the tiny Qwen3 of the CPU demo

Entities. Each guild has an invented name (CamelCase syllables such as "KaZo", so no prior knowledge
helps), a city (from a smaller pool of invented names of three syllables), a founding year, a member count,
a colour and an ally (another guild). Its passage:

  KaZo is a guild in MiRaVo. It was founded in 1954 and has 4520 members. Its colour is amber and its
  ally is BiSa.

Questions (gold answers are lists of strings):
  single hop   "What is the city of KaZo?"                 -> <search>KaZo</search>
  two hops     "What is the colour of the ally of KaZo?"   -> <search>KaZo</search>, <search>BiSa</search>
  arithmetic   "How many years passed between the founding of KaZo and of BiSa?"
                   -> two searches, then <python>abs(1954 - 1987)</python>
               "How many members do KaZo and BiSa have together?"
                   -> two searches, then <python>4520 + 870</python>
Guessing fails: a year, a member count or a sum is a number of up to five digits, a city one of 12 by
default, a colour one of 12, an ally one of the other guilds.

Names and the demo tokenizer. Names are made of a small syllable inventory (`SYLLABLES`), and the demo
tokenizer makes every syllable and every colour a single token (user-defined symbols, `demo_symbols`).
So a name or a value is spelt with the same tokens in the question, the query, the passage, the thought
and the answer (with ordinary subword pieces " KaZo" and "KaZo" would be different tokens), and a held-out
name is spelt with syllables that train names use (the held-out guilds are chosen so), never with a token
the model has not trained on.

Split. A fraction of the guilds is held out: a question goes to train only if no guild it touches (the
guild it names, the ally it hops to, both guilds of an arithmetic question) is held out; every other
question is a held-out candidate (a template-balanced subset is kept). Held-out questions are answerable
from the same corpus, never appear among the train questions, and no train trace reads a held-out guild's
passage. Defaults: 256 guilds (64 held out), 2,111 train questions and 128 held-out ones for seed 0.

Reference traces (`reference_response`) follow one regular pattern so a tiny model can learn it; the lines
below are joined by single newlines, and ` <result>\n{text}\n</result>` is exactly what the rollout loop
appends after a tool call:
  <think>I need the ally of KaZo, then its colour.</think>
  <search>KaZo</search> <result>
  Doc 1 (Title: KaZo) KaZo is a guild in MiRaVo. ... Its colour is amber and its ally is BiSa.
  </result>
  <think>The ally of KaZo is BiSa.</think>
  <search>BiSa</search> <result>
  Doc 1 (Title: BiSa) BiSa is a guild in ...
  </result>
  <think>The colour of BiSa is red.</think>
  <answer>\boxed{red}</answer>
An imperfect teacher. With `guess_fraction` > 0 (the demo's default is `DEMO_GUESS_FRACTION`), that share
of the traces (`guess_response`) open with the same thought and then answer with a guess, without the
tools. SFT on them leaves a policy that guesses about as often, decided by one token after the first
thought (`<search>` or `<answer>`); searching is what RL has to learn, since a guess earns 0 (right only
by chance) and a right answer 1 (1.1 with both tools).

The result text comes from `search_fn(query)` / `python_fn(code)`; the defaults reproduce the real tools'
output for these calls: `SearchTool(corpus=corpus.jsonl, top_k=1)` (whose top passage for a guild's name
is that guild's passage) and `PythonTool` (a bare final expression gives its repr);
tests/data/test_world.py checks both against the real tools. The response ends with `</answer>`; the
trainer appends EOS (`tokenizer.encode_response` tokenises a response as the rollout builds it, with the
loss mask).

Determinism: every random draw goes through `random.Random(seed).random()`, the one part of Python's
`random` module whose output is guaranteed not to change across Python versions, and nothing iterates a
set or a dict in hash order, so the same seed gives byte-identical files everywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import operator
import os
import random
from typing import Callable, Sequence

from aepo_jax.agent.parsing import result_block

# -------------------------------------------------------------------------------------- text, names

SYSTEM_PROMPT = ("Tools: <search>guild</search>, <python>expression</python>. "
                 "Answer: <answer>\\boxed{x}</answer>")

ATTRIBUTES = ("city", "founded", "members", "colour", "ally")
_SINGLE = {
    "city": "What is the city of {x}?",
    "founded": "When was {x} founded?",
    "members": "How many members does {x} have?",
    "colour": "What is the colour of {x}?",
    "ally": "What is the ally of {x}?",
}
_TWO_HOP = {
    "city": "What is the city of the ally of {x}?",
    "founded": "When was the ally of {x} founded?",
    "members": "How many members does the ally of {x} have?",
    "colour": "What is the colour of the ally of {x}?",
}
_ARITHMETIC = {
    "year_gap": "How many years passed between the founding of {x} and of {y}?",
    "members_sum": "How many members do {x} and {y} have together?",
}
_ARITHMETIC_ATTRIBUTE = {"year_gap": "founded", "members_sum": "members"}  # the value each one reads
_NOUN = {"city": "city", "founded": "founding year", "members": "member count", "colour": "colour",
         "ally": "ally"}
_FACT = {
    "city": "{x} is in {v}.",
    "founded": "{x} was founded in {v}.",
    "members": "{x} has {v} members.",
    "colour": "The colour of {x} is {v}.",
    "ally": "The ally of {x} is {v}.",
}
_PASSAGE = ("{name} is a guild in {city}. It was founded in {founded} and has {members} members. "
            "Its colour is {colour} and its ally is {ally}.")
_THINK = {"single": "I need the {noun} of {x}.", "two_hop": "I need the ally of {x}, then its {noun}.",
          "arithmetic": "I need the {noun} of {x} and of {y}."}
TEMPLATES = tuple(f"single_{a}" for a in _SINGLE) + tuple(f"two_hop_{a}" for a in _TWO_HOP) + tuple(
    _ARITHMETIC)

# Every fixed piece of text the world writes (names and values aside).
_TEMPLATE_TEXT = "\n".join([SYSTEM_PROMPT, "Question: ", "Assistant:", "Doc 1 (Title: ",
                            "No passages match the query.", _PASSAGE, *_SINGLE.values(), *_TWO_HOP.values(),
                            *_ARITHMETIC.values(), *_NOUN.values(), *_FACT.values(), *_THINK.values()])

# Names are CamelCase strings of syllables from a small inventory ("KaZo", "MiRaVo"). The demo tokenizer
# makes each syllable one token (a user-defined symbol), so a name is spelt with the same tokens in every
# context and a held-out name is made of tokens the model has trained on. Syllables that occur in the
# template text are left out (e.g. "Do" of "Doc"), so the symbols never cut a template word.
_ONSETS, _VOWELS = "bdkmrsvz", "aio"
SYLLABLES = tuple(s for s in (c.upper() + v for c in _ONSETS for v in _VOWELS) if s not in _TEMPLATE_TEXT)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden",
           "amber", "violet")
_CITY_SYLLABLES = 3


@dataclasses.dataclass(frozen=True)
class Entity:
    """One guild. `ally` is the name of another guild of the same world."""

    name: str
    city: str
    founded: int
    members: int
    colour: str
    ally: str

    def fact(self, attribute: str) -> str:
        """The sentence that states `attribute` (the thought after reading the passage)."""
        if attribute not in _FACT:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
        return _FACT[attribute].format(x=self.name, v=getattr(self, attribute))

    def passage(self) -> str:
        return _PASSAGE.format(**dataclasses.asdict(self))


def split_syllables(name: str) -> tuple[str, ...]:
    """The syllables of an invented name ("KaZo" -> ("Ka", "Zo"))."""
    parts = tuple(name[i:i + 2] for i in range(0, len(name), 2))
    if not parts or any(p not in SYLLABLES for p in parts):
        raise ValueError(f"{name!r} is not a name made of the world's syllables")
    return parts


@dataclasses.dataclass(frozen=True)
class Question:
    """A question instance. `template` is one of `TEMPLATES`; `subjects` the guilds named in the question
    (one, or two for arithmetic); `answers` the gold answers (strings)."""

    id: str
    question: str
    answers: tuple[str, ...]
    template: str
    subjects: tuple[str, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "answers": list(self.answers)}


@dataclasses.dataclass(frozen=True)
class World:
    """A generated world: its guilds, the train / held-out questions and the held-out guilds' names."""

    seed: int
    entities: tuple[Entity, ...]
    train: tuple[Question, ...]
    heldout: tuple[Question, ...]
    heldout_entities: tuple[str, ...]

    @property
    def corpus(self) -> list[dict]:
        """The passages for the `search` tool, one per guild: {"id", "title", "text"}."""
        return [{"id": f"p{i}", "title": e.name, "text": e.passage()} for i, e in enumerate(self.entities)]

    def entity(self, name: str) -> Entity:
        for e in self.entities:
            if e.name == name:
                return e
        raise KeyError(f"no guild named {name!r} in this world")


# ------------------------------------------------------------------------------------------- generation


class _Rng:
    """Draws built only on `random.Random.random()` (stable across Python versions, see module doc)."""

    def __init__(self, seed: int):
        self._r = random.Random(int(seed))

    def random(self) -> float:
        return self._r.random()

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def between(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + self.below(hi - lo + 1)

    def choice(self, seq: Sequence):
        return seq[self.below(len(seq))]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def _invent_names(rng: _Rng, count: int, num_syllables: int, taken: set[str]) -> list[str]:
    names = []
    for _ in range(1000 * count):
        if len(names) == count:
            return names
        word = "".join(rng.choice(SYLLABLES) for _ in range(num_syllables))
        if word not in taken:
            taken.add(word)
            names.append(word)
    raise ValueError(f"could not invent {count} distinct names of {num_syllables} syllables; ask for fewer")


def make_world(seed: int = 0, num_entities: int = 256, num_cities: int = 12, heldout_fraction: float = 0.25,
               arithmetic_per_entity: int = 2, max_heldout: int | None = 128) -> World:
    """Generates a world (pure function of its arguments).

    num_entities: guilds (one passage each; names of 2 syllables up to 264 guilds, else 3). The default
      256 is chosen so that a tiny model cannot get by memorising names: with 64 guilds the demo model
      learns the train names' syllable pairs and then misspells held-out names; with 256 it learns to copy.
    num_cities: size of the city pool (guessing a city is right 1 / num_cities of the time; colours:
      1 / 12). heldout_fraction: fraction of guilds held out.
    arithmetic_per_entity: arithmetic questions drawn per guild and template (partners drawn at random).
    max_heldout: cap on the number of held-out questions (a random subset; None = all candidates).
    """
    guild_syllables = 2 if num_entities <= len(SYLLABLES) ** 2 // 2 else 3
    max_entities = len(SYLLABLES) ** 3 // 2
    if not 8 <= num_entities <= max_entities:
        raise ValueError(f"num_entities must be in [8, {max_entities}], got {num_entities}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if not 2 <= num_cities <= 1000:
        raise ValueError(f"num_cities must be in [2, 1000], got {num_cities}")
    rng = _Rng(seed)
    taken: set[str] = set()
    names = _invent_names(rng, num_entities, guild_syllables, taken)
    cities = _invent_names(rng, num_cities, _CITY_SYLLABLES, taken)
    founded = [rng.between(1700, 2020) for _ in names]
    entities = []
    for i, name in enumerate(names):
        ally = names[(i + 1 + rng.below(num_entities - 1)) % num_entities]  # any other guild
        entities.append(Entity(name, rng.choice(cities), founded[i], rng.between(12, 9990),
                               rng.choice(COLOURS), ally))
    by_name = {e.name: e for e in entities}

    # Held-out guilds: drawn at random, preferring guilds whose syllables each stay in >= 2 names of
    # train guilds (so a held-out name is spelt with tokens the model trains on).
    order = list(range(num_entities))
    rng.shuffle(order)
    n_heldout = max(1, round(heldout_fraction * num_entities))
    uses = {s: 0 for s in SYLLABLES}
    for name in names:
        for s in split_syllables(name):
            uses[s] += 1
    chosen: list[int] = []
    for i in order:
        parts = split_syllables(names[i])
        if len(chosen) < n_heldout and all(uses[s] - parts.count(s) >= 2 for s in parts):
            chosen.append(i)
            for s in parts:
                uses[s] -= 1
    chosen += [i for i in order if i not in chosen][: n_heldout - len(chosen)]
    heldout_names = sorted(names[i] for i in chosen)
    held = set(heldout_names)

    candidates: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = []  # template, q, subjects, touched
    for e in entities:
        for attr, text in _SINGLE.items():
            candidates.append((f"single_{attr}", text.format(x=e.name), (e.name,), (e.name,)))
        for attr, text in _TWO_HOP.items():
            candidates.append((f"two_hop_{attr}", text.format(x=e.name), (e.name,), (e.name, e.ally)))
    for template, text in _ARITHMETIC.items():
        for e in entities:
            for _ in range(arithmetic_per_entity):
                for _ in range(1000):  # another guild (for a year gap: founded in another year)
                    other = entities[rng.below(num_entities)]
                    if other is not e and (template != "year_gap" or other.founded != e.founded):
                        pair = (e.name, other.name)
                        candidates.append((template, text.format(x=e.name, y=other.name), pair, pair))
                        break

    seen, train, heldout = set(), [], []
    for template, text, subjects, touched in candidates:
        if text in seen:
            continue
        seen.add(text)
        q = (template, text, subjects)
        (heldout if any(t in held for t in touched) else train).append(q)
    rng.shuffle(train)
    rng.shuffle(heldout)
    # Balance the held-out templates: round-robin over templates (in shuffled order within each).
    rank: dict[str, int] = {}
    keyed = []
    for q in heldout:
        rank[q[0]] = rank.get(q[0], -1) + 1
        keyed.append(((rank[q[0]], TEMPLATES.index(q[0])), q))
    heldout = [q for _, q in sorted(keyed, key=lambda kq: kq[0])]
    if max_heldout is not None:
        heldout = heldout[:max_heldout]
    rng.shuffle(heldout)

    def build(split, items):
        return tuple(Question(f"{split}-{i}", text, gold_answers(by_name, template, subjects), template,
                              subjects) for i, (template, text, subjects) in enumerate(items))

    return World(int(seed), tuple(entities), build("train", train), build("heldout", heldout),
                 tuple(heldout_names))


def gold_answers(by_name: dict[str, Entity], template: str, subjects: Sequence[str]) -> tuple[str, ...]:
    """The gold answers of a question from the world's facts."""
    e = by_name[subjects[0]]
    if template.startswith("single_"):
        return (str(getattr(e, template[len("single_"):])),)
    if template.startswith("two_hop_"):
        return (str(getattr(by_name[e.ally], template[len("two_hop_"):])),)
    other = by_name[subjects[1]]
    if template == "year_gap":
        return (str(abs(e.founded - other.founded)),)
    if template == "members_sum":
        return (str(e.members + other.members),)
    raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")


# ------------------------------------------------------------------------------------- prompts, traces


def render_prompt(question: str) -> str:
    """The plain-text prompt of the demo (no chat template): a one-line instruction, then the question.
    The model's response follows directly (it starts with `<think>`)."""
    return f"{SYSTEM_PROMPT}\nQuestion: {question.strip()}\nAssistant:"


def prompt_messages(question: str) -> list[dict]:
    """The same prompt as a system + user message pair, for tokenizers with a chat template."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question.strip()}]


def encode_prompt(tokenizer, question: str, prompt_format: str = "auto") -> list[int]:
    """Token ids of the prompt for `question`, as the trainer builds every RL and eval prompt: "chat" renders
    `prompt_messages` with the tokenizer's chat template and the assistant's turn opened (a real Qwen3's
    tokenizer); "plain" encodes `render_prompt` (the demo's SentencePiece tokenizer has no template);
    "auto" picks chat when the tokenizer has a template."""
    from aepo_jax.data.tokenizer import encode_chat

    if prompt_format not in ("auto", "chat", "plain"):
        raise ValueError(f"prompt_format must be auto, chat or plain, got {prompt_format!r}")
    if prompt_format == "chat" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None)):
        return encode_chat(tokenizer, prompt_messages(question))
    return tokenizer.encode(render_prompt(question))


def default_search_fn(world: World) -> Callable[[str], str]:
    """Exact (case-insensitive) title lookup in the world corpus, formatted as the `search` tool does."""
    titles = {p["title"].lower(): p for p in world.corpus}

    def search(query: str) -> str:
        p = titles.get(" ".join(query.split()).lower())
        return "No passages match the query." if p is None else f"Doc 1 (Title: {p['title']}) {p['text']}"

    return search


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def default_python_fn(code: str) -> str:
    """Evaluates the integer arithmetic the traces use (+, -, *, abs, parentheses) and returns what the
    `python` tool returns for a bare final expression: its repr (the tool drops the trailing newline)."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "abs"
                and len(node.args) == 1 and not node.keywords):
            return abs(ev(node.args[0]))
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")

    try:
        return repr(ev(ast.parse(code.strip(), mode="eval")))
    except (SyntaxError, ValueError) as e:
        return f"Error: {e}"


def reference_response(world: World, question: Question, search_fn: Callable[[str], str] | None = None,
                       python_fn: Callable[[str], str] | None = None) -> str:
    """A correct response to `question` in the agent format (see the module doc), ending with `</answer>`."""
    search = search_fn or default_search_fn(world)
    python = python_fn or default_python_fn
    parts = [f"<think>{first_thought(question)}</think>"]

    def think(text):
        parts.append(f"<think>{text}</think>")

    def call(tag, payload, fn):
        parts.append(f"<{tag}>{payload}</{tag}>{result_block(fn(payload))}")

    t, subjects = question.template, question.subjects
    e = world.entity(subjects[0])
    if t.startswith("single_"):
        call("search", e.name, search)
        think(e.fact(t[len("single_"):]))
    elif t.startswith("two_hop_"):
        ally = world.entity(e.ally)
        call("search", e.name, search)
        think(e.fact("ally"))
        call("search", ally.name, search)
        think(ally.fact(t[len("two_hop_"):]))
    else:
        other = world.entity(subjects[1])
        attr = _ARITHMETIC_ATTRIBUTE[t]
        for g in (e, other):
            call("search", g.name, search)
            think(g.fact(attr))
        if t == "year_gap":
            code = f"abs({e.founded} - {other.founded})"
        else:
            code = f"{e.members} + {other.members}"
        call("python", code, python)
    parts.append(f"<answer>\\boxed{{{question.answers[0]}}}</answer>")
    return "\n".join(parts)


def first_thought(question: Question) -> str:
    """The thought a response opens with: what the question needs ("I need the city of KaZo.")."""
    t, subjects = question.template, question.subjects
    if t.startswith("single_"):
        return _THINK["single"].format(noun=_NOUN[t[len("single_"):]], x=subjects[0])
    if t.startswith("two_hop_"):
        return _THINK["two_hop"].format(noun=_NOUN[t[len("two_hop_"):]], x=subjects[0])
    if t in _ARITHMETIC:
        return _THINK["arithmetic"].format(noun=_NOUN[_ARITHMETIC_ATTRIBUTE[t]], x=subjects[0], y=subjects[1])
    raise ValueError(f"unknown template {t!r}; expected one of {TEMPLATES}")


def guess_response(world: World, question: Question, rng: _Rng) -> str:
    """The response of a teacher that answers without the tools: the reference's first thought, then a
    value of the right kind drawn at random (a city of the world, a year in the founding range, a member
    count, a colour, a train guild's name, a number in the range of a gap or a sum). Right only by chance."""
    kind = question.template.removeprefix("single_").removeprefix("two_hop_")  # an attribute or arithmetic
    held = set(world.heldout_entities)
    draw = {"city": lambda: rng.choice(sorted({g.city for g in world.entities})),
            "founded": lambda: rng.between(1700, 2020),
            "members": lambda: rng.between(12, 9990),
            "colour": lambda: rng.choice(COLOURS),
            "ally": lambda: rng.choice([g.name for g in world.entities if g.name not in held]),
            "year_gap": lambda: rng.between(1, 320),
            "members_sum": lambda: rng.between(24, 19980)}
    return f"<think>{first_thought(question)}</think>\n<answer>\\boxed{{{draw[kind]()}}}</answer>"


def sft_examples(world: World, search_fn: Callable[[str], str] | None = None,
                 python_fn: Callable[[str], str] | None = None, guess_fraction: float = 0.0) -> list[dict]:
    """{"question", "response"} for every train question, in the order of `world.train` (the trainer builds
    the prompt from the question as it builds the RL prompts: `encode_prompt`).

    guess_fraction: the share of questions (drawn with the world's seed) whose response is a
    `guess_response` instead of a `reference_response`: an imperfect teacher that sometimes answers without
    the tools. SFT on such traces leaves a policy that guesses about that often; RL has to learn that
    searching pays (the demo's default is `DEMO_GUESS_FRACTION`).
    """
    if not 0.0 <= guess_fraction < 1.0:
        raise ValueError(f"guess_fraction must be in [0, 1), got {guess_fraction}")
    search = search_fn or default_search_fn(world)
    rng = _Rng(world.seed + 1)
    examples = []
    for q in world.train:
        guess = rng.random() < guess_fraction
        response = guess_response(world, q, rng) if guess else reference_response(world, q, search, python_fn)
        examples.append({"question": q.question, "response": response})
    return examples


def world_texts(world: World, search_fn: Callable[[str], str] | None = None,
                python_fn: Callable[[str], str] | None = None) -> list[str]:
    """The world's text in a fixed order (corpus, questions, SFT prompts and responses): the training input
    of the demo tokenizer."""
    texts = [f"{p['title']}\n{p['text']}" for p in world.corpus]
    texts += [q.question for q in world.train + world.heldout]
    for ex in sft_examples(world, search_fn, python_fn):
        texts += [render_prompt(ex["question"]), ex["response"]]
    return texts


# ---------------------------------------------------------------------------------------------- files


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, sort_keys=False).encode("utf-8") + b"\n"
                    for r in records)


def write_world(world: World, out_dir: str | os.PathLike, search_fn: Callable[[str], str] | None = None,
                python_fn: Callable[[str], str] | None = None, overwrite: bool = False,
                guess_fraction: float = 0.0) -> dict[str, str]:
    """Writes corpus.jsonl, train.jsonl, heldout.jsonl and sft.jsonl (`sft_examples` with
    `guess_fraction`) into `out_dir`; returns name -> path.

    Refuses to replace existing files unless `overwrite`. Byte-identical for the same world.
    """
    out_dir = os.fspath(out_dir)
    files = {
        "corpus.jsonl": _jsonl(world.corpus),
        "train.jsonl": _jsonl(q.to_json() for q in world.train),
        "heldout.jsonl": _jsonl(q.to_json() for q in world.heldout),
        "sft.jsonl": _jsonl(sft_examples(world, search_fn, python_fn, guess_fraction)),
    }
    paths = {name: os.path.join(out_dir, name) for name in files}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite)")
    os.makedirs(out_dir, exist_ok=True)
    for name, data in files.items():
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


# ------------------------------------------------------------------------------ demo tokenizer, model

DEMO_VOCAB_SIZE = 512
DEMO_GUESS_FRACTION = 0.3  # share of the demo's SFT traces that guess instead of searching (`sft_examples`)


def demo_symbols() -> tuple[str, ...]:
    """The user-defined symbols of the demo tokenizer: the tool tags, then every name syllable and colour
    (each one token, so names and values are spelt alike in the question, the passage and the answer)."""
    from aepo_jax.data.tokenizer import TOOL_TAGS

    return tuple(TOOL_TAGS) + SYLLABLES + COLOURS


def demo_model_config(vocab_size: int):
    """The tiny Qwen3 of the CPU demo, sized for 2 CPU cores: 4 layers, hidden 128, 4 query / 2 key-value
    heads of 32, MLP 384, tied embeddings, rotary theta 10,000 (sequences are short), positions up to 512.
    0.85 M parameters at vocab 512. Measured on the 2-core CPU dev machine (jax 0.10.2, float32, jit):
    forward + backward of a token-mean cross-entropy over a batch of 16 x 256 tokens takes 0.32 s (median
    of 20; 0.57 CPU-seconds), 16 x 208 tokens 0.23 s. The demo's sequences (prompt + response) are at most
    244 tokens with the demo tokenizer, 182 on average (55 of them written by the model)."""
    from aepo_jax.models.qwen3 import Qwen3Config

    return Qwen3Config(vocab_size=int(vocab_size), hidden_size=128, intermediate_size=384, num_layers=4,
                       num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10_000.0,
                       max_position_embeddings=512, tie_word_embeddings=True)


def build_demo(out_dir: str | os.PathLike, seed: int = 0, vocab_size: int = DEMO_VOCAB_SIZE,
               overwrite: bool = False, guess_fraction: float = DEMO_GUESS_FRACTION,
               **world_kwargs) -> dict[str, str]:
    """Generates the world of `seed` and writes everything the demo run needs into `out_dir`:
    corpus.jsonl, train.jsonl, heldout.jsonl, sft.jsonl (`write_world`; `guess_fraction` of its traces
    guess without the tools), tokenizer.model (a SentencePiece model trained on `world_texts`) and
    world.json (the generator's arguments and counts). Returns name -> path. Byte-identical for the same
    arguments. `world_kwargs` go to `make_world`."""
    from aepo_jax.data.tokenizer import train_sentencepiece

    world = make_world(seed, **world_kwargs)
    out_dir = os.fspath(out_dir)
    paths = {name: os.path.join(out_dir, name) for name in ("tokenizer.model", "world.json")}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True (--overwrite)")
    paths.update(write_world(world, out_dir, overwrite=overwrite, guess_fraction=guess_fraction))
    tok = train_sentencepiece(world_texts(world), paths["tokenizer.model"], vocab_size,
                              user_defined_symbols=demo_symbols(), overwrite=True)
    args = inspect.signature(make_world).bind(seed, **world_kwargs)
    args.apply_defaults()
    info = {"seed": world.seed, "make_world": {k: v for k, v in args.arguments.items() if k != "seed"},
            "num_entities": len(world.entities), "num_train": len(world.train),
            "num_heldout": len(world.heldout), "heldout_entities": list(world.heldout_entities),
            "vocab_size": tok.vocab_size, "sft_guess_fraction": guess_fraction}
    with open(paths["world.json"], "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    return paths
