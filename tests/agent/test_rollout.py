"""End-to-end rollouts with the real engine, real tools and a scripted (bigram) Qwen3 policy."""

import concurrent.futures
import math

import numpy as np
import pytest

from aepo_jax.agent import rollout as rollout_lib
from aepo_jax.agent.parsing import result_block
from aepo_jax.agent.tools import PythonTool, SearchTool
from aepo_jax.core import rollout_math
from aepo_jax.data.rewards import f1_format_reward
from aepo_jax.engine import Engine
from tests.agent import scripted


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollout")
    tok = scripted.tokenizer(tmp / "tok")
    corpus = scripted.write_corpus(tmp / "corpus.jsonl")
    tools = {"search": SearchTool(corpus=str(corpus), top_k=1), "python": PythonTool(timeout_s=3)}
    executor = concurrent.futures.ThreadPoolExecutor(4)
    yield tok, tools, executor
    executor.shutdown()


def _engine(tok, slots, succ=None, max_len=96):
    return Engine(scripted.model(succ=succ), num_slots=slots, max_len=max_len, eos_ids=[tok.eos_id],
                  stop_strings=list(rollout_lib.TOOL_STOPS), tokenizer=tok, seed=0)


def _run(world, scheduler, questions=2, k=4, m=2, slots=None, seed=0, engine=None, **kw):
    tok, tools, executor = world
    engine = engine or _engine(tok, slots or questions * k)
    config = rollout_lib.RolloutConfig(scheduler=scheduler, group_size=k, initial_rollouts=m,
                                       entropy_window=4, decode_chunk=8, max_response_tokens=60, **kw)
    prompts = [tok.encode("Q")] * questions
    return rollout_lib.rollout(engine, tok, tools, prompts, config, executor=executor, seed=seed)


def test_tool_result_is_appended_masked_and_answer_scored(world):
    tok, tools, _ = world
    result = _run(world, "grpo", questions=2, k=3)
    assert [len(g) for g in result.groups] == [3, 3]
    for traj in (t for g in result.groups for t in g):
        assert traj.finish_reason == "eos"
        (call,) = traj.tool_calls
        assert (call.tag, call.payload, call.ok) == ("search", "bralo", True)
        assert "Bralo is in Paris." in call.result
        block = tok.encode(result_block(call.result))
        start = call.position
        assert traj.response[start:start + len(block)] == block
        assert traj.mask[start:start + len(block)] == [0] * len(block)
        assert sum(traj.mask) == len(traj.mask) - len(block)  # everything else was sampled
        assert all(lp == 0.0 for lp, mk in zip(traj.logprobs, traj.mask) if not mk)
        assert all(-1.0 < lp <= 0.0 for lp, mk in zip(traj.logprobs, traj.mask) if mk)
        text = tok.decode(traj.response, skip_special_tokens=True)
        reward = f1_format_reward(text, ["Paris"])
        assert reward.format_ok and reward.score == 1.0, (text, reward)
    assert result.metrics["rollout/tool_calls_per_traj"] == 1.0


@pytest.mark.parametrize("tool_overlap", [False, True])
@pytest.mark.parametrize("scheduler", ["grpo", "arpo", "aepo"])
def test_schedulers_return_exactly_k_and_branches_share_prefixes(world, scheduler, tool_overlap):
    result = _run(world, scheduler, questions=3, k=5, m=2, tool_overlap=tool_overlap)
    assert [len(g) for g in result.groups] == [5, 5, 5]
    for group in result.groups:
        for traj in group:
            if traj.parent < 0:
                assert traj.branch_point == 0
                continue
            parent = group[traj.parent]
            bp = traj.branch_point
            assert traj.response[:bp] == parent.response[:bp]
            assert traj.mask[:bp] == parent.mask[:bp]
            assert traj.logprobs[:bp] == parent.logprobs[:bp]
            # a branch starts right after a tool result
            assert traj.mask[bp - 1] == 0 and traj.response[bp - 1] == parent.response[bp - 1]
            assert traj.finish_reason == "eos" and traj.tool_calls == parent.tool_calls[:1]
    if scheduler == "grpo":
        assert not result.decisions and all(t.parent < 0 for g in result.groups for t in g)


def test_same_seed_same_rollout(world):
    a, b = (_run(world, "aepo", questions=2, k=4, seed=3) for _ in range(2))
    for ga, gb in zip(a.groups, b.groups):
        assert [(t.response, t.parent, t.branch_point) for t in ga] == \
               [(t.response, t.parent, t.branch_point) for t in gb]
    assert a.decisions == b.decisions


@pytest.mark.parametrize("tool_overlap", [False, True])
def test_tool_results_and_branch_tokens_are_appended_inside_decode_calls(world, tool_overlap):
    """The tool results of a round and the re-run prefix token of each branch made in it go to the next decode
    call, which absorbs them inside its loop: no prefill call appends to an occupied slot, one-token appends
    are exactly the branches, and tool results are appended too. The loop never waits for the device to learn
    slot lengths (with tool_overlap the next call is already queued when a result is read)."""
    tok, _, _ = world
    engine = _engine(tok, 40)
    appending_prefills, appended, syncs = [], [], []
    prefill, decode, lengths = engine.prefill, engine.decode, engine.lengths
    engine.lengths = lambda: syncs.append(1) or lengths()

    def counting_prefill(slots, chunks, **kw):
        if engine.occupied[slots].any():
            appending_prefills.append(len(slots))
        return prefill(slots, chunks, **kw)

    def counting_decode(*a, appends=None, **kw):
        appended.extend(len(c) for c in (appends or {}).values())
        return decode(*a, appends=appends, **kw)

    engine.prefill, engine.decode = counting_prefill, counting_decode
    result = _run(world, "arpo", questions=6, k=6, m=2, pre_monitor=False, engine=engine,
                  tool_overlap=tool_overlap)
    branches = round(result.metrics["rollout/branches_per_question"] * 6)
    assert branches >= 3 and result.metrics["rollout/tool_calls_per_traj"] > 0.5
    assert appending_prefills == [] and syncs == []
    assert appended.count(1) == branches
    assert len(appended) - branches >= 6


def test_tool_order_changes_when_slots_run_not_what_they_sample(world):
    """Each trajectory's tokens depend on its own seed and history only, so decoding the other slots while
    the tools run (one extra idle call for the calling slots) gives the same trajectories, in more calls.
    overlap_min_running: the overlapped loop queues the next call before reading the last one only while at
    least that many slots run; with fewer it reads first (the sync order), so a threshold between 0 and the
    slot count gives both kinds of rounds."""
    tok, _, _ = world

    def run(**kw):
        engine = Engine(scripted.model(strength=6.0), num_slots=12, max_len=96, eos_ids=[tok.eos_id],
                        stop_strings=list(rollout_lib.TOOL_STOPS), tokenizer=tok, seed=0)
        decode, results, ahead = engine.decode, [], []

        def tracking(*a, **k):  # queued ahead: an earlier call's result is still unread
            ahead.append(any(r._host is None for r in results))
            results.append(decode(*a, **k))
            return results[-1]

        engine.decode = tracking
        r = _run(world, "grpo", questions=3, k=4, seed=5, engine=engine, **kw)
        return r, [(t.response, t.mask, t.logprobs) for g in r.groups for t in g], ahead

    sync, full, mixed = (run(tool_overlap=False), run(tool_overlap=True, overlap_min_running=0),
                         run(tool_overlap=True, overlap_min_running=6))
    assert sync[1] == full[1] == mixed[1]
    assert sync[0].metrics["rollout/tool_calls_per_traj"] > 0.5
    assert len({len(t.response) for g in sync[0].groups for t in g}) > 1  # the slots stopped at different times
    assert full[0].metrics["rollout/decode_calls"] > sync[0].metrics["rollout/decode_calls"]
    assert not any(sync[2])
    assert sum(full[2]) > sum(mixed[2]) > 0
    assert not all(mixed[2][1:])


@pytest.mark.parametrize("tool_overlap", [False, True])
def test_deferred_appends_fill_whole_lane_steps_and_give_the_same_trajectories(world, tool_overlap):
    """defer_appends: of the tool results ready for a decode call, it takes whole lane steps' worth (a multiple of
    lane_rows, 5 here; all when there are no more than 5) and the rest join the next call. All 12 slots stop on
    their tool call together here, so the call without deferral takes 12 results (3 lane steps, the last one
    part-filled). Each slot's tokens depend on its seed and history only, so the trajectories are those of a run
    without deferral; every result still goes through the lane, in no more lane steps, with no length sync."""
    tok, _, _ = world

    def run(defer):
        engine = Engine(scripted.model(), num_slots=12, max_len=96, eos_ids=[tok.eos_id], lane_rows=5,
                        stop_strings=list(rollout_lib.TOOL_STOPS), tokenizer=tok, seed=0)
        decode, lengths, per_call, syncs = engine.decode, engine.lengths, [], []
        engine.lengths = lambda: syncs.append(1) or lengths()

        def counting(*a, appends=None, **kw):
            per_call.append(len(appends or {}))
            return decode(*a, appends=appends, **kw)

        engine.decode = counting
        r = _run(world, "grpo", questions=3, k=4, engine=engine, tool_overlap=tool_overlap, defer_appends=defer)
        return r, [(t.response, t.mask, t.logprobs) for g in r.groups for t in g], per_call, syncs

    (deferred, trajs, per_call, syncs), (full, full_trajs, full_per_call, full_syncs) = run(True), run(False)
    assert trajs == full_trajs
    assert 12 in full_per_call and all(n <= 5 or n % 5 == 0 for n in per_call) and 10 in per_call
    assert sum(per_call) == sum(full_per_call)
    assert 0 < deferred.metrics["rollout/lane_steps"] <= full.metrics["rollout/lane_steps"]
    assert syncs == [] == full_syncs


@pytest.mark.parametrize("scheduler,lam", [("arpo", 0.0), ("aepo", 0.05)])
def test_branching_frequency_follows_the_formula(world, scheduler, lam):
    """Observed branches vs the sum over decisions of P(branch | dH, l) from the spec's formula."""
    result = _run(world, scheduler, questions=40, k=6, m=4, pre_monitor=False, branch_lambda=lam)
    decisions = result.decisions
    assert len(decisions) >= 100
    u = (np.arange(20_000) + 0.5) / 20_000  # quadrature over u ~ U(0, 1)
    probs = [float(np.mean(rollout_math.should_branch(u, dh, l, gamma=0.2, lam=lam, tau=0.5)))
             for dh, l, _ in decisions]
    expected, observed = sum(probs), sum(b for _, _, b in decisions)
    sd = math.sqrt(sum(p * (1 - p) for p in probs))
    assert abs(observed - expected) <= 3 * sd, (observed, expected, sd)
    assert result.metrics["rollout/branches_per_question"] == observed / 40


def test_limits_end_trajectories(world):
    tok, _, _ = world
    loop = scripted.successors({"</result>": "<search>"})  # searches forever
    result = _run(world, "grpo", questions=1, k=2, engine=_engine(tok, 2, succ=loop), max_tool_calls=3)
    for traj in result.groups[0]:
        assert traj.finish_reason == "max_tool_calls" and len(traj.tool_calls) == 3
    result = _run(world, "grpo", questions=1, k=2, engine=_engine(tok, 2, succ=loop), max_tool_calls=50)
    for traj in result.groups[0]:
        assert traj.finish_reason == "length" and len(traj.response) <= 60
    assert result.metrics["rollout/truncation_rate"] == 1.0


def test_tool_failure_becomes_the_result_and_the_rollout_goes_on(world):
    tok, _, _ = world
    python = scripted.successors({"</think>": "<python>", "<python>": "bralo", "bralo": "</python>"})
    result = _run(world, "grpo", questions=1, k=2, engine=_engine(tok, 2, succ=python))
    for traj in result.groups[0]:
        (call,) = traj.tool_calls
        assert call.tag == "python" and not call.ok and "NameError" in call.result
        assert traj.finish_reason == "eos"
    assert result.metrics["rollout/tool_errors"] == 2.0


def test_pre_monitoring_budget_of_one_still_gives_k(world, monkeypatch):
    """m = 1 (the probe alone) leaves nothing pending after the probe phase: refills make up the group.
    (The scripted policy's entropy is the same at every token, so the budget is forced to 1 here.)"""
    monkeypatch.setattr(rollout_math, "budget_split", lambda k, h_root, h_tool, beta: 1)
    result = _run(world, "aepo", questions=2, k=3)
    assert [len(g) for g in result.groups] == [3, 3]
    assert result.metrics["rollout/global_samples"] == 1.0


def test_fewer_slots_than_trajectories_still_gives_k(world):
    result = _run(world, "aepo", questions=3, k=4, slots=5)
    assert [len(g) for g in result.groups] == [4, 4, 4]


@pytest.mark.parametrize("lane_rows,overlap", [(4, True), (0, False)])
def test_benchmark_script_runs_on_the_tiny_preset(tmp_path, monkeypatch, lane_rows, overlap):
    """tools/benchmark_rollout.py end to end on CPU: its tool stops fire, every figure it reports exists, the
    matched-length plain decode samples exactly the agentic run's tokens per slot, and the synchronised
    breakdown accounts for the run's sampled tokens. Tool results go through the decode calls' lane (one
    prefill call: the prompts) or, with --lane_rows 0, through prefill calls that decode makes itself; the loop in
    either order (--tool_overlap, queuing ahead while 2 of the 4 slots run: the breakdown's synchronised calls
    are then fetched before the loop asks whether they are done)."""
    import json

    from tools import benchmark_rollout
    monkeypatch.setenv("OUT", str(tmp_path))
    summary = benchmark_rollout.main(["--preset", "tiny", "--batch", "4", "--prompt", "8", "--response", "96",
                                      "--tool_every", "8", "--repeats", "1", "--seeds", "2", "--breakdown",
                                      "--timeline", "--lane_rows", str(lane_rows), "--tag", "t",
                                      "--tool_overlap" if overlap else "--no-tool_overlap",
                                      "--overlap_min_running", "2"])
    saved = json.loads((tmp_path / "rollout_bench_t.json").read_text())
    metrics = saved["agentic_rollout"]["metrics"]
    assert metrics["rollout/tool_calls_per_traj"] > 1
    assert len(metrics["sampled_per_traj"]) == 4 and saved["plain_decode_matched"]["tokens_per_s"] > 0
    assert saved["lane"] == [lane_rows, 64]  # the engine's lane as built: --lane_width left to its default
    assert saved["agentic_rollout"]["runs"] == [summary["agentic_rollout"]["tokens_per_s"]]  # --repeats 1
    assert saved["agentic_rollout"]["longest"] == [max(metrics["sampled_per_traj"])]
    assert saved["ratio"] == pytest.approx(summary["agentic_rollout"]["tokens_per_s"]
                                           / summary["plain_decode"]["tokens_per_s"])
    # plain decode is timed with its prompts' prefill, as the rollout is; its decode alone is faster
    plain = saved["plain_decode"]
    seconds = 4 * 96 / plain["tokens_per_s"]
    assert plain["metrics"]["prefill_s"] > 0
    assert 4 * 96 / plain["metrics"]["decode_only_tokens_per_s"] == pytest.approx(
        seconds - plain["metrics"]["prefill_s"], rel=1e-6)
    assert saved["ratio_vs_plain_decode_only"] == pytest.approx(
        saved["ratio_mean"] * plain["tokens_per_s"] / plain["metrics"]["decode_only_tokens_per_s"])
    # --seeds 2: seed 0 is the run above, seed 1 its own draw; the mean is over both, each against plain decode
    seeds = saved["seeds"]
    assert [r["seed"] for r in seeds] == [0, 1]
    assert seeds[0]["tokens_per_s"] == saved["agentic_rollout"]["tokens_per_s"]
    assert seeds[0]["matched_tokens_per_s"] == saved["plain_decode_matched"]["tokens_per_s"]
    assert all(r["ratio"] == pytest.approx(r["tokens_per_s"] / saved["plain_decode"]["tokens_per_s"]) for r in seeds)
    assert saved["ratio_mean"] == pytest.approx((seeds[0]["ratio"] + seeds[1]["ratio"]) / 2)
    assert seeds[1]["matched_tokens_per_s"] > 0 and 0 < seeds[1]["longest"] <= 96
    assert seeds[0]["compilations"] == metrics["compilations"] == 0  # after the warm-up run of its seed
    assert seeds[1]["compilations"] == 0  # seed 1 had its own warm-up run (--warmups 1, the default)
    b = saved["breakdown"]
    assert b["prefill_calls"] == 1 if lane_rows else b["prefill_calls"] >= 2  # the prompts (and tool results)
    assert 0 < b["slot_use"] <= 1
    assert sum(c[1] for c in b["calls"]) <= b["seconds"]  # a prefill inside a decode call counts once
    sampled = sum(c[3] for c in b["calls"] if c[0] == "decode")
    assert sampled == pytest.approx(b["tokens_per_s"] * b["seconds"], rel=1e-6)
    # lane steps: tool results went through the lane (or none, without one); the least-squares fit of the decode
    # calls' times has an intercept, so its predictions add up to their measured total
    assert b["lane_steps"] > 0 if lane_rows else b["lane_steps"] == 0
    predicted = (b["fit_ms_per_step"] * b["decode_steps"] + b["fit_ms_per_lane_step"] * b["lane_steps"]
                 + b["fit_ms_per_sampled_token"] * sampled + b["fit_ms_per_call"] * b["decode_calls"])
    assert predicted == pytest.approx(1e3 * b["decode_s"], rel=1e-6)
    # the timed run's own counts (same seed: the same calls on the CPU) and its host time inside engine calls
    assert metrics["rollout/decode_steps"] == b["decode_steps"]
    assert metrics["rollout/slot_use"] == pytest.approx(b["slot_use"])
    assert 0 < metrics["decode_dispatch_s"] + metrics["fetch_wait_s"] < metrics["rollout/seconds"]
    # the profiled run: its parts tile the run's wall time, device-busy time never exceeds wall time, and
    # every decode call and prefill was seen
    t = saved["timeline"]
    assert sum(p["wall_ms"] for p in t["parts"].values()) == pytest.approx(t["wall_ms"], rel=1e-6)
    assert all(0 <= p["busy_ms"] <= p["wall_ms"] + 1e-6 for p in t["parts"].values())
    assert 0 < t["busy_ms"] <= t["wall_ms"]
    assert t["parts"]["decode"]["calls"] == metrics["rollout/decode_calls"]
    assert t["parts"]["prefill"]["calls"] == 1  # the prompts; a prefill made by a decode call is part of it
    assert (tmp_path / "rollout_trace_rounds.json.gz").exists()


@pytest.mark.parametrize("field, value, message", [
    ("scheduler", "ppo", "unknown rollout scheduler 'ppo'"),
    ("penalty_scope", "batch", "penalty_scope must be 'question' or 'path', got 'batch'"),
    ("group_size", 0, "group_size and initial_rollouts must be >= 1, got 0, 6"),
    ("overlap_min_running", -1, "overlap_min_running must be >= 0, got -1"),
])
def test_rollout_config_rejects_bad_values_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        rollout_lib.RolloutConfig(**{field: value})
