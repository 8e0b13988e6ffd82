"""Qwen3 dense decoder in Flax NNX, with Hugging Face checkpoint import / export.

Architecture (Qwen3 technical report, arXiv 2505.09388; HF `Qwen3ForCausalLM`):
  h_0 = E[x]
  h'_l = h_l + W_o Attn(RoPE(RMSNorm_q(W_q RMSNorm(h_l))), RoPE(RMSNorm_k(W_k RMSNorm(h_l))), W_v RMSNorm(h_l))
  h_{l+1} = h'_l + W_down (silu(W_gate RMSNorm(h'_l)) * W_up RMSNorm(h'_l))
  logits = RMSNorm(h_L) W_head          (W_head = E^T when embeddings are tied)
with grouped-query attention (num_heads query heads share num_kv_heads key/value heads), a per-head
RMSNorm on queries and keys, rotary embeddings with theta from the config, and head_dim independent of
hidden_size / num_heads. RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in float32.

Module and parameter names follow the HF checkpoint (`embed_tokens`, `layers.i.self_attn.q_proj`, ...) so
that import / export is a mechanical rename plus a transpose of every linear kernel. The sampling engine keeps
its own copy with fused projections (`fuse_projections`): per layer W_q | W_k | W_v and W_gate | W_up each
stored as one matrix, so each group is one GEMM. HF checkpoints, training and the sharding rules use the
separate projections.

Each `DecoderLayer` takes its attention as a function, so the full-sequence forward here (self-attention
under a mask) and the sampler's cached forward (`aepo_jax.engine.forward`, which owns the KV-cache layout)
share every other line of the layer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aepo_jax.models import hf_checkpoint

Array = jax.Array


# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Hyper-parameters of a dense Qwen3 decoder (maps 1:1 to HF `Qwen3Config`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Qwen3Config.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Qwen3Config.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> "Qwen3Config":
        """Builds a config from an HF `config.json` dict; rejects what this dense port does not implement."""
        def fail(key, expected):
            raise ValueError(f"{source}: unsupported {key}={hf.get(key)!r}; expected {expected}")

        if hf.get("model_type") != "qwen3":
            fail("model_type", "'qwen3' (dense Qwen3; MoE 'qwen3_moe' and other families are not supported)")
        archs = hf.get("architectures") or ["Qwen3ForCausalLM"]
        if any(a != "Qwen3ForCausalLM" for a in archs):
            fail("architectures", "['Qwen3ForCausalLM']")
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if hf.get(key):
                fail(key, "absent (mixture-of-experts layers are not supported)")
        if hf.get("use_sliding_window"):
            fail("use_sliding_window", "false (sliding-window attention is not supported)")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            fail("layer_types", "only 'full_attention' layers")
        if hf.get("hidden_act", "silu") != "silu":
            fail("hidden_act", "'silu'")
        if hf.get("attention_bias"):
            fail("attention_bias", "false")
        rope = hf.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
            raise ValueError(f"{source}: unsupported rope_parameters={rope!r} / rope_scaling="
                             f"{hf.get('rope_scaling')!r}; expected rope_type 'default' (no scaling)")
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{source}: missing rope_parameters.rope_theta")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 40_960),
        )

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The HF `config.json` content for this config."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "use_sliding_window": False,
            "dtype": dtype,
        }


def _preset(hidden, intermediate, layers, heads, tie):
    return Qwen3Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=intermediate,
                       num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128,
                       tie_word_embeddings=tie)


PRESETS: dict[str, Qwen3Config] = {
    "0.6b": _preset(1024, 3072, 28, 16, tie=True),
    "1.7b": _preset(2048, 6144, 28, 16, tie=True),
    "4b": _preset(2560, 9728, 36, 32, tie=True),
    "8b": _preset(4096, 12288, 36, 32, tie=False),
    "14b": _preset(5120, 17408, 40, 40, tie=False),
    "32b": _preset(5120, 25600, 64, 64, tie=False),
    "tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
                        tie_word_embeddings=True),
}


def preset(name: str) -> Qwen3Config:
    """A named preset config (sizes of the released Qwen3 dense models, plus `tiny` for tests)."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown Qwen3 preset {name!r}; known: {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps); statistics in float32, result in the input dtype (as HF)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rotary_cos_sin(positions: Array, theta: float, head_dim: int, dtype) -> tuple[Array, Array]:
    """cos and sin [..., head_dim / 2] of the RoPE angles pos * inv_freq_i, inv_freq_i = theta^(-2i/D), in dtype."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
    angle = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


def rotary_embedding(x: Array, positions: Array, theta: float) -> Array:
    """RoPE (Su et al., arXiv 2104.09864) in the HF "rotate half" layout.

    x: [B, T, heads, D]; positions: [B, T]. With inv_freq_i = theta^(-2i/D) and angle = pos * inv_freq:
    x * cos(angle ++ angle) + rotate_half(x) * sin(angle ++ angle), rotate_half(a ++ b) = (-b) ++ a.
    """
    half = x.shape[-1] // 2
    cos, sin = rotary_cos_sin(positions, theta, x.shape[-1], x.dtype)
    cos, sin = (jnp.concatenate([a, a], axis=-1)[:, :, None, :] for a in (cos, sin))
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(din, dout, dtype, param_dtype, rngs):
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm and rotary embeddings. fused: the q, k and v
    projections are one [H, K (G + 2) D] matrix `qkv_proj` whose output holds, per kv head, the raw
    projections of its G = N / K query heads, its key and its value (see `grouped_qkv`, `fuse_projections`)."""

    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs, fused: bool = False):
        c = config
        self.config = c
        self.fused = fused
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if fused:
            self.qkv_proj = _linear(c.hidden_size, q_size + 2 * kv_size, dtype, param_dtype, rngs)
        else:
            self.q_proj = _linear(c.hidden_size, q_size, dtype, param_dtype, rngs)
            self.k_proj = _linear(c.hidden_size, kv_size, dtype, param_dtype, rngs)
            self.v_proj = _linear(c.hidden_size, kv_size, dtype, param_dtype, rngs)
        self.o_proj = _linear(q_size, c.hidden_size, dtype, param_dtype, rngs)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=param_dtype)

    def grouped_qkv(self, x: Array) -> Array:
        """The raw projections of x [B, T, H] (before the q / k norms and RoPE) grouped by kv head:
        [B, T, K, G + 2, D], rows 0..G-1 the group's query heads, row G its key, row G + 1 its value. With
        fused projections this is the one GEMM's output, reshaped."""
        c = self.config
        b, t, _ = x.shape
        kv, group = c.num_kv_heads, c.num_heads // c.num_kv_heads
        if self.fused:
            return self.qkv_proj(x).reshape(b, t, kv, group + 2, c.head_dim)
        q, k, v = self.raw_qkv(x)
        return jnp.concatenate([q.reshape(b, t, kv, group, c.head_dim), k[:, :, :, None], v[:, :, :, None]], 3)

    @staticmethod
    def ungroup(grouped: Array) -> tuple[Array, Array, Array]:
        """[B, T, K, G + 2, D] (see `grouped_qkv`) -> queries [B, T, N, D], keys and values [B, T, K, D]."""
        b, t, kv, rows, d = grouped.shape
        return grouped[..., :-2, :].reshape(b, t, kv * (rows - 2), d), grouped[..., -2, :], grouped[..., -1, :]

    def raw_qkv(self, x: Array) -> tuple[Array, Array, Array]:
        """Queries [B, T, N, D], keys and values [B, T, K, D] before the q / k norms and RoPE."""
        if self.fused:
            return self.ungroup(self.grouped_qkv(x))
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k, v = (proj(x).reshape(b, t, c.num_kv_heads, c.head_dim) for proj in (self.k_proj, self.v_proj))
        return q, k, v

    def normalize_and_rotate(self, q: Array, k: Array, positions: Array) -> tuple[Array, Array]:
        """RoPE(RMSNorm_q(q)), RoPE(RMSNorm_k(k)) at positions [B, T]."""
        theta = self.config.rope_theta
        return (rotary_embedding(self.q_norm(q), positions, theta),
                rotary_embedding(self.k_norm(k), positions, theta))

    def project(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """Queries [B,T,N,D], keys and values [B,T,K,D], normed and rotated."""
        q, k, v = self.raw_qkv(x)
        return (*self.normalize_and_rotate(q, k, positions), v)


class MLP(nnx.Module):
    """SwiGLU: W_down (silu(W_gate x) * W_up x) (Shazeer, arXiv 2002.05202). fused: W_gate | W_up is one
    [H, 2I] matrix `gate_up_proj`."""

    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs, fused: bool = False):
        self.fused = fused
        if fused:
            self.gate_up_proj = _linear(config.hidden_size, 2 * config.intermediate_size, dtype, param_dtype, rngs)
        else:
            self.gate_proj = _linear(config.hidden_size, config.intermediate_size, dtype, param_dtype, rngs)
            self.up_proj = _linear(config.hidden_size, config.intermediate_size, dtype, param_dtype, rngs)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, dtype, param_dtype, rngs)

    def __call__(self, x: Array) -> Array:
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):
    """Pre-norm attention block then pre-norm SwiGLU block, each with a residual."""

    def __init__(self, config: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs, fused: bool = False):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, fused=fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                param_dtype=param_dtype)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, fused=fused)

    def __call__(self, x: Array, positions: Array, attend) -> tuple[Array, Any]:
        """`attend(attention, h, positions) -> (out [B, T, heads, D], aux)` projects the normed input h with
        the layer's `Attention` block (`attention.project`, or its raw parts) and attends: over the chunk
        itself (the full-sequence forward) or over a KV cache (the engine, which returns the updated cache as
        aux)."""
        x, _, aux = self.step(x, self.input_layernorm(x), positions, attend, next_norm=None)
        return x, aux

    def step(self, x: Array, h: Array, positions: Array, attend, next_norm: RMSNorm | None
             ) -> tuple[Array, Array | None, Any]:
        """The layer given h = input_layernorm(x): returns (x', next_norm(x') or None, aux), so a caller that
        chains layers passes the next layer's input_layernorm (or the final norm) and each norm follows the
        residual add that makes its input (the engine's decode step: 3.10 -> 3.07 ms on an H100, 1.7B, 64 slots,
        docs/benchmarks.md session 18)."""
        out, aux = attend(self.self_attn, h, positions)
        x = x + self.self_attn.o_proj(out.reshape(x.shape[0], x.shape[1], -1))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, None if next_norm is None else next_norm(x), aux


# ------------------------------------------------------------------------------------------------ model


ATTENTION_IMPLS = ("xla", "cudnn")
CUDNN_SEQ_MULTIPLE = 64


def _self_attending_layer(layer: DecoderLayer, x: Array, positions: Array, mask: Array | None,
                          lengths: Array | None) -> Array:
    """One layer of the full-sequence forward: the chunk attends to itself causally. XLA: under `mask`
    [B, T, T]; cuDNN (fused flash attention): the first `lengths` [B] tokens of each row are real."""
    scale = layer.self_attn.config.head_dim ** -0.5
    if mask is not None:
        attend = lambda attn, h, pos: (jax.nn.dot_product_attention(*attn.project(h, pos), mask=mask[:, None],
                                                                    scale=scale), None)
    else:
        attend = lambda attn, h, pos: (jax.nn.dot_product_attention(
            *attn.project(h, pos), scale=scale, is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, implementation="cudnn"), None)
    return layer(x, positions, attend)[0]


class Qwen3(nnx.Module):
    """The Qwen3 causal LM. `dtype` is the compute dtype, `param_dtype` the storage dtype of the weights;
    fused_projections: each layer stores W_q | W_k | W_v and W_gate | W_up as one matrix each (the engine's
    copy, see `fuse_projections`; HF import / export and the sharding rules use the separate ones)."""

    def __init__(self, config: Qwen3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool = False, fused_projections: bool = False, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.fused_projections = fused_projections
        self.remat = remat  # recompute each layer's activations in the backward pass (full forward only)
        self.attention = "xla"  # full-forward attention: "xla" (any mask) or "cudnn" (GPU, right padding)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                             fused=fused_projections) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        _linear(config.hidden_size, config.vocab_size, dtype, param_dtype, rngs))

    # -- full-sequence forward (training, scoring) --

    def hidden_states(self, input_ids: Array, *, attention_mask: Array | None = None,
                      positions: Array | None = None) -> Array:
        """Final normed hidden states [B, T, H] of a full sequence.

        attention_mask: [B, T], 1 for real tokens, 0 for padding (keys that are 0 are never attended).
        positions: [B, T] rotary positions; default 0..T-1 (as HF when no position_ids are passed).
        With `self.attention == "cudnn"` (GPU, bf16 / fp16 compute) the rows must be right-padded: the
        mask only gives each row's length, and the outputs at padding positions are zero.
        """
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = lengths = None
        if self.attention == "cudnn":
            lengths = (jnp.full((b,), t, jnp.int32) if attention_mask is None
                       else jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
            pad = -t % CUDNN_SEQ_MULTIPLE  # its flash kernels take lengths in multiples of 64
            if pad:
                input_ids = jnp.pad(input_ids, ((0, 0), (0, pad)))
                positions = jnp.pad(positions, ((0, 0), (0, pad)))
        else:
            mask = jnp.tril(jnp.ones((t, t), bool))[None]
            if attention_mask is not None:
                mask = mask & attention_mask.astype(bool)[:, None, :]
            mask = jnp.broadcast_to(mask, (b, t, t))
        x = self.embed_tokens(input_ids)
        run = nnx.remat(_self_attending_layer) if self.remat else _self_attending_layer
        for layer in self.layers:
            x = run(layer, x, positions, mask, lengths)
        return self.norm(x[:, :t])

    def __call__(self, input_ids: Array, *, attention_mask: Array | None = None,
                 positions: Array | None = None) -> Array:
        """Logits [B, T, V] of a full sequence (for long sequences use `hidden_states` + core log-probs)."""
        return self.logits(self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions))

    # -- head --

    def lm_head_kernel(self) -> Array:
        """The LM-head matrix [H, V] (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: Array) -> Array:
        """hidden [..., H] -> logits [..., V] in the compute dtype."""
        return jnp.dot(hidden, self.lm_head_kernel().astype(hidden.dtype))


# ------------------------------------------------------------------------------------ fused projections


def fuse_projection_params(params: Mapping, config: Qwen3Config) -> dict:
    """Pure-dict weights of a `Qwen3` -> those of the same model with fused_projections=True: per layer the
    kernels of gate and up concatenated along their output axis (x [W_gate | W_up] = [x W_gate | x W_up]),
    and those of q, k and v interleaved per kv head h: [W_q of heads hG..hG+G-1 | W_k of h | W_v of h]
    for h = 0..K-1 (the layout `Attention.grouped_qkv` reads). The other weights are the same arrays."""
    kv, group, d = config.num_kv_heads, config.num_heads // config.num_kv_heads, config.head_dim
    layers = {}
    for i, layer in params["layers"].items():
        layer = dict(layer)
        attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
        q, k, v = (attn.pop(name)["kernel"] for name in ("q_proj", "k_proj", "v_proj"))
        hidden = q.shape[0]
        heads = [q.reshape(hidden, kv, group, d), k.reshape(hidden, kv, 1, d), v.reshape(hidden, kv, 1, d)]
        attn["qkv_proj"] = {"kernel": jnp.concatenate(heads, axis=2).reshape(hidden, -1)}
        mlp["gate_up_proj"] = {"kernel": jnp.concatenate([mlp.pop(name)["kernel"] for name in ("gate_proj",
                                                                                               "up_proj")], -1)}
        layers[i] = dict(layer, self_attn=attn, mlp=mlp)
    return dict(params, layers=layers)


def fuse_projections(model: Qwen3) -> Qwen3:
    """`model` with fused projections (a new module; only the q|k|v and gate|up kernels are new arrays).

    Why the engine decodes with it: with separate weights XLA:GPU merges each group into one GEMM by
    concatenating the weights inside the GEMM's fusion, which tiles worse once a decode step also carries
    appended tokens (H100, Qwen3-1.7B, 64 + 256 rows: a lane step 2.81 -> 2.39 ms more than a plain step;
    plain steps unchanged, 4.02 ms; docs/benchmarks.md, session 11)."""
    if model.fused_projections:
        raise ValueError("fuse_projections: the model's projections are already fused")
    param_dtype = model.embed_tokens.embedding.dtype
    abstract = nnx.eval_shape(lambda: Qwen3(model.config, dtype=model.dtype, param_dtype=param_dtype,
                                            remat=model.remat, fused_projections=True))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, fuse_projection_params(nnx.to_pure_dict(nnx.state(model)), model.config))
    fused = nnx.merge(graphdef, state)
    fused.attention = model.attention
    return fused


# --------------------------------------------------------------------------------------- HF checkpoints


def _hf_tensor_names(config: Qwen3Config) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (our parameter path, transposed?)."""
    names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
             "model.norm.weight": (("norm", "weight"), False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[hf + norm + ".weight"] = (ours + (norm, "weight"), False)
        for norm in ("q_norm", "k_norm"):
            names[hf + f"self_attn.{norm}.weight"] = (ours + ("self_attn", norm, "weight"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[hf + f"self_attn.{proj}.weight"] = (ours + ("self_attn", proj, "kernel"), True)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[hf + f"mlp.{proj}.weight"] = (ours + ("mlp", proj, "kernel"), True)
    return names


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None) -> Qwen3:
    """Reads a local HF Qwen3 directory (config.json + single or sharded safetensors) into a `Qwen3`.

    dtype: compute dtype; param_dtype: storage dtype of the weights (default: dtype). Every expected tensor
    must be present with the shape the config implies; errors name the file and tensor.
    """
    path = os.fspath(path)
    config = Qwen3Config.from_hf_dict(hf_checkpoint.read_config(path), os.path.join(path, "config.json"))
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(lambda: Qwen3(config, dtype=dtype, param_dtype=param_dtype))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    names = _hf_tensor_names(config)
    for name, array, source in hf_checkpoint.iter_tensors(path, expected=names):
        ours, transpose = names[name]
        target = _get_path(pure, ours)
        value = array.T if transpose else array
        if value.shape != target.shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {array.shape}; the config implies "
                             f"{target.shape[::-1] if transpose else target.shape}")
        parent = _get_path(pure, ours[:-1])
        parent[ours[-1]] = jnp.asarray(value, dtype=param_dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def save_pretrained(model: Qwen3, path: str | os.PathLike, *, dtype=None, overwrite: bool = False,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `model` as an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    dtype: the saved tensors' dtype (default: the parameters' dtype). The directory is written next to
    `path` and moved into place at the end, so a failure never leaves a half-written directory; an existing
    non-empty `path` is replaced only with overwrite=True.
    """
    config = model.config
    if model.fused_projections:
        raise ValueError("save_pretrained: this model stores fused q|k|v and gate|up weights (the engine's copy, "
                         "see fuse_projections); save the model they were fused from")
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for name, (ours, transpose) in _hf_tensor_names(config).items():
        value = np.asarray(jax.device_get(_get_path(pure, ours)))
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    dtype_name = jnp.dtype(next(iter(tensors.values())).dtype).name
    hf_checkpoint.write_directory(path, config.to_hf_dict(dtype=dtype_name), tensors,
                                  overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def count_params(config: Qwen3Config) -> int:
    """Number of parameters implied by `config` (tied head counted once)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 2 * c.head_dim
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = attn + mlp + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_layers * per_layer + c.hidden_size + head


def config_summary(config: Qwen3Config) -> str:
    """One line describing a config, for logs."""
    return (f"Qwen3(layers={config.num_layers}, hidden={config.hidden_size}, heads={config.num_heads}/"
            f"{config.num_kv_heads}x{config.head_dim}, vocab={config.vocab_size}, "
            f"params={count_params(config) / 1e9:.3f}B, tied={config.tie_word_embeddings})")


__all__ = ["Qwen3Config", "PRESETS", "preset", "Qwen3", "load_pretrained", "save_pretrained",
           "count_params", "config_summary", "rotary_embedding", "rotary_cos_sin", "fuse_projections",
           "fuse_projection_params"]
