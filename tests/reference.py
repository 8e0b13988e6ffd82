"""Reference models for tests: tiny random HF `Qwen3ForCausalLM` checkpoints written to a directory."""

from __future__ import annotations

import torch
import transformers


def hf_qwen3(seed: int = 0, **overrides) -> transformers.Qwen3ForCausalLM:
    """A tiny random float32 HF Qwen3 with non-trivial weights (norm weights too, so a mapping slip shows)."""
    kwargs = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def write_hf_qwen3(path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Saves a tiny random HF Qwen3 to `path` and returns the torch model."""
    model = hf_qwen3(seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    return model


def hf_logits(model, input_ids, attention_mask=None, position_ids=None):
    """HF logits as float64 numpy."""
    as_t = lambda a: None if a is None else torch.as_tensor(a.tolist() if hasattr(a, "tolist") else a)
    with torch.no_grad():
        out = model(input_ids=as_t(input_ids), attention_mask=as_t(attention_mask),
                    position_ids=as_t(position_ids))
    return out.logits.double().numpy()
