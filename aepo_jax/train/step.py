"""The jitted train step: an RL update with a policy loss of the core registry, or SFT cross-entropy.

A batch is a dict of [N, T] arrays aligned with the token sequence (prompt + response, right-padded):
  tokens          int   the sequence
  attention_mask  {0,1} real tokens
  loss_mask       {0,1} tokens the policy sampled (RL) or must imitate (SFT); 0 on prompt, tool results, pad
  old_logprobs    f32   log pi_old(tokens[t] | tokens[<t]) (RL; the sampler's or recomputed)
  advantages      f32   [N] per trajectory or [N, T] per token (RL)
  ref_logprobs    f32   optional, for a KL penalty to a reference model
Position t predicts tokens[t] from tokens[<t], so every per-token quantity uses columns 1..T-1.

The step computes, per micro-batch, the final hidden states, then vocab-chunked log-probs and entropies
(core.logprobs: no [N, T, V] float32 logits), the AEPO entropy-aware advantage when enabled, the loss,
and gradients; micro-batch gradients are summed with weights that make the result equal to one pass over
the whole mini-batch (each micro-batch's share of the aggregation's normaliser). A non-finite loss or
gradient skips the update (params and optimiser state unchanged) and reports `skipped = 1`.
Sharding is GSPMD: params / optimiser state / batch carry NamedShardings, and global means are plain sums.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aepo_jax.core.advantages import entropy_aware_advantages
from aepo_jax.core.logprobs import token_logprobs_and_entropy
from aepo_jax.core.losses import POLICY_LOSSES

MODES = ("rl", "sft")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static settings of the loss (hashable: part of the compiled step)."""

    mode: str = "rl"
    policy_loss: str = "aepo"
    loss_kwargs: tuple[tuple[str, Any], ...] = ()  # hyper-parameters passed to the registry entry
    entropy_advantage_alpha: float = 0.2           # AEPO A_t = A (1 + alpha sg(z_t)); 0 turns it off
    temperature: float = 1.0
    vocab_chunk: int = 8192
    microbatches: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {list(MODES)}")
        if self.mode == "rl" and self.policy_loss not in POLICY_LOSSES:
            raise KeyError(f"unknown policy loss {self.policy_loss!r}; known: {sorted(POLICY_LOSSES)}")
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")

    @property
    def aggregation(self) -> str:
        if self.mode == "sft":
            return "token-mean"
        return dict(self.loss_kwargs).get("aggregation",
                                          POLICY_LOSSES[self.policy_loss].keywords.get("aggregation",
                                                                                       "token-mean"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any      # nnx.State of the model's Params (float32 master weights)
    opt_state: Any
    step: jax.Array  # optimiser steps taken


def make_optimizer(learning_rate: float, *, weight_decay: float = 0.01, grad_clip: float = 1.0,
                   warmup_steps: int = 0, decay_steps: int = 0) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101) after global-norm clipping.

    Schedule: linear warm-up over `warmup_steps`, then constant, or cosine decay to 0 over `decay_steps`
    when that is > 0 (the AEPO paper uses a constant 1e-6).
    """
    if decay_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                      warmup_steps + decay_steps)
    elif warmup_steps > 0:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                         optax.constant_schedule(learning_rate)], [warmup_steps])
    else:
        schedule = optax.constant_schedule(learning_rate)
    return optax.chain(optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
                       optax.adamw(schedule, weight_decay=weight_decay))


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation):
    """(graphdef, TrainState) of `model` (its Params become the trained state)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(params=params, opt_state=optimizer.init(params),
                                step=jnp.zeros((), jnp.int32))


def sequence_logprobs(graphdef, params, batch, *, temperature: float, vocab_chunk: int):
    """log pi(tokens[t] | tokens[<t]) and the full-vocabulary entropy at t, for t = 1..T-1 ([N, T-1])."""
    model = nnx.merge(graphdef, params)
    tokens = batch["tokens"]
    hidden = model.hidden_states(tokens[:, :-1], attention_mask=batch["attention_mask"][:, :-1])
    # The LM head runs in the compute dtype, as in `model.logits` (bf16 compute: bf16 matmul operands with
    # float32 accumulation; float32 master weights would otherwise make it a float32 / TF32 matmul).
    return token_logprobs_and_entropy(hidden, model.lm_head_kernel().astype(hidden.dtype), tokens[:, 1:],
                                      temperature=temperature, chunk_size=vocab_chunk)


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def loss_and_metrics(params, graphdef, batch, config: LossConfig):
    """(loss, metrics) of one (micro-)batch."""
    logprobs, entropy = sequence_logprobs(graphdef, params, batch, temperature=config.temperature,
                                          vocab_chunk=config.vocab_chunk)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    metrics = {"entropy": _masked_mean(jax.lax.stop_gradient(entropy), mask)}
    if config.mode == "sft":
        loss = -_masked_mean(logprobs, mask)
        return loss, dict(metrics, nll=loss)
    old = batch["old_logprobs"][:, 1:]
    advantages = batch["advantages"]
    if advantages.ndim == 2:
        advantages = advantages[:, 1:]
    if config.entropy_advantage_alpha:
        advantages = entropy_aware_advantages(advantages, jax.lax.stop_gradient(entropy), mask,
                                              alpha=config.entropy_advantage_alpha)
    ref = batch.get("ref_logprobs")
    loss, loss_metrics = POLICY_LOSSES[config.policy_loss](
        logprobs=logprobs, old_logprobs=old, advantages=advantages, loss_mask=mask, entropies=entropy,
        ref_logprobs=None if ref is None else ref[:, 1:], **dict(config.loss_kwargs))
    gap = _masked_mean(jnp.abs(jax.lax.stop_gradient(logprobs) - old), mask)
    return loss, dict(metrics, **loss_metrics, logprob_gap=gap)


def _micro_share(mask, total_mask, aggregation):
    """This micro-batch's share of the aggregation's normaliser (1 for a constant normaliser)."""
    if aggregation == "token-mean":
        return jnp.sum(mask) / jnp.maximum(jnp.sum(total_mask), 1.0)
    if aggregation.startswith("seq-mean"):
        rows = lambda m: jnp.sum(jnp.any(m > 0, axis=-1))
        return rows(mask) / jnp.maximum(rows(total_mask), 1.0)
    return jnp.asarray(1.0)


def train_step(graphdef, optimizer: optax.GradientTransformation, config: LossConfig, state: TrainState,
               batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on `batch` (split into config.microbatches for gradient accumulation)."""
    m = config.microbatches
    n = batch["tokens"].shape[0]
    if n % m:
        raise ValueError(f"batch of {n} sequences is not divisible into {m} micro-batches")
    total_mask = batch["loss_mask"][:, 1:]

    def micro_step(mb):
        """(share-weighted gradients, share-weighted metrics) of one micro-batch. The share scales the
        loss before differentiation, so the weighting costs no pass over the gradients."""
        share = _micro_share(mb["loss_mask"][:, 1:], total_mask, config.aggregation)

        def weighted(params):
            loss, metrics = loss_and_metrics(params, graphdef, mb, config)
            return share * loss, dict(metrics, loss=loss)

        (_, metrics), grads = jax.value_and_grad(weighted, has_aux=True)(state.params)
        return grads, jax.tree.map(lambda v: share * v, metrics)

    if m == 1:
        grads, metrics = micro_step(batch)
    else:
        micro = jax.tree.map(lambda x: x.reshape(m, n // m, *x.shape[1:]), batch)

        def accumulate(carry, mb):
            grads, metrics = micro_step(mb)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        shapes = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                           step=state.step + finite.astype(jnp.int32))
    return new_state, dict(metrics, grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))


def jit_train_step(graphdef, optimizer, config: LossConfig, state_shardings=None, batch_sharding=None):
    """`train_step` compiled with the state donated (and sharded by the given shardings, if any)."""
    def step(state, batch):
        return train_step(graphdef, optimizer, config, state, batch)
    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None))
