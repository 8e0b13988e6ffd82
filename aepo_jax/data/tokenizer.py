"""Tokenizers from a local directory (HF `AutoTokenizer`, never the hub) and chat-template encoding."""

from __future__ import annotations

import os
from typing import Any, Sequence


def load_tokenizer(path: str | os.PathLike):
    """Loads the tokenizer files of a local directory (tokenizer.json / tokenizer_config.json, ...)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: could not load a tokenizer ({e})") from None


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                **template_kwargs) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template (e.g. a system + user prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; add one to tokenizer_config.json")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)
    return tokenizer.encode(text, add_special_tokens=False)
