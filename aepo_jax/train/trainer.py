"""The trainer behind `python -m aepo_jax.train`: SFT, RL (rollout -> rewards -> advantages -> updates),
evaluation, checkpoints with exact resume, metrics, HF export.

Everything it needs comes from the flag values (`aepo_jax.train.flags`), passed in as one namespace.
Resume: the newest intact checkpoint in <workdir>/checkpoints holds the train state (params, optimiser
state, step) and metadata (phase, step within the phase, data position). Rollout randomness derives from
(seed, phase, step), so a resumed run repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from types import SimpleNamespace
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding

from aepo_jax.agent import rollout as rollout_lib
from aepo_jax.agent.tools import HttpSearchTool, PythonTool, SearchTool
from aepo_jax.core import advantages as adv_lib
from aepo_jax.data import datasets, rewards, tokenizer as tok_lib, world as world_lib
from aepo_jax.engine import Engine, SamplingParams
from aepo_jax.models import native_checkpoint, qwen3, sharding
from aepo_jax.train import distributed, step as step_lib
from aepo_jax.train.checkpoint import Checkpointer, abstract_like
from aepo_jax.train.metrics import CompilationCounter, MetricsWriter, progress_line, read_metrics, rl_report

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
PROGRESS = {"loss": "loss", "reward": "reward/mean", "acc": "accuracy", "entropy": "entropy",
            "tools/traj": "rollout/tool_calls_per_traj", "branches/q": "rollout/branches_per_question",
            "eval pass@1": "eval/pass@1", "tok/s": "tokens_per_s"}


class TrainingAborted(RuntimeError):
    """Too many non-finite updates (see --max_nonfinite_steps)."""


def _bucket(n: int, limit: int) -> int:
    """Padded batch length: the next power of two (at least 64), at most `limit`, so that only a few shapes
    (and compilations of the train step) exist however the lengths vary."""
    return min(limit, max(64, 1 << (n - 1).bit_length()))


def pack(sequences: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int, **per_token):
    """[N, length] arrays from (tokens, loss_mask) pairs, right-padded; per_token: name -> list of lists."""
    n = len(sequences)
    tokens = np.full((n, length), pad_id, np.int32)
    attention = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.float32)
    extra = {name: np.zeros((n, length), np.float32) for name in per_token}
    for i, (ids, m) in enumerate(sequences):
        tokens[i, :len(ids)] = ids
        attention[i, :len(ids)] = 1
        mask[i, :len(m)] = m
        for name, values in per_token.items():
            extra[name][i, :len(values[i])] = values[i]
    return dict(tokens=tokens, attention_mask=attention, loss_mask=mask, **extra)


def render_trajectory(tokenizer, traj: rollout_lib.Trajectory) -> str:
    """The response as text with the masked (tool-result) spans marked ⟦like this⟧."""
    out, start = [], 0
    for i in range(1, len(traj.mask) + 1):
        if i == len(traj.mask) or traj.mask[i] != traj.mask[start]:
            text = tokenizer.decode(traj.response[start:i])
            out.append(text if traj.mask[start] else f"⟦{text}⟧")
            start = i
    return "".join(out)


def use_compilation_cache(path: str | None, workdir: str) -> None:
    """Turns on JAX's persistent compilation cache in `path` (None: JAX's configured directory if any, else
    <workdir>/compilation_cache; "": off), for every program however short its compile: a resume after a
    crash or a second run of the same shapes then loads its programs (the CPU trainer test's run: 28.6 s ->
    13.7 s, docs/benchmarks.md session 26). Only process 0 writes; a cache that cannot be read or written
    costs a warning and a compile, never the run."""
    if path is None:
        path = jax.config.jax_compilation_cache_dir or os.path.join(workdir, "compilation_cache")
    jax.config.update("jax_compilation_cache_dir", path or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # programs compiled before this call (a notebook's) fixed the old setting


class Trainer:
    def __init__(self, cfg: SimpleNamespace):
        self.cfg = cfg
        if cfg.distributed:
            distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
        self.mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tp)
        self.workdir = os.path.abspath(cfg.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        use_compilation_cache(cfg.compilation_cache_dir, self.workdir)
        self._resolve_data()
        self.tokenizer = tok_lib.load_tokenizer(self.tokenizer_path)
        self.metrics = MetricsWriter(os.path.join(self.workdir, "metrics"), enabled=jax.process_index() == 0)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.keep_checkpoints)
        self.nonfinite = 0
        self.compilations = CompilationCounter()

    # ------------------------------------------------------------------------------------------ setup

    def _resolve_data(self) -> None:
        cfg = self.cfg
        paths = {}
        if cfg.demo_world:
            world_dir = os.path.join(self.workdir, "world")
            if not os.path.exists(os.path.join(world_dir, "world.json")):
                paths = world_lib.build_demo(world_dir, seed=cfg.seed, overwrite=True)
            else:
                paths = {name: os.path.join(world_dir, name) for name in
                         ("corpus.jsonl", "train.jsonl", "heldout.jsonl", "sft.jsonl", "tokenizer.model")}
        pick = lambda flag, name: flag or paths.get(name)
        self.train_file = pick(cfg.train_file, "train.jsonl")
        self.eval_file = pick(cfg.eval_file, "heldout.jsonl")
        self.sft_file = pick(cfg.sft_file, "sft.jsonl")
        self.corpus_file = pick(cfg.corpus_file, "corpus.jsonl")
        self.tokenizer_path = cfg.tokenizer_path or paths.get("tokenizer.model") or cfg.model_path
        if self.tokenizer_path is None:
            raise ValueError("no tokenizer: set --tokenizer_path, --model_path or --demo_world")
        # Read (and so validate) every data file before any compute.
        needs_rl = cfg.mode in ("rl", "sft_then_rl")
        needs_sft = cfg.mode in ("sft", "sft_then_rl")
        if needs_sft and not self.sft_file:
            raise ValueError(f"--mode={cfg.mode} needs --sft_file (or --demo_world)")
        if needs_rl and not self.train_file:
            raise ValueError(f"--mode={cfg.mode} needs --train_file (or --demo_world)")
        self.sft_records = datasets.read_sft_jsonl(self.sft_file) if needs_sft else []
        self.train_records = datasets.read_qa_jsonl(self.train_file) if needs_rl else []
        self.eval_records = datasets.read_qa_jsonl(self.eval_file) if needs_rl and self.eval_file else []
        if needs_rl and not (self.corpus_file or cfg.search_url):
            raise ValueError("RL needs a search backend: --corpus_file or --search_url (or --demo_world)")

    def _make_model(self) -> qwen3.Qwen3:
        cfg = self.cfg
        dtype, param_dtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        if cfg.model_path:
            if os.path.isdir(os.path.join(cfg.model_path, "params")):
                model = native_checkpoint.load_params(cfg.model_path, dtype=dtype, param_dtype=param_dtype)
            else:
                model = qwen3.load_pretrained(cfg.model_path, dtype=dtype, param_dtype=param_dtype)
        else:
            preset = cfg.model_preset or ("demo" if cfg.demo_world else None)
            if preset is None:
                raise ValueError("no model: set --model_path or --model_preset")
            config = (world_lib.demo_model_config(self.tokenizer.vocab_size) if preset == "demo"
                      else qwen3.preset(preset))
            model = qwen3.Qwen3(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(cfg.seed))
        model.remat = cfg.remat
        model.attention = self._attention_impl(dtype)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocabulary "
                             f"is {model.config.vocab_size}")
        return model

    def _attention_impl(self, dtype) -> str:
        """cuDNN's fused attention needs a GPU and 16-bit compute; the batches here are right-padded."""
        choice = self.cfg.attention
        fits = jax.devices()[0].platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
        if choice == "cudnn" and not fits:
            raise ValueError(f"--attention=cudnn needs a GPU and --compute_dtype=bfloat16 (here: "
                             f"{jax.devices()[0].platform}, {jnp.dtype(dtype).name})")
        return choice if choice != "auto" else ("cudnn" if fits else "xla")

    def _place(self, state: step_lib.TrainState) -> tuple[step_lib.TrainState, Any]:
        specs = sharding.partition_specs(state, self.mesh)
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        if jax.process_count() > 1:
            return distributed.global_arrays(jax.device_get(state), shardings), shardings
        return jax.device_put(state, shardings), shardings

    def _batch_to_device(self, arrays: dict[str, np.ndarray]):
        """Host arrays for the jitted step: global arrays when the mesh spans several processes."""
        if jax.process_count() > 1:
            return distributed.global_arrays(arrays, sharding.batch_sharding(self.mesh))
        return arrays

    def _compile_step(self, optimizer, loss_config, shardings):
        return step_lib.jit_train_step(self.graphdef, optimizer, loss_config, shardings,
                                       sharding.batch_sharding(self.mesh))

    # -------------------------------------------------------------------------------------- run

    def run(self) -> dict[str, float]:
        cfg = self.cfg
        model = self._make_model()
        print(qwen3.config_summary(model.config), "| mesh", dict(self.mesh.shape), flush=True)
        sft_optimizer = step_lib.make_optimizer(cfg.sft_learning_rate, weight_decay=cfg.weight_decay,
                                                grad_clip=cfg.grad_clip, warmup_steps=cfg.warmup_steps)
        self.graphdef, state = step_lib.init_train_state(model, sft_optimizer)
        state, self.shardings = self._place(state)
        phases = {"sft": ["sft"], "rl": ["rl"], "sft_then_rl": ["sft", "rl"]}[cfg.mode]
        phase, phase_step, position = phases[0], 0, None
        restored = self.checkpointer.restore_latest(abstract_like(state))
        if restored is not None:
            _, state, meta = restored
            phase, phase_step, position = meta["phase"], meta["phase_step"], meta.get("data_position")
            print(f"resumed from {self.checkpointer.directory}: {phase} step {phase_step}", flush=True)
        summary: dict[str, float] = {}
        for name in phases[phases.index(phase):]:
            start = phase_step if name == phase else 0
            if name == "sft":
                state = self._sft(state, sft_optimizer, start, position)
            else:
                if phase != "rl":  # fresh RL phase: new optimiser state
                    state = self._fresh_optimizer(state)
                state, summary = self._rl(state, start, position if phase == "rl" else None)
            position = None
        self.checkpointer.close()
        self.metrics.close()
        if "rl" in phases and self.metrics.enabled:
            print(rl_report(read_metrics(os.path.join(self.metrics.logdir, "metrics.jsonl")),
                            self._global_step("rl", 0)), flush=True)
        if cfg.export_hf_dir and jax.process_index() == 0:
            qwen3.save_pretrained(nnx.merge(self.graphdef, state.params), cfg.export_hf_dir, overwrite=True)
            print(f"exported the model to {cfg.export_hf_dir}", flush=True)
        return summary

    def _rl_optimizer(self):
        cfg = self.cfg
        return step_lib.make_optimizer(cfg.learning_rate, weight_decay=cfg.weight_decay,
                                       grad_clip=cfg.grad_clip, warmup_steps=cfg.warmup_steps)

    def _fresh_optimizer(self, state):
        state = step_lib.TrainState(params=state.params, opt_state=self._rl_optimizer().init(state.params),
                                    step=jnp.zeros((), jnp.int32))
        return self._place(state)[0]

    def _global_step(self, phase: str, phase_step: int) -> int:
        """Steps since the run began: RL steps count after the SFT steps of an sft_then_rl run."""
        return phase_step + (self.cfg.sft_steps if phase == "rl" and self.cfg.mode == "sft_then_rl" else 0)

    def _save(self, state, phase: str, phase_step: int, sampler: datasets.EpochSampler) -> None:
        self.checkpointer.save(self._global_step(phase, phase_step), state,
                               {"phase": phase, "phase_step": phase_step, "data_position": sampler.position})

    def _check_finite(self, metrics) -> None:
        if float(metrics["skipped"]):
            self.nonfinite += 1
            log.warning("non-finite loss or gradient: update skipped (%d so far)", self.nonfinite)
            if self.nonfinite >= self.cfg.max_nonfinite_steps:
                raise TrainingAborted(f"{self.nonfinite} non-finite updates (--max_nonfinite_steps="
                                      f"{self.cfg.max_nonfinite_steps})")

    # -------------------------------------------------------------------------------------- SFT

    def _sft_example(self, record: datasets.SFTRecord) -> tuple[list[int], list[int]]:
        prompt = (world_lib.encode_prompt(self.tokenizer, record.question, self.cfg.prompt_format)
                  if record.question is not None else self.tokenizer.encode(record.prompt))
        response, mask = tok_lib.encode_response(self.tokenizer, record.response)
        return prompt + response, [0] * len(prompt) + mask

    def _sft(self, state, optimizer, start: int, position) -> step_lib.TrainState:
        cfg = self.cfg
        examples = [self._sft_example(r) for r in self.sft_records]
        too_long = [i for i, (ids, _) in enumerate(examples) if len(ids) > cfg.max_seq_len]
        if too_long:
            raise datasets.DataError(f"{self.sft_file}: {len(too_long)} records exceed --max_seq_len="
                                     f"{cfg.max_seq_len} tokens (first: record {too_long[0] + 1}, "
                                     f"{len(examples[too_long[0]][0])} tokens)")
        sampler = datasets.EpochSampler(len(examples), seed=cfg.seed)
        if position:
            sampler.restore(position)
        step_fn = self._compile_step(optimizer, step_lib.LossConfig(mode="sft", microbatches=cfg.micro_batches),
                                     self.shardings)
        for step in range(start + 1, cfg.sft_steps + 1):
            t0 = time.perf_counter()
            batch = [examples[i] for i in sampler.next_batch(cfg.sft_batch_size)]
            length = _bucket(max(len(ids) for ids, _ in batch), cfg.max_seq_len)
            arrays = pack(batch, length, self.tokenizer.pad_id)
            state, metrics = step_fn(state, self._batch_to_device(arrays))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self._check_finite(metrics)
            metrics["tokens_per_s"] = float(arrays["attention_mask"].sum()) / (time.perf_counter() - t0)
            self._log("sft", step, cfg.sft_steps, metrics)
            if step % cfg.checkpoint_every == 0 or step == cfg.sft_steps:
                self._save(state, "sft", step, sampler)
        return state

    # --------------------------------------------------------------------------------------- RL

    def _tools(self):
        cfg = self.cfg
        search = (HttpSearchTool(cfg.search_url, top_k=cfg.search_top_k) if cfg.search_url
                  else SearchTool(corpus=self.corpus_file, top_k=cfg.search_top_k))
        return {"search": search, "python": PythonTool(timeout_s=cfg.python_timeout)}

    def _engine(self, slots: int, params) -> Engine:
        cfg = self.cfg
        max_len = cfg.max_prompt_tokens + cfg.max_response_tokens
        return Engine(nnx.merge(self.graphdef, self._engine_params(params)), num_slots=slots,
                      max_len=max_len, eos_ids=[self.tokenizer.eos_id],
                      stop_strings=list(rollout_lib.TOOL_STOPS), tokenizer=self.tokenizer, seed=cfg.seed,
                      lane_rows=cfg.lane_rows, lane_width=cfg.lane_width)

    def _engine_params(self, params):
        """The engine's weights: the train state's params in the compute dtype (a device-side cast)."""
        dtype = DTYPES[self.cfg.compute_dtype]
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

    def _rollout_config(self, scheduler: str, k: int, sampling: SamplingParams) -> rollout_lib.RolloutConfig:
        cfg = self.cfg
        return rollout_lib.RolloutConfig(
            scheduler=scheduler, group_size=k, initial_rollouts=min(cfg.initial_rollouts, k),
            pre_monitor=cfg.pre_monitor, reuse_probe=cfg.reuse_probe, budget_beta=cfg.budget_beta,
            branch_gamma=cfg.branch_gamma, branch_tau=cfg.branch_tau, branch_lambda=cfg.branch_lambda,
            penalty_scope=cfg.branch_penalty_scope, entropy_window=cfg.entropy_window,
            entropy_reduction=cfg.entropy_reduction, max_tool_calls=cfg.max_tool_calls,
            max_response_tokens=cfg.max_response_tokens, sampling=sampling, decode_chunk=cfg.decode_chunk,
            wait_fraction=cfg.wait_fraction, tool_overlap=cfg.tool_overlap,
            overlap_min_running=cfg.overlap_min_running, defer_appends=cfg.defer_appends)

    def _prompts(self, records) -> list[list[int]]:
        prompts = [world_lib.encode_prompt(self.tokenizer, r.question, self.cfg.prompt_format)
                   for r in records]
        for r, p in zip(records, prompts):
            if len(p) > self.cfg.max_prompt_tokens:
                raise datasets.DataError(f"{r.id}: the prompt is {len(p)} tokens > --max_prompt_tokens="
                                         f"{self.cfg.max_prompt_tokens}")
        return prompts

    def _score(self, groups, records, reward_fn):
        scored = []
        for group, record in zip(groups, records):
            texts = [self.tokenizer.decode(t.response, skip_special_tokens=True) for t in group]
            scored.append([reward_fn(text, record.answers) for text in texts])
        return scored

    def _advantages(self, rewards_flat: np.ndarray, k: int) -> np.ndarray:
        name = self.cfg.advantage
        r = jnp.asarray(rewards_flat, jnp.float32)
        if name == "grpo":
            return np.asarray(adv_lib.grpo_advantages(r, k))
        if name == "grpo_no_std":
            return np.asarray(adv_lib.grpo_advantages(r, k, scale_by_std=False))
        if name == "dr_grpo":
            return np.asarray(adv_lib.dr_grpo_advantages(r, k))
        return np.asarray(adv_lib.rloo_advantages(r, k))

    def _shape_rewards(self, task_reward: np.ndarray, trajs) -> tuple[np.ndarray, dict[str, float]]:
        """The reward the advantages use: the task reward plus DAPO's soft overlong punishment when
        --overlong_buffer > 0 (on the response length, tool results included, against --max_response_tokens)."""
        cfg = self.cfg
        if not cfg.overlong_buffer:
            return task_reward, {}
        lengths = np.array([len(t.response) for t in trajs])
        penalty = np.asarray(adv_lib.overlong_penalty(lengths, max_length=cfg.max_response_tokens,
                                                      cache_length=cfg.overlong_buffer), np.float32)
        return task_reward + penalty, {"reward/overlong_penalty": float(penalty.mean()),
                                       "reward/overlong_fraction": float((penalty < 0).mean())}

    def _drop_flat_groups(self, batch, reward: np.ndarray, k: int) -> dict[str, float]:
        """DAPO dynamic sampling (--dynamic_sampling): zeroes the loss mask of every group whose rewards are
        all equal, in place; returns the kept fraction of groups."""
        if not self.cfg.dynamic_sampling:
            return {}
        keep = np.asarray(adv_lib.dynamic_sampling_mask(jnp.asarray(reward), k))
        batch["loss_mask"][~keep] = 0
        return {"dynamic_sampling/kept_groups": float(keep.mean())}

    def _rollout_groups(self, sampler, run_rollout, reward_fn):
        """The step's questions_per_step (record, group, scores): one rollout, or with --dynamic_sampling and
        --dynamic_sampling_rounds R > 1 up to R rollouts of fresh questions, keeping the groups whose shaped
        rewards differ until there are enough (DAPO's over-sampling; flat groups fill any shortfall).
        run_rollout(records, round_index) -> RolloutResult. Returns records, groups, scores and the rollout
        metrics (seconds summed over the rounds, the other figures averaged, and the number of rounds)."""
        cfg, q, k = self.cfg, self.cfg.questions_per_step, self.cfg.group_size
        rounds = cfg.dynamic_sampling_rounds if cfg.dynamic_sampling else 1
        informative, flat, metrics = [], [], []
        for round_index in range(rounds):
            records = [self.train_records[i] for i in sampler.next_batch(q)]
            result = run_rollout(records, round_index)
            metrics.append(result.metrics)
            scored = self._score(result.groups, records, reward_fn)
            shaped, _ = self._shape_rewards(np.array([s.score for g in scored for s in g], np.float32),
                                            [t for g in result.groups for t in g])
            keep = np.asarray(adv_lib.dynamic_sampling_mask(jnp.asarray(shaped), k))[::k] | (rounds == 1)
            for item, kept in zip(zip(records, result.groups, scored), keep):
                (informative if kept else flat).append(item)
            if len(informative) >= q:
                break
        records, groups, scored = (list(x) for x in zip(*(informative + flat)[:q]))
        merged = {name: float(np.sum([m[name] for m in metrics]) if name == "rollout/seconds"
                              else np.mean([m[name] for m in metrics])) for name in metrics[0]}
        if rounds > 1:
            merged["dynamic_sampling/rounds"] = float(len(metrics))
        return records, groups, scored, merged

    def _rl(self, state, start: int, position) -> tuple[step_lib.TrainState, dict[str, float]]:
        cfg = self.cfg
        k = cfg.group_size
        sampler = datasets.EpochSampler(len(self.train_records), seed=cfg.seed + 1)
        if position:
            sampler.restore(position)
        if cfg.dynamic_sampling_rounds < 1:
            raise ValueError(f"--dynamic_sampling_rounds={cfg.dynamic_sampling_rounds} must be >= 1")
        if not 0 <= cfg.overlong_buffer <= cfg.max_response_tokens:
            raise ValueError(f"--overlong_buffer={cfg.overlong_buffer} must be in [0, --max_response_tokens="
                             f"{cfg.max_response_tokens}]")
        loss_kwargs = {"kl_coef": cfg.kl_coef, "kl_estimator": cfg.kl_estimator, "entropy_coef": cfg.entropy_coef}
        if cfg.clip_eps_low is not None:
            loss_kwargs["clip_eps_low"] = cfg.clip_eps_low
        if cfg.clip_eps_high is not None:
            loss_kwargs["clip_eps_high"] = cfg.clip_eps_high
        loss_config = step_lib.LossConfig(
            mode="rl", policy_loss=cfg.policy_loss, loss_kwargs=tuple(sorted(loss_kwargs.items())),
            entropy_advantage_alpha=cfg.entropy_advantage_alpha, temperature=cfg.temperature,
            microbatches=cfg.micro_batches)
        step_fn = self._compile_step(self._rl_optimizer(), loss_config, self.shardings)
        logprob_fn = jax.jit(lambda p, b: step_lib.sequence_logprobs(self.graphdef, p, b,
                                                                      temperature=cfg.temperature,
                                                                      vocab_chunk=loss_config.vocab_chunk)[0])
        reference = self._reference(state.params, start) if cfg.kl_coef > 0 else None
        slots = cfg.rollout_slots or cfg.questions_per_step * k
        engine = self._engine(slots, state.params)
        eval_engine = None
        reward_fn = rewards.get_reward_fn(cfg.reward_fn)
        train_sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p)
        rollout_config = self._rollout_config(cfg.rollout, k, train_sampling)
        summary: dict[str, float] = {}
        with concurrent.futures.ThreadPoolExecutor(cfg.tool_threads) as executor:
            tools = self._tools()
            if start == 0 and self.eval_records:  # the starting point (e.g. SFT only) of the RL curve
                eval_engine = self._eval_engine(state.params)
                initial = self._evaluate(eval_engine, tools, executor, 0)
                self.metrics.write(self._global_step("rl", 0), {f"rl/{k}": v for k, v in initial.items()})
                print("rl start: " + ", ".join(f"{k} {v:.4g}" for k, v in initial.items()), flush=True)
            for step in range(start + 1, cfg.rl_steps + 1):
                t0 = time.perf_counter()

                def run_rollout(records, round_index, step=step):
                    seed = cfg.seed * 1_000_003 + step if round_index == 0 else int(
                        np.random.SeedSequence([cfg.seed, step, round_index]).generate_state(1)[0] >> 1)
                    return rollout_lib.rollout(engine, self.tokenizer, tools, self._prompts(records),
                                               rollout_config, executor=executor, seed=seed)

                records, groups, scored, rollout_metrics = self._rollout_groups(sampler, run_rollout, reward_fn)
                t1 = time.perf_counter()
                trajs = [t for g in groups for t in g]
                task_reward = np.array([s.score for group in scored for s in group], np.float32)
                reward, shaping = self._shape_rewards(task_reward, trajs)
                advantages = self._advantages(reward, k)
                batch = self._rl_batch(trajs, advantages)
                shaping.update(self._drop_flat_groups(batch, reward, k))
                if cfg.old_logprobs == "recompute":
                    batch["old_logprobs"] = self._aligned(logprob_fn(state.params, batch))
                if reference is not None:
                    batch["ref_logprobs"] = self._aligned(logprob_fn(reference, batch))
                t2 = time.perf_counter()
                if batch["loss_mask"].any():
                    state, update_metrics = self._update(state, step_fn, batch, step)
                    engine.set_weights(self._engine_params(state.params))
                else:  # dynamic sampling left no group: nothing to learn from, so no optimiser step
                    update_metrics = {}
                t3 = time.perf_counter()
                metrics = dict(rollout_metrics, **update_metrics, **shaping)
                metrics.update({"time/rollout_s": t1 - t0, "time/score_and_batch_s": t2 - t1,
                                "time/update_s": t3 - t2})
                metrics.update({"reward/mean": float(task_reward.mean()), "reward/std": float(task_reward.std()),
                                "accuracy": float(np.mean([s.accuracy for g in scored for s in g])),
                                "format_ok": float(np.mean([s.format_ok for g in scored for s in g])),
                                "tokens_per_s": sum(len(t.response) for t in trajs) / (time.perf_counter() - t0)})
                if self.eval_records and (step == cfg.rl_steps or cfg.eval_every and step % cfg.eval_every == 0):
                    eval_engine = eval_engine or self._eval_engine(state.params)
                    eval_engine.set_weights(self._engine_params(state.params))
                    metrics.update(self._evaluate(eval_engine, tools, executor, step))
                if cfg.dump_every and step % cfg.dump_every == 0:
                    self._dump(step, records, groups, scored)
                self._log("rl", step, cfg.rl_steps, metrics)
                summary = metrics
                if step % cfg.checkpoint_every == 0 or step == cfg.rl_steps:
                    self._save(state, "rl", step, sampler)
        return state, summary

    def _reference(self, params, start: int):
        """The KL reference: the policy as RL began. Saved to <workdir>/reference at RL step 0 and read back
        when a run resumes mid-RL (the latest checkpoint holds the current policy, not the reference)."""
        path = os.path.join(self.workdir, "reference")
        if start == 0:
            native_checkpoint.save_params(nnx.merge(self.graphdef, params), path, overwrite=True)
            return jax.tree.map(jnp.copy, params)  # its own buffers: the train step donates the policy's
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: the KL reference saved when RL began is missing, so a run with "
                                    f"--kl_coef > 0 cannot resume at RL step {start}")
        dtypes = {a.dtype for a in jax.tree.leaves(params)}
        restored = native_checkpoint.load_params(path, param_dtype=dtypes.pop())
        return jax.device_put(nnx.state(restored, nnx.Param), self.shardings.params)

    def _aligned(self, logprobs_tail) -> np.ndarray:
        """[N, T-1] per-target values -> [N, T] aligned with tokens (column 0 unused)."""
        tail = np.asarray(logprobs_tail)
        return np.concatenate([np.zeros_like(tail[:, :1]), tail], axis=1)

    def _rl_batch(self, trajs, advantages) -> dict[str, np.ndarray]:
        cfg = self.cfg
        seqs = [(t.prompt + t.response, [0] * len(t.prompt) + t.mask) for t in trajs]
        length = _bucket(max(len(ids) for ids, _ in seqs), cfg.max_prompt_tokens + cfg.max_response_tokens)
        old = [[0.0] * len(t.prompt) + t.logprobs for t in trajs]
        batch = pack(seqs, length, self.tokenizer.pad_id, old_logprobs=old)
        if cfg.hard_attribution:
            batch["advantages"] = self._hard_attribution(trajs, advantages, length)
        else:
            batch["advantages"] = advantages.astype(np.float32)
        return batch

    def _hard_attribution(self, trajs, advantages, length) -> np.ndarray:
        k = self.cfg.group_size
        out = np.zeros((len(trajs), length), np.float32)
        for g in range(0, len(trajs), k):
            group = trajs[g:g + k]
            parent = np.array([t.parent for t in group], np.int32)
            branch_point = np.array([len(t.prompt) + t.branch_point if t.parent >= 0 else 0 for t in group],
                                    np.int32)
            out[g:g + k] = np.asarray(adv_lib.hard_attribution_advantages(
                jnp.asarray(advantages[g:g + k]), jnp.asarray(parent), jnp.asarray(branch_point), length))
        return out

    def _update(self, state, step_fn, batch, step: int):
        """mini_batches optimiser steps over a fixed-seed shuffle of the rollout batch."""
        cfg = self.cfg
        n = batch["tokens"].shape[0]
        m = cfg.mini_batches
        if n % m:
            raise ValueError(f"{n} trajectories per step are not divisible into --mini_batches={m}")
        order = np.random.default_rng([cfg.seed, step, 7]).permutation(n)
        sums: dict[str, float] = {}
        for chunk in np.split(order, m):
            mini = {name: array[chunk] for name, array in batch.items()}
            state, metrics = step_fn(state, self._batch_to_device(mini))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self._check_finite(metrics)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value / m
        return state, sums

    # ------------------------------------------------------------------------------- evaluation

    def _eval_engine(self, params) -> Engine:
        return self._engine(min(self.cfg.eval_questions, len(self.eval_records)) * self.cfg.eval_k, params)

    def _evaluate(self, engine, tools, executor, step: int) -> dict[str, float]:
        """pass@1 (mean exact-match accuracy over k samples) and pass@k on held-out questions."""
        cfg = self.cfg
        records = self.eval_records[:cfg.eval_questions]
        sampling = SamplingParams(temperature=cfg.eval_temperature, top_p=0.95, top_k=20)
        config = self._rollout_config("grpo", cfg.eval_k, sampling)
        result = rollout_lib.rollout(engine, self.tokenizer, tools, self._prompts(records), config,
                                     executor=executor, seed=cfg.seed * 7919 + step)
        scored = self._score(result.groups, records, rewards.get_reward_fn("exact_match"))
        correct = np.array([[s.accuracy >= 1.0 for s in g] for g in scored], np.float32)
        return {"eval/pass@1": float(correct.mean()), f"eval/pass@{cfg.eval_k}": float(correct.max(1).mean()),
                "eval/tool_calls_per_traj": result.metrics["rollout/tool_calls_per_traj"]}

    def _dump(self, step: int, records, groups, scored) -> None:
        if jax.process_index() != 0:
            return
        path = os.path.join(self.workdir, "trajectories.jsonl")
        with open(path, "a", encoding="utf-8") as f:
            for record, group, scores in zip(records, groups, scored):
                for traj, score in zip(group, scores):
                    f.write(json.dumps({
                        "step": step, "question": record.question, "answers": list(record.answers),
                        "reward": score.score, "response_tokens": len(traj.response),
                        "finish_reason": traj.finish_reason, "parent": traj.parent,
                        "branch_point": traj.branch_point,
                        "tool_calls": [dataclasses.asdict(c) for c in traj.tool_calls],
                        "text": render_trajectory(self.tokenizer, traj)}, ensure_ascii=False) + "\n")

    def _log(self, phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
        metrics = dict(metrics, compilations=float(self.compilations.take()))
        if step % self.cfg.log_every == 0 or step == total:
            prefixed = {f"{phase}/{k}": v for k, v in metrics.items()}
            self.metrics.write(self._global_step(phase, step), prefixed)
            if jax.process_index() == 0:
                print(f"{phase} " + progress_line(step, total, metrics, PROGRESS), flush=True)
