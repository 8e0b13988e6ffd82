"""aepo_jax.engine: the slot-based sampler (KV cache kept across tool calls, jitted prefill / decode / fork).

  engine = Engine(model, num_slots=64, max_len=8192, eos_ids=[151645, 151643],
                  stop_strings=["</search>", "</python>"], tokenizer=tok)
  engine.prefill([0, 1], [prompt_a, prompt_b], sampling=SamplingParams(temperature=1.0))
  res = engine.decode(256, wait_fraction=0.25)     # returns when a quarter of the running slots stopped
  for s in res.stopped_slots(): res.new_tokens(s), res.new_logprobs(s), res.finish_reason(s)
  engine.prefill([0], [tool_result_tokens])        # append into the same cache, then decode again
  engine.fork(0, 5)                                # AEPO branch: copy slot 0 into free slot 5
  engine.generate(prompts, max_new_tokens=128)     # plain batched completion

On GPU the default decode attention is cuDNN's fused attention over a [slots, max_len, kv_heads, head_dim]
cache (only each slot's valid prefix is read); elsewhere an einsum attention over a head-major cache.
Modules: engine (Engine, state, compiled prefill / decode / fork / release), forward (the model over the
slot cache), sampling (temperature / top-k / top-p, log-prob and entropy), stops (stop strings on token
ids), packing (a call's per-row fields as one int32 array), hlo (checks that the decode loop never copies
the cache).
"""

from aepo_jax.engine.engine import (EOS, LENGTH, REASONS, RUNNING, STOP, DecodeOutput, DecodeResult, Engine,
                                    EngineState, Generation, default_buckets)
from aepo_jax.engine.sampling import SamplingParams
from aepo_jax.engine.stops import StopTable

__all__ = ["Engine", "EngineState", "DecodeOutput", "DecodeResult", "Generation", "SamplingParams",
           "StopTable", "default_buckets", "RUNNING", "EOS", "STOP", "LENGTH", "REASONS"]
