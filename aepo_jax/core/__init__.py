"""aepo_jax.core: pure functions on arrays (no Flax modules, no I/O), safe under jit / shard_map / pmap.

  logprobs      per-token log-prob of the target and full-vocabulary entropy, vocab-chunked
  advantages    GRPO, Dr. GRPO, RLOO, REINFORCE++, AEPO entropy-aware, ARPO hard attribution, DAPO helpers
  losses        POLICY_LOSSES: grpo, dapo, gspo, cispo, gppo, arpo, aepo; aggregation modes
  kl            k1 / k2 / k3 estimators of KL(pi || pi_ref)
  rollout_math  AEPO budget split, branch probability, segment entropy (NumPy or jnp)
  reductions    masked / global (psum) statistics and per-sequence sums
  checks        input validation
"""
from aepo_jax.core import advantages, checks, kl, logprobs, losses, reductions, rollout_math

__all__ = ["advantages", "checks", "kl", "logprobs", "losses", "reductions", "rollout_math"]
