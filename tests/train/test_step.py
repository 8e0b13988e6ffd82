"""The train step: matches the dense reference, accumulates exactly, shards exactly, skips non-finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from aepo_jax.models import qwen3, sharding
from aepo_jax.train import step as train_lib

CONFIG = qwen3.Qwen3Config(vocab_size=131, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16)


def _batch(n=8, t=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, t + 1, size=n)
    attention = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = attention * (np.arange(t)[None] >= 3)  # 3 prompt tokens
    return {"tokens": jnp.asarray(rng.integers(0, CONFIG.vocab_size, (n, t)), jnp.int32),
            "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask, jnp.float32),
            "old_logprobs": jnp.asarray(-4.9 + 0.3 * rng.normal(size=(n, t)), jnp.float32),
            "advantages": jnp.asarray(rng.normal(size=(n,)), jnp.float32)}


def _state(optimizer, seed=0):
    """A random model with a realistic logit spread: per-token entropies vary (std ~ 0.3 nats), so the
    AEPO entropy z-score is well conditioned (near-uniform logits would make it amplify rounding)."""
    model = qwen3.Qwen3(CONFIG, rngs=nnx.Rngs(seed))
    model.embed_tokens.embedding[...] *= 20.0
    model.lm_head.kernel[...] *= 20.0
    return train_lib.init_train_state(model, optimizer)


def test_sequence_logprobs_equal_dense_log_softmax():
    graphdef, state = _state(train_lib.make_optimizer(1e-3))
    batch = _batch()
    logprobs, entropy = train_lib.sequence_logprobs(graphdef, state.params, batch, temperature=0.7,
                                                    vocab_chunk=32)
    model = nnx.merge(graphdef, state.params)
    logits = np.asarray(model(batch["tokens"][:, :-1], attention_mask=batch["attention_mask"][:, :-1]),
                        np.float64) / 0.7
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp, np.asarray(batch["tokens"][:, 1:])[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs, want, atol=2e-5)
    np.testing.assert_allclose(entropy, -(np.exp(logp) * logp).sum(-1), atol=2e-5)


@pytest.mark.parametrize("loss", ["aepo", "grpo", "gspo"])
def test_microbatch_accumulation_equals_one_pass(loss):
    import optax
    optimizer = optax.sgd(1.0)  # the parameter change is the gradient itself
    batch = _batch()
    results = []
    for m in (1, 4):
        # entropy-aware advantages use per-micro-batch statistics, so compare with them off
        config = train_lib.LossConfig(policy_loss=loss, microbatches=m, entropy_advantage_alpha=0.0)
        graphdef, state = _state(optimizer)
        new_state, metrics = train_lib.jit_train_step(graphdef, optimizer, config)(state, batch)
        results.append((new_state, metrics))
    (a, ma), (b, mb) = results
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


def test_sharded_step_equals_single_device_step():
    # SGD(1): the parameter change is the gradient itself. (Adam's first step, g / (|g| + eps), turns float32
    # reassociation in a near-zero gradient into a 1e-6 parameter difference on some CPUs.)
    import optax
    optimizer = optax.sgd(1.0)
    config = train_lib.LossConfig(policy_loss="aepo")
    batch = _batch()
    graphdef, state = _state(optimizer)
    single, single_metrics = train_lib.jit_train_step(graphdef, optimizer, config)(state, batch)

    mesh = sharding.make_mesh(data=2, fsdp=2, tp=2)
    graphdef, state = _state(optimizer)
    specs = sharding.partition_specs(state, mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    state = jax.device_put(state, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    step = train_lib.jit_train_step(graphdef, optimizer, config, shardings, batch_sharding)
    sharded, sharded_metrics = step(state, jax.device_put(batch, batch_sharding))
    q = sharded.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")
    np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_sft_learns_a_fixed_batch():
    optimizer = train_lib.make_optimizer(3e-3)
    graphdef, state = _state(optimizer)
    step = train_lib.jit_train_step(graphdef, optimizer, train_lib.LossConfig(mode="sft"))
    batch = _batch()
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 30


def test_non_finite_loss_skips_the_update():
    optimizer = train_lib.make_optimizer(1e-3)
    graphdef, state = _state(optimizer)
    params = jax.tree.map(lambda x: x, state.params)
    params["norm"]["weight"][...] = state.params["norm"]["weight"][...].at[0].set(jnp.nan)
    state = train_lib.TrainState(params=params, opt_state=state.opt_state, step=state.step)
    before = jax.tree.map(np.asarray, state)
    new_state, metrics = train_lib.jit_train_step(graphdef, optimizer, train_lib.LossConfig())(state, _batch())
    assert float(metrics["skipped"]) == 1.0 and int(new_state.step) == 0
    for x, y in zip(jax.tree.leaves(new_state), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_bad_config_is_named():
    with pytest.raises(KeyError, match="unknown policy loss 'ppo2'; known: .*aepo"):
        train_lib.LossConfig(policy_loss="ppo2")
    with pytest.raises(ValueError, match="unknown mode"):
        train_lib.LossConfig(mode="dpo")
    optimizer = train_lib.make_optimizer(1e-3)
    graphdef, state = _state(optimizer)
    with pytest.raises(ValueError, match="not divisible into 3 micro-batches"):
        train_lib.jit_train_step(graphdef, optimizer, train_lib.LossConfig(microbatches=3))(state, _batch())


@pytest.mark.parametrize("loss", ["aepo", "grpo", "gspo", "cispo"])
def test_rl_step_moves_each_sequence_with_its_advantage(loss):
    """One RL step raises the log-likelihood of positive-advantage sequences and lowers negative ones."""
    import optax
    optimizer = optax.sgd(0.05)
    graphdef, state = _state(optimizer)
    batch = _batch()
    logprob = lambda params: train_lib.sequence_logprobs(graphdef, params, batch, temperature=1.0,
                                                         vocab_chunk=64)[0]
    before = logprob(state.params)
    batch["old_logprobs"] = jnp.concatenate([jnp.zeros_like(before[:, :1]), before], axis=1)  # on-policy
    config = train_lib.LossConfig(policy_loss=loss, entropy_advantage_alpha=0.0)
    new_state, _ = train_lib.jit_train_step(graphdef, optimizer, config)(state, batch)
    mask = np.asarray(batch["loss_mask"][:, 1:])
    change = (np.asarray(logprob(new_state.params) - before) * mask).sum(-1)  # per-sequence delta log p
    adv = np.asarray(batch["advantages"])
    strong = np.abs(adv) > 0.5
    assert (np.sign(change[strong]) == np.sign(adv[strong])).all(), (change, adv)
    assert np.corrcoef(change, adv)[0, 1] > 0.8
