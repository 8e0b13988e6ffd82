"""aepo_jax: Agentic Entropy-Balanced Policy Optimization for tool-using Qwen3 agents, in pure JAX.

Packages, with dependencies pointing one way (core <- models <- engine <- agent <- train):
  core    pure array functions: log-probs / entropy, advantages, policy losses, rollout arithmetic.
  models  the Flax NNX Qwen3, Hugging Face checkpoint import / export, partition rules.
  engine  the slot-based sampler (KV cache kept across tool calls).
  agent   tools, tool-call parsing, rollout schedulers (GRPO / ARPO / AEPO).
  data    datasets, tokenizers, rewards.
  train   the trainer (`python -m aepo_jax.train`).
"""

__version__ = "0.1.0"
