"""Tokenizers: loading from local files, the chat template, the protocol both adapters expose, and the
SentencePiece demo tokenizer trained on the demo world (single-token tags, byte fallback, determinism)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from aepo_jax.data import world as W
from aepo_jax.data.tokenizer import (TOOL_TAGS, HFTokenizer, SentencePieceTokenizer, encode_chat,
                                     encode_response, load_tokenizer, split_response, token_id,
                                     train_sentencepiece)
from aepo_jax.data.tokenizer import Tokenizer as TokenizerProtocol

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def _write_tokenizer(path, with_template=True, eos_token=None):
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "what", "is", "2+2", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos_token,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if with_template:
        fast.chat_template = TEMPLATE
    fast.save_pretrained(str(path))
    return {w: i for i, w in enumerate(words)}


def test_chat_template_applied(tmp_path):
    ids = _write_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    got = encode_chat(tokenizer, [{"role": "user", "content": "what is 2+2 ?"}])
    want = [ids[w] for w in "<|im_start|> user what is 2+2 ? <|im_end|> <|im_start|> assistant".split()]
    assert got == want


def test_prompts_use_the_chat_template_when_there_is_one(tmp_path):
    """--prompt_format: a tokenizer with a chat template (a real Qwen3's) gets the system + user messages
    through it with the assistant's turn opened; one without gets the demo's plain-text prompt."""
    ids = _write_tokenizer(tmp_path / "chat")  # a word-level vocabulary: unknown words -> <unk>
    chat = load_tokenizer(tmp_path / "chat")
    question = "what is 2+2 ?"
    want = ([ids["<|im_start|>"], ids["system"]] + [ids["<unk>"]] * len(W.SYSTEM_PROMPT.split())
            + [ids["<|im_end|>"], ids["<|im_start|>"], ids["user"]] + [ids[w] for w in question.split()]
            + [ids["<|im_end|>"], ids["<|im_start|>"], ids["assistant"]])
    assert W.encode_prompt(chat, question) == W.encode_prompt(chat, question, "chat") == want
    assert W.encode_prompt(chat, question, "plain") == chat.encode(W.render_prompt(question)) != want
    _write_tokenizer(tmp_path / "plain", with_template=False)
    plain = load_tokenizer(tmp_path / "plain")
    assert W.encode_prompt(plain, question) == plain.encode(W.render_prompt(question))
    with pytest.raises(ValueError, match="no chat_template"):
        W.encode_prompt(plain, question, "chat")
    with pytest.raises(ValueError, match="prompt_format"):
        W.encode_prompt(chat, question, "jinja")


def test_sft_prompts_match_the_rl_prompts(tmp_path):
    """An SFT record with a question gets the prompt every RL and eval prompt gets (the chat template here);
    a record with a prompt text is tokenized as written. The response follows with its loss mask."""
    import types

    from aepo_jax.data.datasets import SFTRecord
    from aepo_jax.train.trainer import Trainer

    ids = _write_tokenizer(tmp_path, eos_token="<|im_end|>")
    tok = load_tokenizer(tmp_path)
    for prompt_format in ("auto", "plain"):
        trainer = types.SimpleNamespace(tokenizer=tok, cfg=types.SimpleNamespace(prompt_format=prompt_format))
        response_ids, response_mask = encode_response(tok, "is 2+2")
        tokens, mask = Trainer._sft_example(trainer, SFTRecord(question="what is 2+2 ?", response="is 2+2"))
        prompt = W.encode_prompt(tok, "what is 2+2 ?", prompt_format)
        assert tokens == prompt + response_ids and mask == [0] * len(prompt) + response_mask
        assert (prompt[-1] == ids["assistant"]) == (prompt_format == "auto")  # the chat turn is open
        tokens, _ = Trainer._sft_example(trainer, SFTRecord(prompt="what is", response="is 2+2"))
        assert tokens == [ids["what"], ids["is"]] + response_ids


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    _write_tokenizer(tmp_path, with_template=False)
    with pytest.raises(ValueError, match="no chat_template"):
        encode_chat(load_tokenizer(tmp_path), [{"role": "user", "content": "what"}])


# ---------------------------------------------------------------------- the protocol, the SentencePiece
# demo tokenizer (trained on the demo world) and the HF adapter

@pytest.fixture(scope="module")
def demo_world():
    return W.make_world(0)


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory, demo_world):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    train_sentencepiece(W.world_texts(demo_world), path, vocab_size=512,
                        user_defined_symbols=W.demo_symbols())
    return path


@pytest.fixture(scope="module")
def sp(sp_path):
    return load_tokenizer(sp_path)


@pytest.fixture
def hf(tmp_path):
    words = ["<unk>", "<eos>", "<search>", "</search>", "a", "b", "c"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(tmp_path))
    return load_tokenizer(tmp_path)


def test_sentencepiece_tool_tags_are_single_tokens(sp):
    assert isinstance(sp, SentencePieceTokenizer) and isinstance(sp, TokenizerProtocol)
    ids = [token_id(sp, tag) for tag in TOOL_TAGS]
    assert ids == list(range(3, 3 + len(TOOL_TAGS)))  # right after <unk>, <pad>, </s>
    assert (sp.eos_id, sp.pad_id, sp.vocab_size) == (2, 1, 512)
    # In context too: a tag is never merged with its neighbours.
    text = ("<think>x</think>\n<search>KaZo</search> <result>\nDoc 1\n</result>\n"
            "<python>1 + 2</python> <result>\n3\n</result>\n<answer>\\boxed{7}</answer>")
    pieces = sp.pieces(text)
    for tag in TOOL_TAGS:
        assert tag in pieces, tag
    with pytest.raises(ValueError, match="exactly one"):
        token_id(sp, "<search>KaZo")


def test_sentencepiece_splits_digits(sp):
    assert sp.pieces("abs(1954 - 1987)")[-5:] == ["1", "9", "8", "7", ")"]
    assert all(len(p.strip("\u2581")) <= 1 for p in sp.pieces("12345 67890") if any(c.isdigit() for c in p))


def test_sentencepiece_training_is_deterministic(sp_path, demo_world, tmp_path):
    again = train_sentencepiece(W.world_texts(demo_world), tmp_path / "again.model", vocab_size=512,
                                user_defined_symbols=W.demo_symbols())
    assert (tmp_path / "again.model").read_bytes() == sp_path.read_bytes() == again.model_proto
    other = train_sentencepiece(W.world_texts(W.make_world(1)), None, vocab_size=512,
                                user_defined_symbols=W.demo_symbols())
    assert other.model_proto != again.model_proto


def test_sentencepiece_round_trip_on_the_world(sp, demo_world):
    for p in demo_world.corpus:
        assert sp.decode(sp.encode(p["text"])) == p["text"]
    ex = W.sft_examples(demo_world)[0]
    text = W.render_prompt(ex["question"]) + ex["response"]
    assert sp.decode(sp.encode(text)) == text
    # No unknown tokens on the world's text: byte fallback is not needed there.
    assert 0 not in sp.encode("\n".join(W.world_texts(demo_world)[:50]))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
               max_size=80))
def test_sentencepiece_round_trip_on_any_text(sp, text):
    ids = sp.encode(text)
    assert all(0 < i < sp.vocab_size for i in ids)  # never <unk> (id 0): byte fallback
    assert sp.decode(ids) == text


def test_sentencepiece_byte_fallback_and_special_tokens(sp):
    text = "Ünïcödé 日本語 🙂\ttab  two spaces\r\n"
    ids = sp.encode(text)
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids) and sp.decode(ids) == text
    assert sp.decode(ids + [sp.eos_id]) == text + "</s>"
    assert sp.decode([sp.pad_id] + ids + [sp.eos_id], skip_special_tokens=True) == text
    assert sp.encode("</s>") != [sp.eos_id]  # text cannot forge EOS
    # ids past the tokenizer (a model's padded embedding rows) decode to the unknown surface, no crash
    assert sp.decode(ids[:1] + [sp.vocab_size + 7] + ids[1:]) == sp.decode(ids[:1]) + " \u2047 " + sp.decode(ids[1:])


def test_sentencepiece_errors(sp_path, tmp_path, demo_world):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(FileExistsError, match="overwrite"):
        train_sentencepiece(["abc"], sp_path, vocab_size=512)
    with pytest.raises(ValueError, match="no room"):
        train_sentencepiece(["abc"], None, vocab_size=200)
    with pytest.raises(ValueError, match="non-empty text"):
        train_sentencepiece(["", ""], None)


def test_adapters_expose_the_same_protocol(sp, hf):
    assert isinstance(hf, HFTokenizer) and isinstance(hf, TokenizerProtocol)
    for tok in (sp, hf):
        ids = tok.encode("a b")
        assert isinstance(ids, list) and all(type(i) is int for i in ids) and ids
        assert tok.encode("a b", add_special_tokens=False) == ids
        assert isinstance(tok.decode(ids), str)
        assert tok.token_ids_of("</search>") == tok.encode("</search>")
        for i in (tok.eos_id, tok.pad_id):
            assert type(i) is int and 0 <= i < tok.vocab_size
    assert hf.encode("a <search> b </search>") == [4, 2, 5, 3]
    assert (hf.eos_id, hf.pad_id, hf.vocab_size) == (1, 1, 7)
    assert hf.decode([4, 5, 1]) == "a b <eos>" and hf.decode([4, 5, 1], skip_special_tokens=True) == "a b"
    # Attributes beyond the protocol pass through to the wrapped tokenizer; encode_chat takes the adapter.
    assert hf.chat_template == TEMPLATE and hf.convert_ids_to_tokens([6]) == ["c"]


def test_stop_table_accepts_both_adapters(sp, hf):
    stops = pytest.importorskip("aepo_jax.engine.stops")
    for tok in (sp, hf):
        table = stops.StopTable(["</search>", "</python>"] if tok is sp else ["</search>"], tokenizer=tok)
        assert table.alternatives[0] == [tuple(tok.token_ids_of("</search>"))]
    assert stops.StopTable(["</search>"], tokenizer=sp).width == 1


def test_hf_tokenizer_without_eos(tmp_path):
    _write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 10
    with pytest.raises(ValueError, match="no eos_token"):
        tok.eos_id


def test_encode_response_masks_tool_results(sp):
    response = ("<think>t</think>\n<search>KaZo</search> <result>\nDoc 1 (Title: KaZo) x\n</result>\n"
                "<answer>\\boxed{7}</answer>")
    segments = split_response(response)
    assert segments == [("<think>t</think>\n<search>KaZo</search>", True),
                        (" <result>\nDoc 1 (Title: KaZo) x\n</result>", False),
                        ("\n<answer>\\boxed{7}</answer>", True)]
    ids, mask = encode_response(sp, response)
    assert len(ids) == len(mask) and ids[-1] == sp.eos_id and mask[-1] == 1
    result_ids = sp.encode(segments[1][0])
    start = len(sp.encode(segments[0][0]))
    assert ids[start:start + len(result_ids)] == result_ids
    assert mask == [1] * start + [0] * len(result_ids) + [1] * (len(ids) - start - len(result_ids))
    assert sp.decode(ids, skip_special_tokens=True) == response
    plain = sp.encode("no tools")
    assert encode_response(sp, "no tools", add_eos=False) == (plain, [1] * len(plain))
    assert split_response("a <result>\nunclosed") == [("a <result>\nunclosed", True)]
