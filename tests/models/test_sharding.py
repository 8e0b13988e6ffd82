"""Qwen3 sharded over 8 fake CPU devices gives the unsharded logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from aepo_jax.models import qwen3, sharding


def _model():
    # Divisible by 2 and 4 on every sharded dim except the odd vocab (exercises the replicate fallback).
    config = qwen3.Qwen3Config(vocab_size=131, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=8, num_kv_heads=4, head_dim=16)
    return qwen3.Qwen3(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("data,fsdp,tp", [(1, 8, 1), (1, 4, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_logits_equal_unsharded(data, fsdp, tp):
    assert jax.device_count() == 8
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 131, size=(8, 12)))
    forward = jax.jit(lambda m, x: m(x))
    ref = np.asarray(forward(_model(), ids))
    mesh = sharding.make_mesh(data, fsdp, tp)
    model = sharding.shard_model(_model(), mesh)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == sharding._fit(P("fsdp", "tp"), q.shape, mesh)
    assert len({s.device for s in q.addressable_shards}) == 8
    out = forward(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_partition_specs_follow_rules_and_replicate_indivisible_dims():
    mesh = sharding.make_mesh(1, 4, 2)
    specs = sharding.partition_specs(nnx.to_pure_dict(nnx.state(_model())), mesh)
    layer = specs["layers"][0]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tp")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tp", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"] == P("tp", "fsdp")
    assert layer["input_layernorm"]["weight"] == P(None)
    assert specs["embed_tokens"]["embedding"] == P(None, "fsdp")  # vocab 131 is not divisible by tp=2
    assert specs["lm_head"]["kernel"] == P("fsdp", None)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs 6 devices, have 8"):
        sharding.make_mesh(1, 3, 2)
    with pytest.raises(ValueError, match="at most one mesh axis"):
        sharding.make_mesh(-1, -1, 1)
    assert sharding.make_mesh(2, -1, 2).shape == {"data": 2, "fsdp": 2, "tp": 2}


def test_optimizer_moments_follow_their_parameters():
    import optax
    mesh = sharding.make_mesh(1, 4, 2)
    params = nnx.state(_model(), nnx.Param)
    specs = sharding.partition_specs(optax.adamw(1e-3).init(params), mesh)
    mu = specs[0].mu
    assert mu["layers"][1]["self_attn"]["q_proj"]["kernel"].get_value() == P("fsdp", "tp")
    assert mu["layers"][1]["mlp"]["down_proj"]["kernel"].get_value() == P("tp", "fsdp")
    assert specs[0].count == P()
