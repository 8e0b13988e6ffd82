"""The sampling engine on a tiny random HF Qwen3 (float32 model and cache unless stated; CPU).

One module-scoped engine serves most tests (few compilations); every test frees its slots at the end.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aepo_jax.engine import Engine, SamplingParams, hlo
from aepo_jax.models import qwen3
from tests.reference import write_hf_qwen3

NUM_SLOTS, MAX_LEN, WIDTH = 6, 64, 64  # WIDTH: the padded length of the reference full forward
PROBE = [11, 42, 7, 93, 5, 60, 21]


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations (jax.monitoring's compile-duration event, jax 0.10 and 0.11)."""
    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class Reference:
    """Uncached full forward of the same model: every sequence right-padded to WIDTH, one compilation."""

    def __init__(self, model):
        self.model = model
        self._logits = jax.jit(lambda m, ids, mask: m(ids, attention_mask=mask))

    def logits(self, seq) -> np.ndarray:
        """Float64 logits [len(seq), V] of one sequence."""
        ids = np.zeros((1, WIDTH), np.int32)
        mask = np.zeros((1, WIDTH), np.int32)
        ids[0, :len(seq)] = seq
        mask[0, :len(seq)] = 1
        return np.asarray(self._logits(self.model, ids, mask), np.float64)[0, :len(seq)]

    def greedy(self, prompt, steps) -> list[int]:
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(np.argmax(self.logits(seq)[-1])))
        return seq[len(prompt):]


def _first_new_at(seq, start):
    """Smallest i >= start such that seq[i] does not occur in seq[:i]."""
    return next(i for i in range(start, len(seq)) if seq[i] not in seq[:i])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf = write_hf_qwen3(path, seed=3)
    model = qwen3.load_pretrained(path)
    ref = Reference(model)
    probe = ref.greedy(PROBE, 16)
    # EOS = a token the probe's greedy continuation first produces at step >= 8; a two-token stop string
    # = the continuation's tokens 3..4 (first produced there).
    eos_at = _first_new_at(probe, 8)
    stop_at = _first_new_at(probe, 4)
    stop = probe[stop_at - 1:stop_at + 1]
    engine = Engine(model, num_slots=NUM_SLOTS, max_len=MAX_LEN, cache_dtype=jnp.float32,
                    eos_ids=[probe[eos_at]], prefill_buckets=(8, 32),
                    stop_strings={"</search>": [stop, [96, 95, 94]], "</python>": [[1, 2, 3, 4]]})
    return dict(hf=hf, model=model, ref=ref, engine=engine, probe=probe, eos_at=eos_at, stop_at=stop_at)


@pytest.fixture
def env(setup):
    yield setup
    engine = setup["engine"]
    engine.release([s for s in range(NUM_SLOTS) if engine.occupied[s]])


def _prompts(seed, lengths, vocab=97):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


# ------------------------------------------------------------------------------------------- greedy


def test_greedy_matches_uncached_forward_and_transformers_generate(env):
    engine, ref, hf = env["engine"], env["ref"], env["hf"]
    prompts = _prompts(0, (5, 9, 7))
    steps = 24
    out = engine.generate(prompts, max_new_tokens=steps, sampling=SamplingParams.greedy(), ignore_eos=True)
    assert [g.finish_reason for g in out] == ["length"] * 3
    for p, g in zip(prompts, out):
        assert len(g.tokens) == steps
        logits = ref.logits(p + g.tokens)
        # every step is the argmax of the uncached full forward over the sequence so far
        np.testing.assert_array_equal(np.argmax(logits[len(p) - 1:-1], axis=-1), g.tokens)
        # recorded log-probs / entropies (T = 1 for greedy) are those of the full forward
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        np.testing.assert_allclose(g.logprobs, logp[np.arange(len(p) - 1, len(p) + steps - 1), g.tokens],
                                   atol=2e-4)
        ent = -(np.exp(logp) * logp).sum(-1)[len(p) - 1:-1]
        np.testing.assert_allclose(g.entropies, ent, atol=2e-4)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False, pad_token_id=0)[:, width:].numpy()
    np.testing.assert_array_equal(np.array([g.tokens for g in out]), expected)


# ----------------------------------------------------------------------------------------- sampling


def _dense(logits, temperature):
    z = logits / temperature
    logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    return logp, -(np.exp(logp) * logp).sum(-1)


def test_sampled_logprobs_and_entropies_match_training_forward(env):
    engine, ref, model = env["engine"], env["ref"], env["model"]
    prompts = _prompts(1, (6, 8))
    temps = [0.7, 1.3]
    out = engine.generate(prompts, max_new_tokens=20, ignore_eos=True, seed=[5, 6],
                          sampling=[SamplingParams(temperature=t) for t in temps])
    for p, g, t in zip(prompts, out, temps):
        pos = np.arange(len(p) - 1, len(p) + len(g.tokens) - 1)
        logp, ent = _dense(ref.logits(p + g.tokens)[pos], t)
        np.testing.assert_allclose(g.logprobs, logp[np.arange(len(pos)), g.tokens], atol=2e-4)
        np.testing.assert_allclose(g.entropies, ent, atol=2e-4)
        assert len(set(g.tokens)) > 3  # really sampled
    # The trainer's vocab-chunked function gives the same numbers (when the core module is present).
    try:
        from aepo_jax.core.logprobs import token_logprobs_and_entropy
    except ImportError:
        return
    p, g, t = prompts[0], out[0], temps[0]
    seq = jnp.asarray([p + g.tokens])
    hidden = model.hidden_states(seq)[:, len(p) - 1:-1]
    core_logp, core_ent = token_logprobs_and_entropy(hidden, model.lm_head_kernel(), jnp.asarray([g.tokens]),
                                                     temperature=t, chunk_size=32)
    np.testing.assert_allclose(g.logprobs, np.asarray(core_logp)[0], atol=2e-4)
    np.testing.assert_allclose(g.entropies, np.asarray(core_ent)[0], atol=2e-4)


def test_bf16_engine_stays_close_to_the_float32_forward(env, tmp_path):
    write_hf_qwen3(tmp_path, seed=3)  # the module's checkpoint again
    bf16 = qwen3.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    engine = Engine(bf16, num_slots=2, max_len=32, prefill_buckets=(8,))
    prompt = _prompts(2, (7,))[0]
    g = engine.generate([prompt], max_new_tokens=12, sampling=SamplingParams(temperature=1.0), ignore_eos=True,
                        seed=3)[0]
    logp, ent = _dense(env["ref"].logits(prompt + g.tokens)[len(prompt) - 1:-1], 1.0)
    np.testing.assert_allclose(g.logprobs, logp[np.arange(12), g.tokens], atol=0.15)
    np.testing.assert_allclose(g.entropies, ent, atol=0.1)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu",
                    reason="cuDNN attention needs a GPU; tools/gpu_benchmarks.sh runs this on the device machine")
@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_gpu_attention_engine_matches_the_xla_engine(impl):
    """attention="cudnn" (decode: per-slot key lengths) and "pallas" (decode: the Pallas kernel, which writes the
    step's keys / values itself), both with appended chunks attending by cuDNN (the slot's prefix read as cache
    pages, merged with the chunk's causal self-attention), against the einsum attention on the same bf16 model
    and cache layout: prompts, an appended chunk, then decode in which slot 0 stops after 2 tokens and idles (it
    reads one key / none), then a chunk appended to slot 0 and decode again, then chunks appended inside a decode
    call (its lane). max_len 120 is not a whole number of pages: the GPU engines' cache is longer."""
    from flax import nnx

    config = qwen3.Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=256)
    model = qwen3.Qwen3(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    prompts, chunks = _prompts(5, (9, 40, 23), vocab=256), _prompts(6, (5, 30), vocab=256)
    seen = {}
    for name in ("xla", impl):
        engine = Engine(model, num_slots=4, max_len=120, attention=name, layout="bshd", prefill_buckets=(16, 64))
        assert engine.cache_buffer_shape()[1] == (120 if name == "xla" else 128)
        engine.prefill([0, 1, 2], prompts, sampling=SamplingParams.greedy(), ignore_eos=True,
                       max_length=[9 + 5 + 2, 120, 120])
        after_prompt = np.asarray(engine.state.hidden, np.float32)
        engine.prefill([0, 2], chunks)  # appended at positions 9 and 23: queries start mid-sequence
        after_chunk = np.asarray(engine.state.hidden, np.float32)
        res = engine.decode(6, wait_fraction=1.0).fetch()
        assert list(res.counts[:3]) == [2, 6, 6]
        engine.prefill([0], [chunks[1][:7]], max_length=[120])
        res2 = engine.decode(4, wait_fraction=1.0).fetch()
        res3 = engine.decode(4, wait_fraction=1.0, appends={1: chunks[1], 2: chunks[0]}).fetch()
        assert list(res3.counts[1:3]) == [3, 3]  # the first of the 4 steps absorbs the chunks
        cache = [np.asarray(engine.state.keys[0][s, :n], np.float32) for s, n in enumerate(res3.lengths[:3])]
        seen[name] = (after_prompt[:3], after_chunk[:3],
                      np.concatenate([r.tokens[:3] for r in (res, res2, res3)], 1),
                      np.concatenate([r.logprobs[:3] for r in (res, res2, res3)], 1), cache,
                      np.asarray(engine.state.hidden, np.float32)[:3])
    (p_x, c_x, t_x, l_x, k_x, h_x), (p_g, c_g, t_g, l_g, k_g, h_g) = seen["xla"], seen[impl]
    close = lambda a, b: float(np.abs(a - b).max()) <= 0.03 * float(np.abs(a).max())
    assert close(p_x, p_g) and close(c_x, c_g) and close(h_x, h_g)
    assert not close(p_x, c_x)  # the appended chunk changed the next-token states the check compares
    np.testing.assert_array_equal(t_x, t_g)
    np.testing.assert_allclose(l_x, l_g, atol=0.05)
    for a, b in zip(k_x, k_g):
        assert close(a, b)


def test_sampling_distribution_top_k_top_p():
    from aepo_jax.engine import sampling

    logits = jnp.log(jnp.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]], jnp.float32))
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    rows = jnp.repeat(logits, n, axis=0)

    def freq(temperature, top_k, top_p, candidates):
        tok, logp, ent = jax.jit(sampling.sample, static_argnames=("greedy_only", "candidates"))(
            rows, jnp.full((n,), temperature), jnp.full((n,), top_k, jnp.int32), jnp.full((n,), top_p), keys,
            greedy_only=False, candidates=candidates)
        p = np.exp(np.asarray(logits[0]) / temperature)
        p /= p.sum()
        np.testing.assert_allclose(np.exp(np.asarray(logp)), p[np.asarray(tok)], rtol=1e-5)
        np.testing.assert_allclose(ent, -(p * np.log(p)).sum(), rtol=1e-5)
        return np.bincount(np.asarray(tok), minlength=6) / n

    p = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    np.testing.assert_allclose(freq(1.0, 0, 1.0, 0), p, atol=0.015)
    # top-k 3: renormalised over the 3 largest
    np.testing.assert_allclose(freq(1.0, 3, 1.0, 4), np.r_[p[:3] / p[:3].sum(), 0, 0, 0], atol=0.015)
    # top-p 0.7: the smallest prefix with mass >= 0.7 is {0, 1, 2} (0.8); full sort (candidates = V)
    np.testing.assert_allclose(freq(1.0, 0, 0.7, 6), np.r_[p[:3] / p[:3].sum(), 0, 0, 0], atol=0.015)
    # top-k 4 then top-p 0.5 over the renormalised top 4 (0.4/0.9 = 0.44 < 0.5 -> keep 2)
    np.testing.assert_allclose(freq(1.0, 4, 0.5, 4), np.r_[p[:2] / p[:2].sum(), 0, 0, 0, 0], atol=0.015)
    # temperature sharpens
    q = p ** 2 / (p ** 2).sum()
    np.testing.assert_allclose(freq(0.5, 0, 1.0, 0), q, atol=0.015)
    x = jax.random.normal(jax.random.key(1), (3, 5000))
    for k in (1, 32):
        np.testing.assert_array_equal(sampling.block_top_k(x, k)[0], jax.lax.top_k(x, k)[0])
        np.testing.assert_array_equal(sampling.block_top_k(x, k)[1], jax.lax.top_k(x, k)[1])
    assert sampling.sampling_mode([SamplingParams(temperature=0.6, top_p=0.95, top_k=20)], 97) == (False, 32)
    assert sampling.sampling_mode([SamplingParams(top_p=0.9)], 97) == (False, 97)
    assert sampling.sampling_mode([SamplingParams.greedy()], 97) == (True, 0)
    assert sampling.sampling_mode([SamplingParams(), SamplingParams.greedy()], 97) == (False, 0)


def test_top_k_one_is_greedy(env):
    engine = env["engine"]
    prompt = _prompts(3, (6,))[0]
    greedy = engine.generate([prompt], max_new_tokens=10, sampling=SamplingParams.greedy(), ignore_eos=True)[0]
    top1 = engine.generate([prompt], max_new_tokens=10, sampling=SamplingParams(temperature=1.0, top_k=1),
                           ignore_eos=True)[0]
    assert top1.tokens == greedy.tokens


# ------------------------------------------------------------------------------- fork and tool turns


def test_fork_same_key_reproduces_and_new_key_diverges(env):
    engine = env["engine"]
    prompt = _prompts(4, (7,))[0]
    engine.prefill([0], [prompt], sampling=SamplingParams(temperature=1.0), stops=[], ignore_eos=True, seed=11)
    first = engine.decode(3)
    assert first.counts[0] == 3
    engine.fork(0, 3, same_key=True)
    engine.fork([0, 0], [4, 5])          # two children with their own keys
    assert engine.occupied[[0, 3, 4, 5]].all()
    res = engine.decode(16, wait_fraction=1.0)
    np.testing.assert_array_equal(res.counts[[0, 3, 4, 5]], 16)
    parent = res.new_tokens(0)
    np.testing.assert_array_equal(res.new_tokens(3), parent)
    np.testing.assert_array_equal(res.new_logprobs(3), res.new_logprobs(0))
    assert not np.array_equal(res.new_tokens(4), parent)
    assert not np.array_equal(res.new_tokens(5), parent)
    assert not np.array_equal(res.new_tokens(4), res.new_tokens(5))
    np.testing.assert_array_equal(engine.lengths()[[0, 3, 4, 5]], len(prompt) + 19)


def test_fork_rewind_restarts_a_branch_like_a_fresh_request(env):
    """fork + rewind(L - 1, seed) + prefill(token L - 1) == a fresh request of the first L tokens."""
    engine = env["engine"]
    prompt = _prompts(5, (6,))[0]
    sampling = SamplingParams(temperature=1.0)
    engine.prefill([0], [prompt], sampling=sampling, stops=[], ignore_eos=True, seed=21)
    parent = engine.decode(5, wait_fraction=1.0).new_tokens(0).tolist()
    prefix = prompt + parent[:3]                          # branch after the parent's third new token
    engine.fork(0, 1)
    engine.rewind(1, len(prefix) - 1, seed=33)
    engine.prefill([1], [prefix[-1:]])
    engine.prefill([2], [prefix], sampling=sampling, stops=[], ignore_eos=True, seed=33)
    res = engine.decode(8, wait_fraction=1.0)
    np.testing.assert_array_equal(res.new_tokens(1), res.new_tokens(2))
    np.testing.assert_allclose(res.new_logprobs(1), res.new_logprobs(2), atol=1e-5)
    np.testing.assert_array_equal(engine.lengths()[[1, 2]], len(prefix) + 8)
    with pytest.raises(ValueError, match="rewind: lengths must be in"):
        engine.rewind(1, 10_000, seed=0)
    with pytest.raises(ValueError, match="hold no sequence"):
        engine.rewind(5, 1, seed=0)


def test_stop_string_then_tool_result_equals_decoding_the_concatenation(env):
    engine, ref, probe, stop_at = env["engine"], env["ref"], env["probe"], env["stop_at"]
    engine.prefill([1], [PROBE], sampling=SamplingParams.greedy())   # every stop string, EOS on
    res = engine.decode(32)
    # The two-token stop string (probe[stop_at - 1 : stop_at + 1]) ends the turn, both tokens included.
    assert res.stopped_slots() == [1] and res.finish_reason(1) == "</search>"
    np.testing.assert_array_equal(res.new_tokens(1), probe[:stop_at + 1])
    turn1 = res.new_tokens(1).tolist()
    result = [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]                   # " <result>...</result>"
    engine.prefill([1], [result])
    res2 = engine.decode(10, wait_fraction=1.0)
    # the same continuation from one prefill of the concatenated sequence, in another slot
    engine.prefill([2], [PROBE + turn1 + result], sampling=SamplingParams.greedy(), stops=["</python>"])
    res3 = engine.decode(10, wait_fraction=1.0)
    n = min(res2.counts[1], res3.counts[2])
    assert n >= 3
    np.testing.assert_array_equal(res2.new_tokens(1)[:n], res3.new_tokens(2)[:n])
    np.testing.assert_allclose(res2.new_logprobs(1)[:n], res3.new_logprobs(2)[:n], atol=1e-5)
    full = PROBE + turn1 + result
    np.testing.assert_array_equal(res2.new_tokens(1)[:n], ref.greedy(full, n))


def test_appends_inside_decode_equal_prefilling_them_first(env):
    """decode(appends=...) absorbs the chunks inside its loop with the result of prefilling them first: the same
    sampled tokens (same keys), log-probs, entropies, stop reasons and lengths. The engine's lane takes 2 slots x
    4 tokens per step, so chunks take several steps and slots queue; a chunk over the lane's capacity is
    prefilled by decode; the chunks go to running slots, and to a slot stopped at its budget (it stops again
    at once, sampling nothing). float32 matmuls run at full precision: under a GPU's default (TF32) the two paths'
    differently shaped matmuls round apart by more than the 1e-5 asserted here."""
    engine = Engine(env["model"], num_slots=NUM_SLOTS, max_len=MAX_LEN, cache_dtype=jnp.float32,
                    prefill_buckets=(8, 32), lane_rows=2, lane_width=4, lane_capacity=10)
    prompts = _prompts(11, (5, 8, 3, 6, 7, 4))
    chunks = _prompts(12, (9, 3, 12, 5, 0, 2))
    budgets = [30, 30, 30, 30, 30, 2]
    runs = []
    with jax.default_matmul_precision("highest"):
        for inside in (True, False):
            engine.prefill(list(range(6)), prompts, sampling=SamplingParams(temperature=1.0), stops=[],
                           ignore_eos=True, max_length=[len(p) + b for p, b in zip(prompts, budgets)],
                           seed=list(range(6)))
            first = engine.decode(6, wait_fraction=1.0)
            assert first.stopped_slots() == [5] and first.finish_reason(5) == "length"
            appends = {s: c for s, c in enumerate(chunks) if c}
            if inside:
                second = engine.decode(64, wait_fraction=1.0, appends=appends)
            else:
                engine.prefill(list(appends), list(appends.values()))
                second = engine.decode(64, wait_fraction=1.0)
            runs.append((first.fetch(), second.fetch()))
            assert first.output.is_deleted() and second.output.is_deleted()  # a fetch frees the device buffer
            engine.release(list(range(6)))
    (a1, a2), (b1, b2) = runs
    np.testing.assert_array_equal(a1.tokens, b1.tokens)
    for s in range(6):
        np.testing.assert_array_equal(a2.new_tokens(s), b2.new_tokens(s))
        np.testing.assert_allclose(a2.new_logprobs(s), b2.new_logprobs(s), atol=1e-5)
        np.testing.assert_allclose(a2.new_entropies(s), b2.new_entropies(s), atol=1e-5)
        assert a2.finish_reason(s) == b2.finish_reason(s) == "length"
    np.testing.assert_array_equal(a2.lengths, b2.lengths)
    # lane steps, by hand: chunks of 9, 3, 5, 2 tokens (slots 0, 1, 3, 5; slot 2's 12 > capacity 10 is
    # prefilled) through 2 rows x 4 tokens, lowest slots first: [5, 0, 5, 2] -> [1, 0, 1, 2] -> [0, 0, 0, 2] -> 0
    assert a2.lane_steps == 4 and b2.lane_steps == 0 and a1.lane_steps == 0
    # the budget counts appended tokens: slot 2 samples 6, gets 12 appended (by a prefill), samples 12
    assert a2.counts[5] == 0 and a2.counts[4] == 30 - 6 and a2.counts[2] == 30 - 6 - 12


def test_eos_and_max_len_stop_cleanly(env):
    engine, probe, eos_at = env["engine"], env["probe"], env["eos_at"]
    # EOS (stop strings off): the EOS token is the last new token.
    engine.prefill([0], [PROBE], sampling=SamplingParams.greedy(), stops=[])
    res = engine.decode(32)
    assert res.finish_reason(0) == "eos"
    np.testing.assert_array_equal(res.new_tokens(0), probe[:eos_at + 1])
    # A slot that reaches max_len: 3 tokens, then 'length'; decoding again gives nothing.
    prompt = _prompts(5, (MAX_LEN - 3,))[0]
    engine.prefill([1], [prompt], sampling=SamplingParams(temperature=1.0), ignore_eos=True, stops=[])
    res = engine.decode(16, wait_fraction=1.0)
    assert res.counts[1] == 3 and res.finish_reason(1) == "length" and res.lengths[1] == MAX_LEN
    again = engine.decode(16)
    assert again.counts[1] == 0 and int(again.steps) == 0
    # A prompt of exactly max_len stops before sampling anything.
    engine.prefill([2], [_prompts(6, (MAX_LEN,))[0]], ignore_eos=True)
    res = engine.decode(16)
    assert res.counts[2] == 0 and res.finish_reason(2) == "length" and res.stopped[2]
    # A per-request budget (max_length) stops the same way.
    engine.prefill([3], [PROBE], sampling=SamplingParams.greedy(), stops=[], ignore_eos=True,
                   max_length=len(PROBE) + 5)
    res = engine.decode(16)
    assert res.counts[3] == 5 and res.finish_reason(3) == "length"
    with pytest.raises(ValueError, match="does not fit"):
        engine.prefill([1], [[1, 2]])   # slot 1 is full


def test_wait_policy_returns_when_enough_slots_wait(env):
    engine = env["engine"]
    prompts = _prompts(7, (5, 6, 7))
    budgets = [3, 6, 9]
    engine.prefill([0, 1, 2], prompts, sampling=SamplingParams.greedy(), stops=[], ignore_eos=True,
                   max_length=[len(p) + b for p, b in zip(prompts, budgets)])
    tokens = {s: [] for s in range(3)}
    res = engine.decode(32)                      # min_waiting=1: back at the first stop
    assert int(res.steps) == 3 and res.stopped_slots() == [0]
    assert res.finish_reason(1) is None and res.counts[1] == 3
    for s in range(3):
        tokens[s] += res.new_tokens(s).tolist()
    res = engine.decode(32, wait_fraction=1.0)   # the rest, until both remaining slots stop
    assert int(res.steps) == 6 and res.stopped_slots() == [1, 2] and res.counts[0] == 0
    for s in range(3):
        tokens[s] += res.new_tokens(s).tolist()
    engine.release([0, 1, 2])
    one_shot = engine.generate(prompts, max_new_tokens=9, sampling=SamplingParams.greedy(), ignore_eos=True)
    for s in range(3):
        assert tokens[s] == one_shot[s].tokens[:budgets[s]]
    # a fraction: 3 slots, wait_fraction 0.5 -> return when 2 have stopped
    engine.prefill([0, 1, 2], prompts, sampling=SamplingParams.greedy(), stops=[], ignore_eos=True,
                   max_length=[len(p) + b for p, b in zip(prompts, budgets)])
    res = engine.decode(32, wait_fraction=0.5)
    assert int(res.steps) == 6 and res.stopped_slots() == [0, 1]


def test_slots_that_stopped_keep_known_lengths_through_a_queued_call(env, monkeypatch):
    """A caller may queue the next decode call before reading the last one (the rollout's tool_overlap). The
    slots that had stopped by the end of the call it reads cannot move in the queued call, so appending to
    them needs no sync with the device, and their lengths are exact (a chunk one token too long is refused);
    a slot that ran in the queued call, or was appended to in it, needs a sync."""
    engine = env["engine"]
    prompts = _prompts(21, (5, 7, 6))
    engine.prefill([0, 1, 2], prompts, sampling=SamplingParams(temperature=1.0), stops=[], ignore_eos=True,
                   max_length=[len(prompts[0]) + 3, MAX_LEN, len(prompts[2]) + 2], seed=[0, 1, 2])
    first = engine.decode(4, wait_fraction=1.0)  # slots 0 and 2 stop at their budgets, slot 1 runs on
    queued = engine.decode(2, wait_fraction=1.0, appends={2: [4]})  # queued before `first` is read
    syncs = []
    sync = engine.lengths
    monkeypatch.setattr(engine, "lengths", lambda: syncs.append(1) or sync())
    assert first.stopped_slots() == [0, 2] and first.finish_reason(1) is None
    # slot 1 ran in `queued`, slot 2 was appended to in it: reading `first` does not give their lengths
    assert engine._lengths_known[[0, 1, 2]].tolist() == [True, False, False]
    room = MAX_LEN - (len(prompts[0]) + 3)
    with pytest.raises(ValueError, match="does not fit"):
        engine.decode(1, appends={0: [3] * (room + 1)})
    third = engine.decode(2, wait_fraction=1.0, appends={0: [3] * 2})
    assert syncs == []
    engine.decode(1, appends={2: [5]})
    assert syncs == [1]
    assert third.lengths[0] == len(prompts[0]) + 3 + 2 and third.counts[0] == 0  # over its budget again
    assert queued.lengths[2] == len(prompts[2]) + 2 + 1 and queued.counts[1] == 2


def test_idle_slots_keep_known_lengths_through_decode_calls_that_leave_them_alone(env, monkeypatch):
    """A slot that stopped (as a read result says) or was rewound does not move until something is appended to
    it, so decode calls that leave it alone, even several queued without a read, keep its length known:
    appending to it later needs no sync, and the length is exact (a chunk one token too long is refused). The
    rollout defers tool results and branch tokens past such calls."""
    engine = env["engine"]
    prompts = _prompts(22, (5, 7, 6))
    engine.prefill([0, 1, 2], prompts, sampling=SamplingParams(temperature=1.0), stops=[], ignore_eos=True,
                   max_length=[len(prompts[0]) + 3, MAX_LEN, MAX_LEN], seed=[0, 1, 2])
    first = engine.decode(4, wait_fraction=1.0)  # slot 0 stops at its budget, slots 1 and 2 run on
    assert first.stopped_slots() == [0]
    engine.rewind(2, len(prompts[2]), seed=5)  # slot 2 idles at its prompt's length
    syncs = []
    sync = engine.lengths
    monkeypatch.setattr(engine, "lengths", lambda: syncs.append(1) or sync())
    engine.decode(3, wait_fraction=1.0)  # only slot 1 runs in these two calls
    engine.decode(2, wait_fraction=1.0)
    assert engine._lengths_known[[0, 1, 2]].tolist() == [True, False, True]
    room = MAX_LEN - (len(prompts[0]) + 3)
    with pytest.raises(ValueError, match="does not fit"):
        engine.decode(1, appends={0: [3] * (room + 1)})
    last = engine.decode(2, wait_fraction=1.0, appends={0: [3] * 2, 2: [4]})
    assert syncs == []
    assert last.lengths[0] == len(prompts[0]) + 3 + 2 and last.counts[0] == 0  # over its budget again
    assert last.counts[2] >= 1 and last.lengths[2] == len(prompts[2]) + 1 + last.counts[2]


def _multi_turn(engine, prompts, result):
    engine.prefill([0, 1], prompts, sampling=[SamplingParams.greedy(), SamplingParams(temperature=1.0)],
                   max_length=MAX_LEN - 8, seed=[1, 2])
    a = engine.decode(16)
    engine.prefill([0], [result])
    engine.fork(0, 2)
    b = engine.decode(16, wait_fraction=0.5)
    engine.prefill([1], [result[:3]])
    engine.fork([1, 2], [3, 4], same_key=True)
    c = engine.decode(16, min_waiting=2)
    d = engine.decode(16, wait_fraction=1.0, appends={3: result, 4: result[:2]})
    engine.release([0, 1, 2, 3, 4])
    return [r.tokens for r in (a, b, c, d)]


def test_multi_turn_after_warmup_compiles_nothing(env, setup):
    engine = env["engine"]
    prompts, result = [PROBE, _prompts(8, (9,))[0]], [30, 31, 32, 33, 34, 35]
    other = qwen3.Qwen3(engine.config, rngs=__import__("flax").nnx.Rngs(7))

    def both():
        first = _multi_turn(engine, prompts, result)
        engine.set_weights(other)                 # new weights (same shapes): nothing recompiles
        second = _multi_turn(engine, prompts, result)
        engine.set_weights(setup["model"])
        return first, second

    warm = both()   # warm-up: the shapes a turn needs (chunk / window buckets) depend on where slots stop
    with count_compilations() as compiles:
        again = both()
    assert compiles == [], f"{len(compiles)} compilations after warm-up"
    for x, y in zip(jax.tree.leaves(warm), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(warm[0][0], warm[1][0])


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_and_other_slots_keep_their_state(env):
    engine, ref = env["engine"], env["ref"]
    prompt = _prompts(9, (6,))[0]
    engine.prefill([0], [prompt], sampling=SamplingParams.greedy(), stops=[], ignore_eos=True)
    res = engine.decode(4)
    before = engine.lengths()
    bad = [
        (lambda: engine.prefill([1], [list(range(MAX_LEN + 1))]), "does not fit"),
        (lambda: engine.prefill(list(range(NUM_SLOTS + 1)), [[1]] * (NUM_SLOTS + 1)), "7 slots requested"),
        (lambda: engine.prefill([1], [[1, 2]], stops=["</answer>"]), "unknown stop string '</answer>'"),
        (lambda: engine.prefill([NUM_SLOTS], [[1]]), "out of range"),
        (lambda: engine.prefill([1], [[1, 200]]), "outside"),
        (lambda: engine.prefill([1, 2], [[1], []]), "empty"),
        (lambda: engine.prefill([1], [[1, 2, 3]], max_length=2), "longer than its max_length"),
        (lambda: engine.fork(0, 0), "in use"),
        (lambda: engine.fork(1, 2), "hold no sequence"),
        (lambda: engine.generate([[1]] * 2, max_new_tokens=2), "in use"),
        (lambda: engine.decode(4, appends={1: [1, 2]}), "hold no sequence"),
        (lambda: engine.decode(4, appends={0: [1, 200]}), "outside"),
        (lambda: engine.decode(4, appends={0: []}), "empty"),
        (lambda: engine.decode(4, appends={0: list(range(MAX_LEN - 9))}), "does not fit"),
        (lambda: engine.decode(4, appends={NUM_SLOTS: [1]}), "out of range"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
    np.testing.assert_array_equal(engine.lengths(), before)
    assert engine.occupied.tolist() == [True] + [False] * (NUM_SLOTS - 1)
    rest = engine.decode(6, wait_fraction=1.0)
    np.testing.assert_array_equal(np.r_[res.new_tokens(0), rest.new_tokens(0)], ref.greedy(prompt, 10))
    engine.release([0])
    with pytest.raises(ValueError, match="7 prompts but the engine has 6 slots"):
        engine.generate([[1]] * 7, max_new_tokens=2)
    with pytest.raises(ValueError, match="more than max_len"):
        engine.generate([list(range(MAX_LEN + 1))], max_new_tokens=2)
    bf16 = qwen3.Qwen3(env["model"].config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="attention='pallas' needs a head_dim that is a power of two >= 32, got 16"):
        Engine(bf16, num_slots=2, max_len=32, attention="pallas")
    with pytest.raises(ValueError, match="attention='cudnn' needs a bf16 / f16 model"):
        Engine(env["model"], num_slots=2, max_len=32, attention="cudnn")
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        Engine(env["model"], num_slots=2, max_len=32, attention="flash")


def test_stop_table_alternatives_and_text():
    from aepo_jax.engine import StopTable, stops

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    table = StopTable({"</s>": "</s>", "b": [[5], [6, 7]], "c": [8, 9, 10]}, tokenizer=Tok())
    assert table.names == ["</s>", "b", "c"] and table.alternatives[0] == [(60, 47, 115, 62)]
    assert table.width == 4
    history = jnp.array([[-1, -1, -1, 5], [1, 60, 47, 115], [60, 47, 115, 62], [-1, 6, 7, 0], [0, 8, 9, 10],
                         [-1, -1, 6, 7]])
    hit, which = stops.match(history, jnp.ones((6, 3), bool), table.table, table.valid, table.owner)
    assert hit.tolist() == [True, False, True, False, True, True]
    assert which.tolist() == [1, -1, 0, -1, 2, 1]
    hit, _ = stops.match(history, jnp.array([[False, False, True]] * 6), table.table, table.valid, table.owner)
    assert hit.tolist() == [False, False, False, False, True, False]
    with pytest.raises(ValueError, match="no tokenizer"):
        StopTable(["</search>"])
    with pytest.raises(ValueError, match="unknown stop string 'x'"):
        table.mask(["x"])


def test_decode_loop_does_not_copy_the_cache(env):
    """Both decode programs, without appends and with the lane (its own while loop), update the cache in place."""
    engine = env["engine"]
    shape = engine.cache_buffer_shape()
    loops = {}
    for lane_loop in (False, True):
        text = engine.decode_hlo(16, lane_loop=lane_loop)
        assert hlo.cache_copies(text, shape) == []
        loops[lane_loop] = text.count(" while(")
    assert loops == {False: 1, True: 2}


def test_benchmark_script_runs_on_the_tiny_preset(tmp_path, monkeypatch, capsys):
    import json

    from tools import benchmark_decode
    monkeypatch.setenv("OUT", str(tmp_path))
    # 8 slots, more than the lane's 4 rows: a lane of every slot gathers a cache-shaped key window ("xla")
    assert benchmark_decode.main(["--presets", "tiny", "--batches", "8", "--prompt", "8", "--new", "8",
                                  "--runs", "1", "--hf_runs", "1"]) == 0
    results = json.loads((tmp_path / "decode_bench.json").read_text())["results"]
    assert len(results) == 1 and "tokens_per_s" in results[0]["ours"] and "tokens_per_s" in results[0]["hf"]
    assert results[0]["ours"]["hlo_cache_copies"] == 0
    assert "x HF" in capsys.readouterr().out


def test_profile_script_attributes_a_prefill_to_its_ops(tmp_path, monkeypatch):
    import json

    from tools import profile_engine
    monkeypatch.setenv("OUT", str(tmp_path))
    summary = profile_engine.main(["prefill", "--preset", "tiny", "--slots", "4", "--max_len", "128", "--start",
                                   "40", "--rows", "3", "--chunk", "10", "--repeats", "1", "--trace_calls", "1"])
    ops = json.loads((tmp_path / "profile_engine_prefill.json").read_text())["ops"]
    assert summary["call"] == "prefill 3 rows x 10 tokens" and summary["kernel_ms_per_call"] > 0
    assert summary["by_category"].get("matmul", 0) > 0
    assert any("forward.py" in op.get("stack", "") for op in ops)  # ops map back to the engine's source


def test_profile_engine_decode_with_appends_runs_the_lane(tmp_path, monkeypatch):
    """tools/profile_engine.py decode --appends on CPU: the traced call gathers the appended rows' key windows
    (the lane's attention, `forward._rows_window`); without appends it does not."""
    import json

    from tools import profile_engine
    monkeypatch.setenv("OUT", str(tmp_path))
    stacks = {}
    for appends in (0, 2):
        summary = profile_engine.main(["decode", "--preset", "tiny", "--slots", "4", "--max_len", "128", "--start",
                                       "40", "--steps", "2", "--appends", str(appends), "--chunk", "10",
                                       "--repeats", "1", "--trace_calls", "1"])
        assert summary["call"] == f"decode 2 steps x 4 slots, {appends} x 10 appended"
        ops = json.loads((tmp_path / "profile_engine_decode.json").read_text())["ops"]
        stacks[appends] = " ".join(op.get("stack", "") for op in ops)
    assert "_rows_window" in stacks[2] and "_rows_window" not in stacks[0]


def test_profile_engine_decode_calls_fits_a_per_step_cost(tmp_path, monkeypatch):
    """tools/profile_engine.py decode_calls on CPU: a call of more steps costs more, and the fitted line
    reproduces the measured times."""
    from tools import profile_engine
    monkeypatch.setenv("OUT", str(tmp_path))
    s = profile_engine.main(["decode_calls", "--preset", "tiny", "--slots", "4", "--max_len", "160", "--start", "40",
                             "--repeats", "3"])
    wall = {int(k): v for k, v in s["ms_per_call"].items()}
    assert list(wall) == [1, 2, 4, 8, 16, 32, 64] and wall[64] > wall[1] and s["fit_ms_per_step"] > 0
    fitted = {n: s["fit_fixed_ms"] + s["fit_ms_per_step"] * n for n in wall}
    assert abs(fitted[64] - wall[64]) < 0.25 * wall[64]


def test_profile_engine_lane_calls_append_through_the_lane(tmp_path, monkeypatch):
    """tools/profile_engine.py lane_calls on CPU: n appended chunks take ceil(n / lane_rows) lane steps (4 rows),
    and a call that appends costs more than one that does not."""
    from tools import profile_engine
    monkeypatch.setenv("OUT", str(tmp_path))
    s = profile_engine.main(["lane_calls", "--preset", "tiny", "--slots", "8", "--max_len", "160", "--start", "40",
                             "--steps", "2", "--chunk", "10", "--repeats", "3"])
    assert s["lane"] == (4, 64) and s["lane_steps"] == {0: 0, 1: 1, 2: 1, 4: 1, 8: 2}
    assert s["ms_per_call"][8] > s["ms_per_call"][0] and s["lane_ms"][0] == 0.0
    assert (tmp_path / "profile_engine_lane_calls.json").exists()
    s = profile_engine.main(["lane_calls", "--preset", "tiny", "--slots", "8", "--max_len", "160", "--start", "40",
                             "--steps", "2", "--chunk", "10", "--repeats", "1", "--lane_rows", "3", "--lane_width",
                             "16", "--counts", "3,4"])
    assert s["lane"] == (3, 16) and s["lane_steps"] == {0: 0, 3: 1, 4: 2}  # 0 is always timed (the baseline)


def test_row_buckets_waste_under_a_third_and_stay_few():
    buckets = [Engine._row_bucket(n) for n in range(1, 257)]
    assert all(b >= n and (b - n) < b / 3 for n, b in enumerate(buckets, 1))
    assert sorted(set(buckets)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
