"""The demo world: determinism, answers derivable from the corpus, the split, the reference traces, the CLI.

Gold answers are re-derived here from the corpus text with hand-written patterns (not with world.py's
templates), and the traces are checked with the agent's own format check and reward, and against the real
`search` / `python` tools.
"""
import collections
import json
import os
import re
import sys

import pytest

from aepo_jax.agent.parsing import check_format, extract_answer, extract_boxed, pending_tool_call
from aepo_jax.data import world as W
from aepo_jax.data.rewards import get_reward_fn, normalize_answer
from aepo_jax.data.tokenizer import TOOL_TAGS, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import make_demo_world  # noqa: E402

FILES = ("corpus.jsonl", "train.jsonl", "heldout.jsonl", "sft.jsonl", "tokenizer.model", "world.json")


@pytest.fixture(scope="module")
def world():
    return W.make_world(0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    W.build_demo(out, seed=0)
    return out


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _facts(corpus):
    """{guild: {attribute: value}} parsed from the passage text (and each passage names its guild)."""
    facts = {}
    for p in corpus:
        m = re.fullmatch(r"(\w+) is a guild in (\w+)\. It was founded in (\d{4}) and has (\d+) members\. "
                         r"Its colour is (\w+) and its ally is (\w+)\.", p["text"])
        assert m and m[1] == p["title"], p
        facts[m[1]] = dict(zip(("city", "founding year", "member count", "colour", "ally"), m.groups()[1:]))
    return facts


def _derive(question, facts):
    """The answer of a question text, looked up in `facts` (hand-written patterns for every template)."""
    single = {r"What is the city of (\w+)\?": "city", r"When was (\w+) founded\?": "founding year",
              r"How many members does (\w+) have\?": "member count",
              r"What is the colour of (\w+)\?": "colour", r"What is the ally of (\w+)\?": "ally"}
    for pattern, noun in single.items():
        if m := re.fullmatch(pattern, question):
            return facts[m[1]][noun], {m[1]}
    two_hop = {r"What is the city of the ally of (\w+)\?": "city",
               r"When was the ally of (\w+) founded\?": "founding year",
               r"How many members does the ally of (\w+) have\?": "member count",
               r"What is the colour of the ally of (\w+)\?": "colour"}
    for pattern, noun in two_hop.items():
        if m := re.fullmatch(pattern, question):
            ally = facts[m[1]]["ally"]
            return facts[ally][noun], {m[1], ally}
    if m := re.fullmatch(r"How many years passed between the founding of (\w+) and of (\w+)\?", question):
        a, b = int(facts[m[1]]["founding year"]), int(facts[m[2]]["founding year"])
        return str(abs(a - b)), {m[1], m[2]}
    if m := re.fullmatch(r"How many members do (\w+) and (\w+) have together\?", question):
        return str(int(facts[m[1]]["member count"]) + int(facts[m[2]]["member count"])), {m[1], m[2]}
    raise AssertionError(f"question matches no template: {question!r}")


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_other_seed_other_world(demo_dir, tmp_path):
    again = tmp_path / "again"
    W.build_demo(again, seed=0)
    for name in FILES:
        assert (demo_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = W.make_world(1)
    assert {e.name for e in other.entities} != {e.name for e in W.make_world(0).entities}
    W.write_world(other, tmp_path / "other")
    assert (tmp_path / "other" / "corpus.jsonl").read_bytes() != (demo_dir / "corpus.jsonl").read_bytes()


def test_files_are_the_user_formats(demo_dir, world):
    corpus = _read(demo_dir / "corpus.jsonl")
    assert corpus == world.corpus and all(set(p) == {"id", "title", "text"} for p in corpus)
    assert len({p["id"] for p in corpus}) == len(corpus)
    for split in ("train", "heldout"):
        rows = _read(demo_dir / f"{split}.jsonl")
        assert rows == [q.to_json() for q in getattr(world, split)]
        assert all(set(r) == {"id", "question", "answers"} and r["answers"] and
                   all(isinstance(a, str) for a in r["answers"]) for r in rows)
    sft = _read(demo_dir / "sft.jsonl")
    assert len(sft) == len(world.train) and all(set(r) == {"question", "response"} for r in sft)
    info = json.loads((demo_dir / "world.json").read_text())
    assert info["num_train"] == len(world.train) and info["seed"] == 0


# -------------------------------------------------------------------------------------- world content


def test_every_gold_answer_follows_from_the_corpus(world):
    facts = _facts(world.corpus)
    assert len(facts) == len(world.entities) == 256
    for q in world.train + world.heldout:
        answer, _ = _derive(q.question, facts)
        assert list(q.answers) == [answer], q


def test_world_mixes_hops_and_arithmetic_and_guessing_fails(world):
    facts = _facts(world.corpus)
    kinds = collections.Counter(q.template.split("_")[0] for q in world.train)
    assert kinds["single"] > 100 and kinds["two"] > 100 and kinds["year"] + kinds["members"] > 100
    # The most common answer of each template is rare: a constant guess is wrong most of the time.
    by_template = collections.defaultdict(list)
    for q in world.train:
        by_template[q.template].append(q.answers[0])
    for template, answers in by_template.items():
        top = collections.Counter(answers).most_common(1)[0][1]
        assert top / len(answers) < 0.3, (template, top, len(answers))
    # Names are invented and distinct; an ally is never the guild itself.
    assert all(g["ally"] != name for name, g in facts.items())
    cities = {g["city"] for g in facts.values()}
    assert not cities & set(facts) and len(cities) > 6


def test_heldout_is_new_and_answerable(world):
    facts = _facts(world.corpus)
    train_texts = {q.question for q in world.train}
    held = set(world.heldout_entities)
    assert len(world.heldout) == 128 and len(held) == 64
    assert len(train_texts) == len(world.train)
    for q in world.heldout:
        assert q.question not in train_texts
        _, touched = _derive(q.question, facts)
        assert touched & held, q  # needs a fact of a held-out guild
    for q in world.train:
        _, touched = _derive(q.question, facts)
        assert not touched & held, q
    # No train trace reads a held-out guild's passage.
    sft = "\n".join(ex["response"] for ex in W.sft_examples(world))
    for name in held:
        assert f"(Title: {name})" not in sft and f"<search>{name}</search>" not in sft
    assert set(collections.Counter(q.template for q in world.heldout)) == set(W.TEMPLATES)


@pytest.mark.parametrize("seed", [1, 2, 7, 11])
def test_invariants_hold_for_other_seeds(seed):
    pytest.importorskip("bm25s")
    from aepo_jax.agent.tools.search import Passage, SearchIndex, format_passages

    world = W.make_world(seed)
    facts = _facts(world.corpus)
    held = set(world.heldout_entities)
    train_names = [e.name for e in world.entities if e.name not in held]
    train_syllables = {s for name in train_names for s in W.split_syllables(name)}
    for name in held:  # a held-out name is spelt with syllables of train names
        assert set(W.split_syllables(name)) <= train_syllables, name
    for q in world.train + world.heldout:
        answer, touched = _derive(q.question, facts)
        assert list(q.answers) == [answer] and bool(touched & held) == q.id.startswith("heldout")
    for ex in W.sft_examples(world):
        assert check_format(ex["response"]).ok
    index = SearchIndex.build([Passage(p["id"], p["title"], p["text"]) for p in world.corpus])
    search = W.default_search_fn(world)
    for e in world.entities:  # the real BM25 search's top passage is the guild's own
        assert format_passages(index.search(e.name, 1), 3000) == search(e.name)


def test_make_world_arguments():
    small = W.make_world(3, num_entities=10, num_cities=3, heldout_fraction=0.2, max_heldout=None)
    assert len(small.entities) == 10 and len(small.heldout_entities) == 2
    assert len({e.city for e in small.entities}) <= 3
    big = W.make_world(0, num_entities=300, max_heldout=None)  # more guilds than 2-syllable names allow
    assert {len(W.split_syllables(e.name)) for e in big.entities} == {3}
    facts = _facts(big.corpus)
    assert all(list(q.answers) == [_derive(q.question, facts)[0]] for q in big.train + big.heldout)
    with pytest.raises(ValueError, match="num_entities"):
        W.make_world(0, num_entities=3)
    with pytest.raises(ValueError, match="heldout_fraction"):
        W.make_world(0, heldout_fraction=1.0)


# ------------------------------------------------------------------------------------- reference traces


def _calls(response):
    """[(tag, payload, result text)] of a response, read with the agent's own parser."""
    out = []
    for m in re.finditer(r"</(search|python)> <result>\n(.*?)\n</result>", response, re.S):
        call = pending_tool_call(response[: m.start() + len(f"</{m[1]}>")])
        out.append((call.tag, call.payload, m[2]))
    return out


def test_traces_pass_the_format_check_and_earn_full_reward(world):
    reward = get_reward_fn("f1_format")
    search = W.default_search_fn(world)
    for q, ex in zip(world.train, W.sft_examples(world)):
        response = ex["response"]
        assert ex["question"] == q.question
        assert check_format(response).ok, (check_format(response).reason, response)
        assert normalize_answer(extract_boxed(extract_answer(response))) == normalize_answer(q.answers[0])
        calls = _calls(response)
        tags = [tag for tag, _, _ in calls]
        r = reward(response, list(q.answers))
        if q.template in ("year_gap", "members_sum"):
            assert tags == ["search", "search", "python"] and r.score == pytest.approx(1.1)
        else:
            assert tags == ["search"] * (2 if q.template.startswith("two_hop") else 1) and r.score == 1.0
        for tag, payload, text in calls:
            if tag == "search":
                assert text == search(payload) and text.startswith(f"Doc 1 (Title: {payload}) {payload} is")
            else:
                assert text == W.default_python_fn(payload) == q.answers[0]
        assert not response.startswith(" ") and response.endswith("</answer>")


def test_guess_traces_answer_without_the_tools(world):
    """With guess_fraction, that share of the traces opens with the reference's first thought and then
    guesses (well-formed, no tool call, right only by luck); the rest are the reference traces."""
    reward = get_reward_fn("f1_format")
    reference = W.sft_examples(world)
    mixed = W.sft_examples(world, guess_fraction=0.4)
    assert mixed == W.sft_examples(world, guess_fraction=0.4)  # seeded
    held = set(world.heldout_entities)
    guessed, lucky = collections.Counter(), 0
    for q, ref, ex in zip(world.train, reference, mixed):
        assert ex["question"] == ref["question"]
        if ex["response"] == ref["response"]:
            continue
        guessed[q.template] += 1
        first_thought, answer = ex["response"].split("\n")[0], extract_boxed(extract_answer(ex["response"]))
        assert ref["response"].startswith(first_thought + "\n<search>")
        assert ex["response"] == f"{first_thought}\n<answer>\\boxed{{{answer}}}</answer>"
        assert check_format(ex["response"]).ok and not _calls(ex["response"])
        lucky += answer == q.answers[0]
        assert reward(ex["response"], list(q.answers)).score == float(answer == q.answers[0])
        if q.template.endswith("ally"):
            assert answer in {e.name for e in world.entities} - held
        elif q.template.endswith(("city", "colour")):
            assert answer in {e.city for e in world.entities} | set(W.COLOURS)
        else:
            assert answer.isdigit()
    assert abs(sum(guessed.values()) / len(world.train) - 0.4) < 0.04
    assert set(guessed) == set(W.TEMPLATES)
    assert lucky < 0.05 * sum(guessed.values())  # guessing fails
    with pytest.raises(ValueError, match="guess_fraction"):
        W.sft_examples(world, guess_fraction=1.0)


def test_hand_checked_trace():
    a = W.Entity("KaZo", "MiRaVo", 1954, 4520, "amber", "BiSa")
    b = W.Entity("BiSa", "DaKoRi", 1987, 870, "red", "KaZo")
    world = W.World(0, (a, b), (), (), ())
    assert world.corpus[0] == {"id": "p0", "title": "KaZo", "text": (
        "KaZo is a guild in MiRaVo. It was founded in 1954 and has 4520 members. Its colour is amber and its "
        "ally is BiSa.")}
    gap = W.Question("q", "How many years passed between the founding of KaZo and of BiSa?", ("33",),
                     "year_gap", ("KaZo", "BiSa"))
    assert W.reference_response(world, gap) == (
        "<think>I need the founding year of KaZo and of BiSa.</think>\n"
        "<search>KaZo</search> <result>\n"
        "Doc 1 (Title: KaZo) KaZo is a guild in MiRaVo. It was founded in 1954 and has 4520 members. "
        "Its colour is amber and its ally is BiSa.\n</result>\n"
        "<think>KaZo was founded in 1954.</think>\n"
        "<search>BiSa</search> <result>\n"
        "Doc 1 (Title: BiSa) BiSa is a guild in DaKoRi. It was founded in 1987 and has 870 members. "
        "Its colour is red and its ally is KaZo.\n</result>\n"
        "<think>BiSa was founded in 1987.</think>\n"
        "<python>abs(1954 - 1987)</python> <result>\n33\n</result>\n"
        "<answer>\\boxed{33}</answer>")
    two_hop = W.Question("q", "What is the colour of the ally of KaZo?", ("red",), "two_hop_colour",
                         ("KaZo",))
    calls = []
    text = W.reference_response(world, two_hop, search_fn=lambda q: calls.append(q) or f"[{q}]")
    assert calls == ["KaZo", "BiSa"]
    assert ("<think>The ally of KaZo is BiSa.</think>\n<search>BiSa</search> <result>\n[BiSa]\n</result>"
            in text)
    assert text.endswith("<think>The colour of BiSa is red.</think>\n<answer>\\boxed{red}</answer>")
    assert W.default_python_fn("4520 + 870") == "5390" and W.default_python_fn("abs(3 - 10)") == "7"
    assert W.default_python_fn("__import__('os')").startswith("Error:")
    assert W.split_syllables("MiRaVo") == ("Mi", "Ra", "Vo")
    with pytest.raises(ValueError, match="syllables"):
        W.split_syllables("Bralo")


def test_prompt_is_short_and_names_the_tools():
    prompt = W.render_prompt("What is the city of KaZo?")
    assert prompt.endswith("\nQuestion: What is the city of KaZo?\nAssistant:")
    assert all(tag in prompt for tag in ("<search>", "<python>", "<answer>", "\\boxed{"))
    assert len(prompt) < 160
    system, user = W.prompt_messages("What is the city of KaZo?")
    assert system["role"] == "system" and user == {"role": "user", "content": "What is the city of KaZo?"}


def test_default_tools_match_the_real_tools(world, demo_dir):
    """The result text inside the traces is what the agent's real tools return for those calls."""
    tools = pytest.importorskip("aepo_jax.agent.tools")
    search = tools.SearchTool(corpus=str(demo_dir / "corpus.jsonl"), top_k=1)
    calls = [c for ex in _read(demo_dir / "sft.jsonl") for c in _calls(ex["response"])]
    queries = sorted({payload for tag, payload, _ in calls if tag == "search"})
    assert len(queries) == len(world.entities) - len(world.heldout_entities)
    results = {payload: text for tag, payload, text in calls if tag == "search"}
    for query in queries:
        assert search.call(query).text == results[query], query
    if sys.platform == "linux":
        python = tools.PythonTool(timeout_s=10)
        for tag, payload, text in [c for c in calls if c[0] == "python"][:3]:
            assert python.call(payload).text == text, payload


# ------------------------------------------------------------------------------ tokenizer, model, CLI


def test_demo_tokenizer_fits_the_traces(demo_dir, world):
    from aepo_jax.data.tokenizer import encode_response, split_response

    tok = load_tokenizer(demo_dir / "tokenizer.model")
    assert tok.vocab_size == W.DEMO_VOCAB_SIZE
    for symbol in W.demo_symbols():
        assert len(tok.token_ids_of(symbol)) == 1, symbol
    assert set(TOOL_TAGS) <= set(W.demo_symbols())
    lengths, trained = [], set()
    for ex in _read(demo_dir / "sft.jsonl"):
        ids, mask = encode_response(tok, ex["response"])
        assert tok.decode(ids, skip_special_tokens=True) == ex["response"]
        lengths.append(len(W.encode_prompt(tok, ex["question"])) + len(ids))
        trained.update(i for text, by_model in split_response(ex["response"]) if by_model
                       for i in tok.encode(text))
    assert max(lengths) <= 256  # prompt + response + EOS fit the demo's 256-token sequences
    # A name is its syllable tokens wherever it appears: in the question, the query, the passage, the
    # thought and the answer.
    for e in world.entities:
        spelling = tok.encode(e.name)
        assert [tok.id_to_piece(i) for i in spelling] == list(W.split_syllables(e.name))
    first = world.entities[0]
    e = world.entity(first.ally)
    spelling = tok.encode(e.name)
    for context in (W.render_prompt(f"What is the city of {e.name}?"), f"<search>{e.name}</search>",
                    f"Doc 1 (Title: {e.name}) {e.passage()}",
                    f"Doc 1 (Title: {first.name}) {first.passage()}",
                    e.fact("city"), f"<answer>\\boxed{{{e.name}}}</answer>"):
        ids = tok.encode(context)
        assert any(ids[i:i + len(spelling)] == spelling for i in range(len(ids))), context
    # Every token of a held-out name is one the model writes in the train traces.
    for name in world.heldout_entities:
        assert set(tok.encode(name)) <= trained, name


def test_demo_model_config_runs():
    import jax.numpy as jnp
    from flax import nnx

    from aepo_jax.models.qwen3 import Qwen3

    config = W.demo_model_config(512)
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.tie_word_embeddings) == (
        512, 128, 4, True)
    logits = Qwen3(config, rngs=nnx.Rngs(0))(jnp.zeros((2, 8), jnp.int32))
    assert logits.shape == (2, 8, 512)


def test_symbols_never_cut_template_words(world):
    """Syllables and colours (single-token symbols of the demo tokenizer) occur in the world's text only as
    parts of names and as colour values, never inside another word."""
    assert len(set(W.SYLLABLES)) == len(W.SYLLABLES) >= 20
    names = {e.name for e in world.entities} | {e.city for e in world.entities}
    text = "\n".join(W.world_texts(world))
    words = sorted(names, key=len, reverse=True) + list(W.COLOURS)
    rest = re.sub(r"\b(" + "|".join(words) + r")\b", "#", text)
    for symbol in W.SYLLABLES + W.COLOURS:
        assert symbol not in rest, symbol
    for name in names:
        assert "".join(W.split_syllables(name)) == name


def test_cli(tmp_path, capsys, demo_dir):
    assert make_demo_world.main(["--seed", "0", "--out", str(tmp_path / "zero")]) == 0
    for name in FILES:  # the CLI writes what build_demo(seed=0) writes
        assert (tmp_path / "zero" / name).read_bytes() == (demo_dir / name).read_bytes(), name
    out = tmp_path / "demo"
    assert make_demo_world.main(["--seed", "2", "--out", str(out), "--num_entities", "16"]) == 0
    assert sorted(os.listdir(out)) == sorted(FILES)
    assert json.loads((out / "world.json").read_text())["num_entities"] == 16
    before = (out / "corpus.jsonl").read_bytes()
    assert make_demo_world.main(["--seed", "3", "--out", str(out)]) == 1
    assert "already exist" in capsys.readouterr().err
    assert (out / "corpus.jsonl").read_bytes() == before
    assert make_demo_world.main(["--seed", "3", "--out", str(out), "--overwrite"]) == 0
    assert (out / "corpus.jsonl").read_bytes() != before
