"""A scripted policy for end-to-end rollout tests: a real Qwen3 whose weights implement a bigram chain.

Embeddings are one-hot, every attention / MLP output projection is zero (the residual stream carries the
current token's one-hot through all layers), and the LM head maps token a to logit `strength` on
successor(a). Sampling at temperature 1 then follows the chain with probability ~1 - V e^-strength, and the
model emits a complete tool-using response:

  Q -> <think> plan </think> <search> bralo </search>  [tool result appended]  </result> -> <answer>
    \\boxed{ paris } </answer> <eos>
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from aepo_jax.data.tokenizer import HFTokenizer
from aepo_jax.models import qwen3

WORDS = ["<pad>", "<eos>", "<unk>", "Q", "<think>", "plan", "</think>", "<search>", "bralo", "</search>",
         "<result>", "</result>", "<answer>", "\\boxed{", "paris", "}", "</answer>", "<python>", "</python>",
         "Doc", "1", "(Title:", "Bralo)", "Bralo", "is", "in", "Paris.", "city", "lyon"]
CHAIN = ["Q", "<think>", "plan", "</think>", "<search>", "bralo", "</search>"]
AFTER_RESULT = ["</result>", "<answer>", "\\boxed{", "paris", "}", "</answer>", "<eos>"]
CORPUS = [{"id": "1", "title": "Bralo", "text": "Bralo is in Paris."},
          {"id": "2", "title": "Lyon", "text": "lyon is a city"}]


def tokenizer(path) -> HFTokenizer:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")
    fast.save_pretrained(str(path))
    from aepo_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(path)


def successors(extra: dict[str, str] | None = None) -> dict[str, str]:
    pairs = dict(zip(CHAIN, CHAIN[1:])) | dict(zip(AFTER_RESULT, AFTER_RESULT[1:]))
    return pairs | (extra or {})


def model(strength: float = 30.0, succ: dict[str, str] | None = None) -> qwen3.Qwen3:
    v = len(WORDS)
    config = qwen3.Qwen3Config(vocab_size=v, hidden_size=v + 3, intermediate_size=16, num_layers=2,
                               num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=512)
    m = qwen3.Qwen3(config, rngs=nnx.Rngs(0))
    h = config.hidden_size
    m.embed_tokens.embedding[...] = jnp.eye(v, h)
    for layer in m.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    head = np.zeros((h, v), np.float32)
    index = {w: i for i, w in enumerate(WORDS)}
    # RMSNorm scales a one-hot to sqrt(h); divide so the successor's logit is `strength`.
    for a, b in (succ or successors()).items():
        head[index[a], index[b]] = strength / np.sqrt(h)
    m.lm_head.kernel[...] = jnp.asarray(head)
    return m


def write_corpus(path):
    import json
    path.write_text("".join(json.dumps(p) + "\n" for p in CORPUS))
    return path
