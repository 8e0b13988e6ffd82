"""Tokenizer loading from a local directory, with the chat template applied."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from aepo_jax.data.tokenizer import encode_chat, load_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def _write_tokenizer(path, with_template=True):
    words = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "what", "is", "2+2", "?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
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


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    _write_tokenizer(tmp_path, with_template=False)
    with pytest.raises(ValueError, match="no chat_template"):
        encode_chat(load_tokenizer(tmp_path), [{"role": "user", "content": "what"}])
