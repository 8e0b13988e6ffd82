"""The agentic rollout: questions x k trajectories in engine slots, tools run between compiled decode calls.

Loop (AEPO_SPEC.md section 1): prefill the prompts, decode until slots stop (a tool tag, EOS, or the length
budget), run the stopped slots' tool calls concurrently in a thread pool, append
` <result>\\n{text}\\n</result>` into the same slots (the KV cache is kept: the next decode call absorbs
only those tokens, inside its loop while the other slots decode, see `Engine.decode`), continue. Two
orders, both deterministic (the token streams and every decision depend on device results and program
order, never on timing):
  tool_overlap=True   (default) queue the next decode call before reading the last one's result: the
                      host's work (reading results, parsing, tool calls, branching) and the tools run
                      while the device decodes the other slots, and the results join the call after. The
                      calling slots idle one extra call; the device never waits for the host or a slow
                      tool. With short calls (wait_fraction 0.125 against the sync order's 0.25, session
                      7 of docs/benchmarks.md; H100, 1.7B) this is the faster order. It applies only
                      while at least overlap_min_running slots run: with fewer, the queued call lasts
                      until one of the few others stops, and its length, not the device's occupancy,
                      sets the last trajectories' pace, so the loop reads first (session 10).
  tool_overlap=False  read the result, wait for the tools, then dispatch the next decode call with their
                      results: a calling slot idles only until the current call returns, but the device
                      idles while the host works.
In both, with defer_appends, a decode call takes the tool results that fit its lane only in whole lane steps
(a multiple of the engine's lane_rows; all of them when there are no more): a lane step's device time hardly
depends on how many rows it fills (H100, 1.7B: +1.75 ms for one result, +2.03 for four, +3.97 for eight in
two steps; docs/benchmarks.md session 19). The fewer than lane_rows left over join the next call first;
among the others, the trajectories with the shortest responses (the most budget left) go first. Results
longer than the lane's capacity are prefilled by the engine and never wait.

Trajectories carry what training needs, built once here and never re-tokenised: prompt and response ids,
the loss mask (1 on sampled tokens, 0 on tool results), the sampler's log-probs and full-vocabulary
entropies, the tool calls and their outcomes, and tree links (parent, branch point).

Schedulers (section 3):
  grpo  k independent samples per question.
  arpo  m = initial_rollouts global samples; after each tool call, once the next segment has its first w
        tokens, branch with P = clip(0.5 + gamma dH) (dH = segment signal - the trajectory's H_initial).
  aepo  entropy pre-monitoring: one probe trajectory per question gives H_root (its first segment) and
        H_tool (mean signal of its post-tool segments); m = clip(floor(k sigmoid(beta (H_root - H_tool)))
        + 1, 1, k); the probe is kept as one of the m samples (reuse_probe). Branching as arpo with the
        consecutive-branch penalty: p = clip((u + gamma dH) max(0, 1 - lambda l)), branch iff p >= tau.
A branch is a fork of the parent's slot (a copy of its KV cache) rewound to the end of the tool result,
so it re-samples the segment after the tool call with its own RNG; the prefix is never re-prefilled (the
last prefix token is re-run once to recompute the next-token state: the next decode call appends it with the
round's tool results). Every question ends with exactly k
trajectories: when all of its paths end before k exist, fresh ones start from the question.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Mapping, Sequence

import numpy as np

from aepo_jax.agent.parsing import ToolCall, pending_tool_call, result_block
from aepo_jax.agent.tools import run_tool_call
from aepo_jax.agent.tools.base import Tool
from aepo_jax.core import rollout_math
from aepo_jax.engine import SamplingParams

SCHEDULERS = ("grpo", "arpo", "aepo")
TOOL_STOPS = ("</search>", "</python>")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    scheduler: str = "aepo"
    group_size: int = 12            # k
    initial_rollouts: int = 6       # m when pre-monitoring is off (arpo, or aepo with pre_monitor=False)
    pre_monitor: bool = True
    reuse_probe: bool = True
    budget_beta: float = 0.5
    branch_gamma: float = 0.2
    branch_tau: float = 0.5
    branch_lambda: float = 0.05
    penalty_scope: str = "question"  # consecutive-branch count per question (released code) or per path
    entropy_window: int = 20
    entropy_reduction: str = "mean"
    max_tool_calls: int = 6
    max_response_tokens: int = 4096
    sampling: SamplingParams = SamplingParams()
    decode_chunk: int = 64
    wait_fraction: float = 0.0625
    tool_overlap: bool = True        # queue the next decode call before reading the last (module docstring)
    overlap_min_running: int = 8     # ... but only while at least this many slots run (module docstring)
    defer_appends: bool = True       # tool results in whole lane steps per decode call (module docstring)

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown rollout scheduler {self.scheduler!r}; known: {list(SCHEDULERS)}")
        if self.penalty_scope not in ("question", "path"):
            raise ValueError(f"penalty_scope must be 'question' or 'path', got {self.penalty_scope!r}")
        if self.overlap_min_running < 0:
            raise ValueError(f"overlap_min_running must be >= 0, got {self.overlap_min_running}")
        if self.group_size < 1 or self.initial_rollouts < 1:
            raise ValueError(f"group_size and initial_rollouts must be >= 1, got {self.group_size}, "
                             f"{self.initial_rollouts}")


@dataclasses.dataclass
class ToolCallRecord:
    tag: str
    payload: str
    result: str
    ok: bool
    error_kind: str | None
    seconds: float
    position: int  # response index where the appended result block starts


@dataclasses.dataclass
class Trajectory:
    question: int
    prompt: list[int]
    response: list[int] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)          # 1 = sampled by the policy
    logprobs: list[float] = dataclasses.field(default_factory=list)    # sampler log-prob (0 if mask 0)
    entropies: list[float] = dataclasses.field(default_factory=list)   # sampler entropy (0 if mask 0)
    tool_calls: list[ToolCallRecord] = dataclasses.field(default_factory=list)
    segment_starts: list[int] = dataclasses.field(default_factory=lambda: [0])
    segment_signals: list[float] = dataclasses.field(default_factory=list)
    parent: int = -1          # index in the question's group of the trajectory this one branched from
    branch_point: int = 0     # response tokens shared with the parent
    finish_reason: str | None = None
    is_probe: bool = False
    consecutive: int = 0      # consecutive branching decisions on this path (penalty_scope='path')
    index: int = -1           # position in the question's group

    @property
    def h_initial(self) -> float | None:
        return self.segment_signals[0] if self.segment_signals else None

    def clone_prefix(self, length: int) -> "Trajectory":
        """A child sharing the first `length` response tokens (and everything attached to them)."""
        return Trajectory(
            question=self.question, prompt=self.prompt, response=self.response[:length],
            mask=self.mask[:length], logprobs=self.logprobs[:length], entropies=self.entropies[:length],
            tool_calls=[c for c in self.tool_calls if c.position < length],
            segment_starts=[s for s in self.segment_starts if s <= length],
            segment_signals=self.segment_signals[:sum(s < length for s in self.segment_starts)],
            branch_point=length, consecutive=self.consecutive)


@dataclasses.dataclass
class RolloutResult:
    groups: list[list[Trajectory]]  # per question, exactly k trajectories (group order = creation order)
    metrics: dict[str, float]
    decisions: list[tuple[float, int, bool]]  # every branching decision: (dH, l, branched)


class _Run:
    """State of one `rollout` call."""

    def __init__(self, engine, tokenizer, tools: Mapping[str, Tool], prompts: Sequence[Sequence[int]],
                 config: RolloutConfig, executor: concurrent.futures.Executor, seed: int):
        self.engine, self.tokenizer, self.tools, self.config = engine, tokenizer, tools, config
        self.executor = executor
        self.prompts = [list(p) for p in prompts]
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.seed = seed
        self.groups: list[list[Trajectory]] = [[] for _ in prompts]
        self.pending: list[Trajectory] = []        # waiting for a free slot
        self.slot_of: dict[int, Trajectory] = {}   # occupied slot -> trajectory
        self.ended: list[int] = []                 # slots of finished trajectories, released in one call
        self.appends: dict[int, list[int]] = {}   # slot -> token ids the next decode call appends
        self.deferred: set[int] = set()            # slots whose appends the last decode call left pending
        self.status: dict[int, str] = {}           # slot -> 'running' | 'tool'
        self.awaiting: dict[int, int] = {}         # slot -> response index of the segment to judge
        self.question_consecutive = [0] * len(prompts)
        self.decisions: list[tuple[float, int, bool]] = []  # (dH, consecutive count l, branched)
        self.stats = dict(branches=0, no_slot=0, tool_idle_s=0.0, decode_calls=0, decode_steps=0,
                          decode_tokens=0, lane_steps=0, branch_tool_index=[], tool_signals=[])
        self.branching = config.scheduler != "grpo"
        self.probing = False                       # AEPO pre-monitoring phase: no branching, no refill
        self.lam = config.branch_lambda if config.scheduler == "aepo" else 0.0
        self.vocab_size = engine.config.vocab_size

    # ---------------------------------------------------------------------------------------- slots

    def _new(self, question: int, probe: bool = False) -> Trajectory:
        group = self.groups[question]
        traj = Trajectory(question=question, prompt=self.prompts[question], is_probe=probe, index=len(group))
        group.append(traj)
        self.pending.append(traj)
        return traj

    def _start_pending(self) -> None:
        free = self._free_slots()
        starts = self.pending[:len(free)]
        self.pending = self.pending[len(free):]
        if not starts:
            return
        slots = free[:len(starts)]
        seeds = [self._seed_of(t) for t in starts]
        limit = [len(t.prompt) + self.config.max_response_tokens for t in starts]
        self.engine.prefill(slots, [t.prompt for t in starts], sampling=self.config.sampling,
                            stops=list(TOOL_STOPS), max_length=limit, seed=seeds)
        for slot, traj in zip(slots, starts):
            self.slot_of[slot], self.status[slot] = traj, "running"

    def _seed_of(self, traj: Trajectory) -> int:
        return (self.seed * 1_000_003 + traj.question * 4099 + traj.index) % (2**31 - 1)

    def _finish(self, slot: int, reason: str) -> None:
        traj = self.slot_of.pop(slot)
        self.status.pop(slot)
        self.awaiting.pop(slot, None)
        traj.finish_reason = reason
        self._record_signals(traj, final=True)
        self.ended.append(slot)

    def _free_slots(self) -> list[int]:
        """Releases the slots of trajectories that ended since the last call (one engine call instead of
        one per slot: each costs a dispatch) and lists the free ones."""
        if self.ended:
            self.engine.release(self.ended)
            self.ended = []
        return self.engine.free_slots()

    # ------------------------------------------------------------------------------------- entropy

    def _signal(self, traj: Trajectory, start: int) -> float:
        window = np.asarray(traj.entropies[start:start + self.config.entropy_window], np.float32)
        if window.size == 0:
            return 0.0
        return float(rollout_math.segment_entropy(window, vocab_size=self.vocab_size,
                                                  window=self.config.entropy_window,
                                                  reduction=self.config.entropy_reduction))

    def _record_signals(self, traj: Trajectory, final: bool = False) -> None:
        """Fills in the signal of each segment whose first w tokens exist (or that ended)."""
        w = self.config.entropy_window
        while len(traj.segment_signals) < len(traj.segment_starts):
            start = traj.segment_starts[len(traj.segment_signals)]
            model_tokens = sum(traj.mask[start:])
            if model_tokens < w and not final:
                return
            if model_tokens == 0:
                return
            traj.segment_signals.append(self._signal(traj, start))

    # ------------------------------------------------------------------------------------ branching

    def _decide(self, slot: int) -> None:
        """The branching decision after a tool call, once the following segment has its signal.

        Skipped when the question already has k trajectories; a branch that finds no free slot is counted
        (`branch_no_free_slot`) and treated as no branch."""
        traj = self.slot_of[slot]
        start = self.awaiting.pop(slot)
        q = traj.question
        if len(self.groups[q]) >= self.config.group_size:
            return
        signal = traj.segment_signals[traj.segment_starts.index(start)]
        delta_h = signal - traj.h_initial
        by_path = self.config.penalty_scope == "path"
        consecutive = traj.consecutive if by_path else self.question_consecutive[q]
        branch = bool(rollout_math.should_branch(self.rng.uniform(), delta_h, consecutive,
                                                 gamma=self.config.branch_gamma, lam=self.lam,
                                                 tau=self.config.branch_tau))
        free = self._free_slots()
        if branch and not free:
            self.stats["no_slot"] += 1
            branch = False
        self.decisions.append((delta_h, consecutive, branch))
        self.stats["tool_signals"].append(signal)
        if branch:
            self._branch(slot, traj, start, free[0])
        traj.consecutive = traj.consecutive + 1 if branch else 0
        self.question_consecutive[q] = self.question_consecutive[q] + 1 if branch else 0

    def _branch(self, slot: int, parent: Trajectory, start: int, child_slot: int) -> None:
        """Forks `parent` at response index `start` (just after a tool result) into `child_slot`."""
        child = parent.clone_prefix(start)
        child.parent, child.index = parent.index, len(self.groups[parent.question])
        self.groups[parent.question].append(child)
        prefix_len = len(parent.prompt) + start
        self.engine.fork(slot, child_slot)
        self.engine.rewind(child_slot, prefix_len - 1, seed=self._seed_of(child))
        # re-running the last prefix token recomputes the next-token state; the next decode call appends it
        self.appends[child_slot] = [(parent.prompt + parent.response)[prefix_len - 1]]
        self.slot_of[child_slot], self.status[child_slot] = child, "running"
        self.stats["branches"] += 1
        self.stats["branch_tool_index"].append(len(child.tool_calls))

    # ------------------------------------------------------------------------------------ one round

    def _absorb(self, result) -> list[tuple[int, ToolCall]]:
        """Appends a decode call's tokens; returns the tool calls of slots that stopped on a tool tag."""
        result = result.fetch()
        self.stats["decode_steps"] += int(result.steps)
        self.stats["lane_steps"] += int(result.lane_steps)
        self.stats["decode_tokens"] += int(result.counts.sum())
        calls = []
        for slot in sorted(s for s, st in self.status.items() if st == "running"):
            traj = self.slot_of[slot]
            n = int(result.counts[slot])
            if n:
                traj.response += result.new_tokens(slot).tolist()
                traj.mask += [1] * n
                traj.logprobs += result.new_logprobs(slot).tolist()
                traj.entropies += result.new_entropies(slot).tolist()
                self._record_signals(traj)
            stopped = bool(result.stopped[slot])
            if slot in self.awaiting:
                if stopped:  # the segment ended before w tokens: its signal uses what it has
                    self._record_signals(traj, final=True)
                if len(traj.segment_signals) > traj.segment_starts.index(self.awaiting[slot]):
                    self._decide(slot)
                elif stopped:  # the segment after the tool call is empty: nothing to judge
                    self.awaiting.pop(slot)
            if not stopped:
                continue
            reason = result.finish_reason(slot)
            if reason not in TOOL_STOPS:
                self._finish(slot, reason)
            elif len(traj.tool_calls) >= self.config.max_tool_calls:
                self._finish(slot, "max_tool_calls")
            else:
                start = traj.segment_starts[-1]
                call = pending_tool_call(self.tokenizer.decode(traj.response[start:]))
                if call is None:
                    call = ToolCall(reason.strip("</>"), "", error=f"no opening <{reason.strip('</>')}> tag "
                                                                 f"before {reason}")
                self.status[slot] = "tool"
                calls.append((slot, call))
        return calls

    def _append_results(self, submitted, next_decode=None) -> None:
        """Waits for the tool calls and queues their results for the next decode call to append. The time the
        device sat idle meanwhile counts as tool wait: all of it without a decode call in flight, else what is
        left after that call finished."""
        for slot, call, future in submitted:
            outcome = self._wait(future, next_decode)
            traj = self.slot_of[slot]
            ids = self.tokenizer.encode(result_block(outcome.text))
            position = len(traj.response)
            traj.tool_calls.append(ToolCallRecord(call.tag, call.payload, outcome.text, outcome.ok,
                                                  outcome.error_kind, outcome.elapsed_s, position))
            if position + len(ids) >= self.config.max_response_tokens:
                self._finish(slot, "length")
                continue
            traj.response += ids
            traj.mask += [0] * len(ids)
            traj.logprobs += [0.0] * len(ids)
            traj.entropies += [0.0] * len(ids)
            traj.segment_starts.append(len(traj.response))
            self.status[slot] = "running"
            if self.branching and not traj.is_probe:
                self.awaiting[slot] = len(traj.response)
            self.appends[slot] = ids

    def _wait(self, future, next_decode):
        while next_decode is not None and not next_decode.ready():
            try:
                return future.result(timeout=0.002)
            except concurrent.futures.TimeoutError:
                pass
        waited = time.perf_counter()
        outcome = future.result()
        self.stats["tool_idle_s"] += time.perf_counter() - waited
        return outcome

    def _refill(self) -> None:
        """Questions whose paths all ended before k trajectories exist get fresh ones."""
        alive = {t.question for t in self.slot_of.values()} | {t.question for t in self.pending}
        for q, group in enumerate(self.groups):
            if q not in alive:
                for _ in range(self.config.group_size - len(group)):
                    self._new(q)

    def _running(self) -> int:
        """Slots that run or will once their pending appends are in."""
        return sum(st == "running" for st in self.status.values())

    def _next_appends(self) -> dict[int, list[int]]:
        """The appends the next decode call takes. With defer_appends, of those that fit the engine's lane, only
        whole lane steps' worth (a multiple of lane_rows, at least lane_rows): results deferred last time
        first, then the trajectories with the shortest responses. So fewer than lane_rows wait, once each."""
        rows = self.engine.lane_rows
        laned = [s for s, ids in self.appends.items() if len(ids) <= self.engine.lane_capacity]
        if not self.config.defer_appends or len(laned) <= rows:
            appends, self.appends, self.deferred = self.appends, {}, set()
            return appends
        order = sorted(laned, key=lambda s: (s not in self.deferred, len(self.slot_of[s].response), s))
        self.deferred = set(order[len(laned) // rows * rows:])
        appends = {s: ids for s, ids in self.appends.items() if s not in self.deferred}
        self.appends = {s: ids for s, ids in self.appends.items() if s in self.deferred}
        return appends

    def _decode(self):
        if not self._running():
            return None
        self.stats["decode_calls"] += 1
        return self.engine.decode(self.config.decode_chunk, wait_fraction=self.config.wait_fraction,
                                  appends=self._next_appends())

    def _submit(self, calls):
        return [(slot, call, self.executor.submit(run_tool_call, call, self.tools)) for slot, call in calls]

    def loop(self) -> None:
        """Decodes until every trajectory (and every refill) has finished."""
        if not self.probing:  # e.g. pre-monitoring gave m = 1 everywhere and its probes already ended
            self._refill()
        if self.config.tool_overlap:
            return self._overlapped_loop()
        while True:
            self._start_pending()
            result = self._decode()
            if result is None:
                break
            self._append_results(self._submit(self._absorb(result)))
            if not self.probing:
                self._refill()

    def _overlapped_loop(self) -> None:
        """tool_overlap: the next decode call is queued before the last one's result is read, so reading it,
        the tool calls, branching and refills all happen while the device decodes (a decode call returns
        once launched, see `Engine`); the results of the tools called in call n are appended in call n + 2."""
        self._start_pending()
        in_flight = self._decode()
        while in_flight is not None:
            # appends the tool results of the call before in_flight; with few slots left, read first
            following = self._decode() if self._running() >= self.config.overlap_min_running else None
            submitted = self._submit(self._absorb(in_flight))
            if not self.probing:
                self._refill()
            self._start_pending()
            self._append_results(submitted, following)
            # None: nothing ran when it would have been queued; the tool results may make slots run again
            in_flight = following if following is not None else self._decode()

    # ---------------------------------------------------------------------------------------- phases

    def run(self) -> RolloutResult:
        start = time.perf_counter()
        k, config = self.config.group_size, self.config
        m = [k if config.scheduler == "grpo" else min(config.initial_rollouts, k)] * len(self.prompts)
        if config.scheduler == "aepo" and config.pre_monitor:
            self.probing = True
            probes = [self._new(q, probe=True) for q in range(len(self.prompts))]
            self.loop()
            self.probing = False
            m = [self._budget(p) for p in probes]
            if not config.reuse_probe:
                for p in probes:
                    self.groups[p.question].remove(p)
                    p.index = -1
                for group in self.groups:
                    for i, t in enumerate(group):
                        t.index = i
        for q in range(len(self.prompts)):
            for _ in range(m[q] - len(self.groups[q])):
                self._new(q)
        self.loop()
        self._free_slots()
        groups = [g[:k] for g in self.groups]
        assert all(len(g) == k for g in groups), [len(g) for g in groups]
        return RolloutResult(groups, self._metrics(groups, m, time.perf_counter() - start), self.decisions)

    def _budget(self, probe: Trajectory) -> int:
        """m of AEPO's pre-monitoring from one probe trajectory (H_tool = H_root if it made no tool call)."""
        h_root = probe.h_initial if probe.h_initial is not None else 0.0
        tool_signals = probe.segment_signals[1:]
        h_tool = float(np.mean(tool_signals)) if tool_signals else h_root
        return int(rollout_math.budget_split(self.config.group_size, h_root, h_tool, self.config.budget_beta))

    def _metrics(self, groups, m, seconds) -> dict[str, float]:
        trajs = [t for g in groups for t in g]
        calls = [c for t in trajs for c in t.tool_calls]
        sampled = sum(sum(t.mask) for t in trajs)
        mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0
        return {
            "rollout/seconds": seconds,
            "rollout/sampled_tokens_per_s": sampled / max(seconds, 1e-9),
            "rollout/tool_calls_per_traj": len(calls) / len(trajs),
            "rollout/tool_errors": float(sum(not c.ok for c in calls)),
            "rollout/tool_timeouts": float(sum(c.error_kind == "timeout" for c in calls)),
            "rollout/tool_wait_fraction": self.stats["tool_idle_s"] / max(seconds, 1e-9),
            "rollout/branches_per_question": self.stats["branches"] / len(groups),
            "rollout/branch_decisions": float(len(self.decisions)),
            "rollout/branch_mean_tool_index": mean(self.stats["branch_tool_index"]),
            "rollout/branch_no_free_slot": float(self.stats["no_slot"]),
            "rollout/entropy_at_tool_steps": mean(self.stats["tool_signals"]),
            "rollout/initial_entropy": mean([t.h_initial for t in trajs if t.h_initial is not None]),
            "rollout/global_samples": mean(m),
            "rollout/response_length": mean([len(t.response) for t in trajs]),
            "rollout/truncation_rate": mean([t.finish_reason == "length" for t in trajs]),
            "rollout/max_tool_calls_rate": mean([t.finish_reason == "max_tool_calls" for t in trajs]),
            "rollout/decode_calls": float(self.stats["decode_calls"]),
            "rollout/decode_steps": float(self.stats["decode_steps"]),
            "rollout/lane_steps": float(self.stats["lane_steps"]),
            # sampled tokens per slot and decode step: how full the compiled batch was
            "rollout/slot_use": self.stats["decode_tokens"] / max(self.stats["decode_steps"]
                                                                  * self.engine.num_slots, 1),
        }


def rollout(engine, tokenizer, tools: Mapping[str, Tool], prompts: Sequence[Sequence[int]],
            config: RolloutConfig, *, executor: concurrent.futures.Executor, seed: int = 0) -> RolloutResult:
    """Generates exactly `config.group_size` trajectories for each prompt (token ids) with tools.

    The engine must have no occupied slot, the stop strings of TOOL_STOPS registered, and at least one slot.
    Deterministic for a seed: decisions depend on device results and program order, never on timing.
    """
    if engine.free_slots() != list(range(engine.num_slots)):
        raise ValueError("rollout needs an engine with every slot free")
    missing = [s for s in TOOL_STOPS if s not in engine.stop_table.names]
    if missing:
        raise ValueError(f"the engine has no stop strings {missing}; construct it with stop_strings="
                         f"{list(TOOL_STOPS)}")
    return _Run(engine, tokenizer, tools, prompts, config, executor, seed).run()

