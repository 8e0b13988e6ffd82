"""Tokenizers behind one small protocol, for the rollout and the trainer whatever the backend.

  tok = load_tokenizer("qwen3_dir/")          # HF tokenizer files -> HFTokenizer
  tok = load_tokenizer("demo/tokenizer.model")  # a SentencePiece model -> SentencePieceTokenizer
  ids = tok.encode("<search>KaZo</search>")     # never adds BOS / EOS
  tok.decode(ids), tok.eos_id, tok.pad_id, tok.vocab_size
  tok.token_ids_of("</search>")                 # the exact ids a stop string encodes to on its own

`Tokenizer` is the protocol; `HFTokenizer` wraps a transformers tokenizer (other attributes, e.g.
`apply_chat_template`, pass through to it) and `SentencePieceTokenizer` a SentencePiece model.
`train_sentencepiece` trains the demo tokenizer on the demo world's text (`aepo_jax.data.world`) with the
tool tags as user-defined symbols, so each tag is one token and the sampler can stop on it (the demo adds
the world's name syllables and colours: `world.demo_symbols()`). Training is deterministic: the same texts
and sentencepiece version give a byte-identical `.model`.

`encode_response` tokenises an agent response the way the rollout builds it: model text and appended
` <result>\\n..\\n</result>` blocks are encoded separately, and the loss mask is 0 on the result blocks
(AEPO_SPEC.md section 1).
"""

from __future__ import annotations

import io
import os
from typing import Any, Protocol, Sequence, runtime_checkable

# The agent's tags (AEPO_SPEC.md section 1); a SentencePiece model trained by `train_sentencepiece` keeps
# each as a single token.
TOOL_TAGS = ("<think>", "</think>", "<search>", "</search>", "<python>", "</python>", "<result>",
             "</result>", "<answer>", "</answer>", "\\boxed{")
_RESULT_OPEN, _RESULT_CLOSE = " <result>", "</result>"
UNKNOWN_SURFACE = " \u2047 "  # what SentencePiece prints for an unknown piece


@runtime_checkable
class Tokenizer(Protocol):
    """What the rollout and the trainer need from a tokenizer."""

    eos_id: int
    pad_id: int
    vocab_size: int  # number of ids the tokenizer can produce (a model's embedding may be larger)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` on its own (no BOS / EOS unless `add_special_tokens` and the backend adds
        them)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special tokens (EOS, padding) are written out unless `skip_special_tokens`."""

    def token_ids_of(self, text: str) -> list[int]:
        """The exact token-id sequence `text` encodes to on its own (for stop strings)."""


def token_id(tokenizer: Tokenizer, text: str) -> int:
    """The single token id of `text`; a ValueError if `text` is not exactly one token."""
    ids = tokenizer.token_ids_of(text)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens ({ids}) in this tokenizer, expected exactly one")
    return ids[0]


# ------------------------------------------------------------------------------------------------- HF


class HFTokenizer:
    """The protocol over a transformers tokenizer (`hf`). Unknown attributes are read from `hf`."""

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = len(hf)

    @property
    def eos_id(self) -> int:
        if self.hf.eos_token_id is None:
            raise ValueError(f"the tokenizer ({type(self.hf).__name__}) has no eos_token; set eos_token in "
                             "tokenizer_config.json")
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        """The pad token, or EOS when the tokenizer has none (padding is masked out anyway)."""
        return int(self.hf.pad_token_id) if self.hf.pad_token_id is not None else self.eos_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_ids_of(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False)

    def __getattr__(self, name: str) -> Any:  # only called for attributes not found on the adapter
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer:
    """The protocol over a SentencePiece model (a `.model` file path, or its serialized bytes).

    The model must define an EOS piece; padding falls back to EOS when it has none. `decode` writes EOS /
    padding as their piece text ("</s>", "<pad>") unless `skip_special_tokens`.
    """

    chat_template = None  # plain-text prompts (`world.render_prompt`); `encode_chat` needs a template

    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm

        if isinstance(model, bytes):
            self.path, proto = None, model
        else:
            self.path = os.fspath(model)
            try:
                with open(self.path, "rb") as f:
                    proto = f.read()
            except OSError as e:
                raise FileNotFoundError(f"{self.path}: cannot read the SentencePiece model: {e.strerror}") \
                    from None
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path or '<bytes>'}: not a SentencePiece model ({e})") from None
        self.model_proto = proto
        if self.sp.eos_id() < 0:
            raise ValueError(f"{self.path or '<bytes>'}: the SentencePiece model has no EOS piece "
                             "(train it with eos_id >= 0)")
        self.eos_id = int(self.sp.eos_id())
        self.pad_id = int(self.sp.pad_id()) if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = int(self.sp.bos_id())  # -1 when the model has none
        self.vocab_size = int(self.sp.get_piece_size())

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self.sp.encode(text, out_type=int))
        if add_special_tokens and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                # A model's embedding may be larger than the tokenizer (padded rows); a sampled id
                # there must not crash a rollout. Render it as SentencePiece's unknown surface.
                out.append(self.sp.decode(run))
                out.append(UNKNOWN_SURFACE)
                run = []
                continue
            if self.sp.is_control(i):
                if not skip_special_tokens:
                    out.append(self.sp.decode(run))
                    out.append(self.sp.id_to_piece(i))
                    run = []
                continue
            run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_ids_of(self, text: str) -> list[int]:
        return self.encode(text)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def pieces(self, text: str) -> list[str]:
        """The pieces of `text` (for inspection)."""
        return list(self.sp.encode(text, out_type=str))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path or '<bytes>'}, vocab_size={self.vocab_size})"


def train_sentencepiece(texts: Sequence[str], out_path: str | os.PathLike | None, vocab_size: int = 512,
                        user_defined_symbols: Sequence[str] = TOOL_TAGS, model_type: str = "bpe",
                        overwrite: bool = False) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on `texts` (in the given order) and writes it to `out_path` (a `.model`
    file; None keeps it in memory only).

    Settings: every user-defined symbol is one token wherever it appears; digits are split (each digit
    one token, so arithmetic stays learnable); byte fallback (any text encodes, unknown characters as
    UTF-8 bytes); identity normalisation, no dummy prefix and no whitespace squashing, so
    `decode(encode(t)) == t` for any text without U+2581 ('▁', SentencePiece's space marker) and text
    pieces encoded one after another concatenate. Ids: 0 <unk>, 1 <pad>, 2 </s> (EOS), no BOS; then the
    user-defined symbols in order, then the 256 byte pieces, then the learnt pieces.
    Deterministic: one thread, no input shuffling or sampling, so the same texts give the same bytes.
    `vocab_size` is an upper bound: a small corpus may support fewer pieces (no error then).
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    for sym in user_defined_symbols:
        if not sym or "\u2581" in sym:
            raise ValueError(f"user-defined symbol {sym!r} must be non-empty and contain no U+2581")
    reserved = 3 + len(user_defined_symbols) + 256
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for learnt pieces: {reserved} ids are "
                         f"reserved (3 control, {len(user_defined_symbols)} user-defined, 256 bytes)")
    if out_path is not None and os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{os.fspath(out_path)} exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
        user_defined_symbols=list(user_defined_symbols), split_digits=True, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, unk_id=0, pad_id=1, eos_id=2, bos_id=-1, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=1 << 16,
        hard_vocab_limit=False, minloglevel=2)
    proto = buf.getvalue()
    if out_path is not None:
        out_path = os.fspath(out_path)
        if os.path.dirname(out_path):
            os.makedirs(os.path.dirname(out_path), exist_ok=True)
        tmp = f"{out_path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(proto)
        os.replace(tmp, out_path)
    tok = SentencePieceTokenizer(proto)
    tok.path = None if out_path is None else out_path
    return tok


# ---------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from local files: a directory of HF tokenizer files (tokenizer.json /
    tokenizer_config.json, ...; never the hub) -> `HFTokenizer`; a `.model` file -> `SentencePieceTokenizer`.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (expected a directory of HF "
                                "tokenizer files or a SentencePiece .model file)")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: could not load a tokenizer ({e})") from None
    return HFTokenizer(hf)


def encode_chat(tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                **template_kwargs) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template (e.g. a system + user prompt).

    `tokenizer`: an `HFTokenizer` or a transformers tokenizer."""
    hf = tokenizer.hf if isinstance(tokenizer, HFTokenizer) else tokenizer
    if not getattr(hf, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; add one to tokenizer_config.json (the demo "
                         "SentencePiece tokenizer uses plain-text prompts: "
                         "aepo_jax.data.world.render_prompt)")
    text = hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
                                  **template_kwargs)
    return list(hf.encode(text, add_special_tokens=False))


def split_response(response: str) -> list[tuple[str, bool]]:
    """[(text, written_by_model)]: `response` cut into model text and ` <result>\\n..\\n</result>` blocks
    (from ' <result>' to the next '</result>', as `agent.parsing.blank_results` reads them)."""
    out, pos = [], 0
    while (start := response.find(_RESULT_OPEN, pos)) >= 0:
        end = response.find(_RESULT_CLOSE, start + len(_RESULT_OPEN))
        if end < 0:
            break
        end += len(_RESULT_CLOSE)
        if start > pos:
            out.append((response[pos:start], True))
        out.append((response[start:end], False))
        pos = end
    if pos < len(response):
        out.append((response[pos:], True))
    return out


def encode_response(tokenizer: Tokenizer, response: str, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a response as the rollout builds it: each model segment and each result block
    encoded on its own, mask 1 on model tokens (and the EOS appended when `add_eos`), 0 on result blocks."""
    ids, mask = [], []
    for text, by_model in split_response(response):
        piece = tokenizer.encode(text)
        ids += piece
        mask += [int(by_model)] * len(piece)
    if add_eos:
        ids.append(tokenizer.eos_id)
        mask.append(1)
    return ids, mask
