"""Qwen3 port vs transformers' Qwen3ForCausalLM on tiny random checkpoints (float32, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aepo_jax.models import qwen3
from tests.reference import hf_logits, write_hf_qwen3

CONFIGS = {
    "untied_gqa2": dict(),
    "tied_mha": dict(tie_word_embeddings=True, num_key_value_heads=4),           # GQA ratio 1
    "gqa4_headdim": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),  # 8*8 != 48
    "odd_vocab_theta": dict(vocab_size=131, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def _assert_logits_close(ours, ref, valid=None):
    ours = np.asarray(ours, np.float64)
    if valid is not None:
        ours, ref = ours[valid], ref[valid]
    scale = np.abs(ref).max()
    assert scale > 1.0, "reference logits too small for a meaningful comparison"
    err = np.abs(ours - ref).max()
    assert err <= 1e-4 * scale, f"max abs diff {err:.3g} > 1e-4 * logit scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(tmp_path, name, padding):
    hf = write_hf_qwen3(tmp_path, seed=len(name), **CONFIGS[name])
    model = qwen3.load_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf.config.vocab_size, size=(3, 11))
    mask = np.ones_like(ids)
    if padding == "left":
        mask[0, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[1, 7:] = 0
        mask[2, 9:] = 0
    ref = hf_logits(hf, ids, mask)
    ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    _assert_logits_close(ours, ref, valid=mask.astype(bool))


def test_fused_projections_are_the_same_model(tmp_path):
    """The engine's copy of the weights (per layer q|k|v and gate|up each one kernel) computes transformers'
    logits too; it refuses to be saved as an HF checkpoint or fused twice."""
    hf = write_hf_qwen3(tmp_path, seed=3, **CONFIGS["gqa4_headdim"])  # q, k, v widths 64, 16, 16
    model = qwen3.load_pretrained(tmp_path)
    fused = qwen3.fuse_projections(model)
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(2, 9))
    _assert_logits_close(fused(jnp.asarray(ids)), hf_logits(hf, ids, np.ones_like(ids)))
    attn, mlp = fused.layers[1].self_attn, fused.layers[1].mlp
    assert attn.qkv_proj.kernel.shape == (48, 64 + 16 + 16) and mlp.gate_up_proj.kernel.shape == (48, 2 * 80)
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    with pytest.raises(ValueError, match="already fused"):
        qwen3.fuse_projections(fused)
    with pytest.raises(ValueError, match="fused q|k|v"):
        qwen3.save_pretrained(fused, tmp_path / "out")


def test_config_round_trip_and_presets(tmp_path):
    hf = write_hf_qwen3(tmp_path, tie_word_embeddings=True)
    config = qwen3.Qwen3Config.from_hf_dict(hf.config.to_dict())
    assert config.head_dim == 16 and config.num_kv_heads == 2 and config.tie_word_embeddings
    assert qwen3.Qwen3Config.from_hf_dict(config.to_hf_dict()) == config
    # Preset sizes match the released models' parameter counts (Qwen3 model cards).
    expected_billions = {"0.6b": 0.60, "1.7b": 1.72, "4b": 4.02, "8b": 8.19, "14b": 14.77, "32b": 32.76}
    for name, billions in expected_billions.items():
        assert abs(qwen3.count_params(qwen3.preset(name)) / 1e9 - billions) < 0.02, name
    n_ours = sum(x.size for x in jax.tree.leaves(nnx_params(qwen3.Qwen3(config))))
    assert n_ours == qwen3.count_params(config) == sum(p.numel() for p in hf.parameters())


def nnx_params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)


def _greedy_full_forward(model, prompts, steps):
    """Greedy decoding by re-running the whole sequence each step: no cache at all.

    The sequence lives in a fixed [B, width + steps] buffer (left-padded prompt, future slots masked out),
    so one compiled forward serves every step.
    """
    width = max(map(len, prompts))
    total = width + steps
    ids = np.zeros((len(prompts), total), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):width] = p
        mask[row, width - len(p):width] = 1
    forward = jax.jit(lambda m, i, a, pos: m(i, attention_mask=a, positions=pos))
    for step in range(steps):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits = forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
        ids[:, width + step] = np.asarray(jnp.argmax(logits[:, width + step - 1], axis=-1))
        mask[:, width + step] = 1
    return ids[:, width:]


def _greedy_cached(model, prompts, steps):
    """Greedy decoding through the sampling engine's KV cache (one prefill, then one token per step)."""
    from aepo_jax.engine import Engine, SamplingParams
    engine = Engine(model, num_slots=len(prompts), max_len=64, cache_dtype=jnp.float32)
    out = engine.generate(prompts, max_new_tokens=steps, sampling=SamplingParams(temperature=0.0),
                          ignore_eos=True)
    return np.array([g.tokens for g in out])


def test_greedy_generation_matches_transformers_generate(tmp_path):
    hf = write_hf_qwen3(tmp_path, seed=3)
    model = qwen3.load_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, hf.config.vocab_size, size=n).tolist() for n in (5, 9, 7)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, pad_token_id=0)[:, width:].numpy()
    np.testing.assert_array_equal(_greedy_full_forward(model, prompts, 32), ref)
    np.testing.assert_array_equal(_greedy_cached(model, prompts, 32), ref)


def test_bf16_stays_close_to_float32(tmp_path):
    hf = write_hf_qwen3(tmp_path, seed=5)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, hf.config.vocab_size, size=(2, 16)))
    ref = np.asarray(qwen3.load_pretrained(tmp_path)(ids), np.float64)
    bf16 = qwen3.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert bf16.embed_tokens.embedding[...].dtype == jnp.bfloat16
    out = bf16(ids)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float64)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 2e-2, rel
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_save_then_transformers_load_gives_identical_logits(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    hf = write_hf_qwen3(src, seed=7)
    model = qwen3.load_pretrained(src)
    qwen3.save_pretrained(model, dst)
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst), local_files_only=True).eval()
    ids = np.random.default_rng(3).integers(0, 97, size=(2, 10))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    for name in os.listdir(dst):
        assert os.stat(dst / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_load_sharded_safetensors_and_save_sharded(tmp_path):
    hf = write_hf_qwen3(tmp_path / "hf", seed=9, max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = qwen3.load_pretrained(tmp_path / "hf")
    ids = np.random.default_rng(4).integers(0, 97, size=(2, 8))
    _assert_logits_close(model(jnp.asarray(ids)), hf_logits(hf, ids))
    qwen3.save_pretrained(model, tmp_path / "ours", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = qwen3.load_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(again(jnp.asarray(ids)), model(jnp.asarray(ids)))


# ------------------------------------------------------------------------------------------ bad input


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen3.load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen3.load_pretrained(tmp_path)
    write_hf_qwen3(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        qwen3.load_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    write_hf_qwen3(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight'"):
        qwen3.load_pretrained(tmp_path)


@pytest.mark.parametrize("key,value,match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("num_experts", 8, "num_experts"),
    ("model_type", "qwen3_moe", "model_type"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_parameters"),
])
def test_unsupported_config_fields_are_named(tmp_path, key, value, match):
    write_hf_qwen3(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: unsupported {match}"):
        qwen3.load_pretrained(tmp_path)


def test_unexpected_tensor_is_reported(tmp_path):
    from safetensors.numpy import load_file, save_file
    write_hf_qwen3(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.experts.0.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensors.*experts"):
        qwen3.load_pretrained(tmp_path)


def test_save_never_leaves_a_half_written_directory(tmp_path, monkeypatch):
    model = qwen3.Qwen3(qwen3.preset("tiny"))
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        qwen3.save_pretrained(model, target)
    assert os.listdir(target) == ["mine.txt"]

    from aepo_jax.models import hf_checkpoint
    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hf_checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        qwen3.save_pretrained(model, target, overwrite=True)
    assert os.listdir(target) == ["mine.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left behind
    monkeypatch.undo()
    qwen3.save_pretrained(model, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]


def test_unknown_attention_implementation_is_named():
    model = qwen3.Qwen3(qwen3.preset("tiny"))
    model.attention = "flash"
    with pytest.raises(ValueError, match="attention must be one of .*'flash'"):
        model.hidden_states(jnp.zeros((1, 4), jnp.int32))


@pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                    reason="cuDNN attention needs a GPU; tools/gpu_benchmarks.sh runs this on the device machine")
def test_cudnn_attention_matches_xla_on_right_padded_rows():
    """The fused cuDNN path (is_causal + per-row lengths) equals the masked XLA path, values and gradients."""
    config = qwen3.Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=64)
    model = qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 127)), jnp.int32)  # not a multiple of 64
    mask = np.ones((3, 127), np.int32)
    mask[1, 100:] = 0
    mask[2, 37:] = 0
    from flax import nnx
    graphdef, params = nnx.split(model)

    def loss(params, impl):
        m = nnx.merge(graphdef, params)
        m.attention = impl
        h = m.hidden_states(ids, attention_mask=jnp.asarray(mask)).astype(jnp.float32)
        return jnp.sum(h * jnp.asarray(mask)[..., None] * jnp.cos(jnp.arange(256.0))), h

    (lx, hx), gx = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    (lc, hc), gc = jax.value_and_grad(loss, has_aux=True)(params, "cudnn")
    valid = mask.astype(bool)
    scale = float(jnp.abs(hx[valid]).max())
    assert float(jnp.abs(hx - hc)[valid].max()) <= 0.03 * scale
    for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gc)):
        assert float(jnp.abs(a - b).max()) <= 0.03 * float(jnp.abs(a).max()) + 1e-6
