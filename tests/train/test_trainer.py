"""The trainer end to end on the demo world (tiny settings): a run, exact resume after SIGKILL, bad data.

Every run is a subprocess of `python -m aepo_jax.train` with the CPU demo flagfile, shrunk by flags.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import load_file

from aepo_jax.train.trainer import use_compilation_cache

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--flagfile=configs/cpu_demo.flags", "--sft_steps=6", "--sft_batch_size=4", "--rl_steps=4",
        "--questions_per_step=2", "--group_size=2", "--initial_rollouts=1", "--max_response_tokens=96",
        "--max_seq_len=320", "--mini_batches=2", "--eval_every=2", "--eval_questions=2", "--eval_k=2",
        "--checkpoint_every=2", "--dump_every=2", "--decode_chunk=16"]


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "aepo_jax.train", *TINY, f"--workdir={workdir}", *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device, as a user's machine
    return env


def _train(workdir, *extra, timeout=900):
    return subprocess.run(_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=_env())


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    done = _train(workdir, f"--export_hf_dir={workdir / 'hf'}")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_run_writes_metrics_dumps_and_an_hf_model(uninterrupted):
    workdir, done = uninterrupted
    rows = [json.loads(l) for l in (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and max(steps) == 6 + 4
    rl = [r for r in rows if "rl/reward/mean" in r]
    assert len(rl) == 4 and all(-1.0 <= r["rl/reward/mean"] <= 1.1 for r in rl)
    assert any("rl/eval/pass@1" in r for r in rows) and any("sft/loss" in r for r in rows)
    dumps = [json.loads(l) for l in (workdir / "trajectories.jsonl").read_text().splitlines()]
    assert len(dumps) == 2 * 2 * 2  # steps 2 and 4, 2 questions x 2 trajectories
    assert any("⟦" in d["text"] for d in dumps if d["tool_calls"])  # tool results are marked as masked
    assert "rl [4/4" in done.stdout and "reward" in done.stdout
    report = done.stdout[done.stdout.index("RL report"):]
    assert "per RL step, 1..4" in report and "pass@1" in report  # the final report, with RL steps 0, 2, 4
    assert [line.split()[0] for line in report.splitlines()[2:5]] == ["0", "2", "4"]
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "hf"), local_files_only=True)
    assert model.config.num_hidden_layers == 4
    assert os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"])  # the run stored its programs where JAX was told to


def test_the_compilation_cache_is_jaxs_setting_else_the_workdirs(tmp_path):
    """use_compilation_cache(None): the directory JAX was given (this test session's), else
    <workdir>/compilation_cache, where even a program that compiles in milliseconds is then stored; "": off."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    workdir = tmp_path / "w"
    try:
        use_compilation_cache(None, str(workdir))
        assert jax.config.jax_compilation_cache_dir == before[0] == os.environ["JAX_COMPILATION_CACHE_DIR"]
        jax.config.update("jax_compilation_cache_dir", None)
        use_compilation_cache(None, str(workdir))
        assert jax.config.jax_compilation_cache_dir == str(workdir / "compilation_cache")
        assert not (workdir / "compilation_cache").exists()
        np.testing.assert_array_equal(jax.jit(lambda x: x * 3 + 1)(np.arange(4)), [1, 4, 7, 10])
        assert os.listdir(workdir / "compilation_cache")
        use_compilation_cache("", str(workdir))
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()


def test_sigkill_then_resume_is_bit_identical(uninterrupted, tmp_path):
    straight, _ = uninterrupted
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env())
    marker = workdir / "checkpoints" / "8"   # RL step 2 (after 6 SFT steps)
    deadline = time.time() + 900
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _train(workdir, f"--export_hf_dir={workdir / 'hf'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = _tensors(straight / "hf"), _tensors(workdir / "hf")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name


def test_resume_with_a_kl_penalty_keeps_the_reference(uninterrupted, tmp_path):
    """The KL reference is the policy as RL began, also after a resume in the middle of RL."""
    runs = {}
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        workdir = tmp_path / name
        for rl_steps in stops:
            done = _train(workdir, "--kl_coef=0.5", f"--rl_steps={rl_steps}", f"--export_hf_dir={workdir / 'hf'}")
            assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = _tensors(workdir / "hf")
    assert all((runs["straight"][n] == runs["resumed"][n]).all() for n in runs["straight"])
    without_kl = _tensors(uninterrupted[0] / "hf")
    assert any((runs["straight"][n] != without_kl[n]).any() for n in without_kl)  # the penalty acted


def test_recomputed_old_logprobs_are_the_trainers_own(tmp_path):
    """--old_logprobs=recompute: the old log-probs come from the trainer's forward at the rollout's weights,
    aligned with the tokens they score. With one mini-batch per step the update starts from those weights,
    so the gap to the trainer's log-probs is zero up to float rounding and no ratio is clipped; with the
    sampler's log-probs the gap is the engine-vs-trainer difference (small in float32, but not zero)."""
    gaps = {}
    for source in ("recompute", "sampler"):
        workdir = tmp_path / source
        done = _train(workdir, f"--old_logprobs={source}", "--mini_batches=1", "--eval_every=0", "--rl_steps=2")
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(l) for l in (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()]
        rl = [r for r in rows if "rl/logprob_gap" in r]
        assert len(rl) == 2
        gaps[source] = max(r["rl/logprob_gap"] for r in rl)
        if source == "recompute":
            assert all(r["rl/clipfrac_low"] == r["rl/clipfrac_high"] == 0 for r in rl)
    assert gaps["recompute"] < 1e-5, gaps
    assert gaps["recompute"] < gaps["sampler"] < 1e-2, gaps


def test_malformed_data_fails_before_compute(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["a"]}\n{"question": "Q2?"}\n')
    done = _train(tmp_path / "w", f"--train_file={bad}", "--mode=rl", timeout=300)
    assert done.returncode != 0
    assert f"{bad}:2: missing field 'answers'" in done.stderr
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


def test_non_finite_updates_abort(tmp_path):
    done = _train(tmp_path / "w", "--mode=sft", "--sft_learning_rate=1e30", "--max_nonfinite_steps=2",
                  timeout=300)
    assert done.returncode != 0 and "non-finite updates" in done.stderr


def test_dapo_overlong_penalty_and_dynamic_sampling(tmp_path):
    """--overlong_buffer adds DAPO's soft length penalty to the reward and --dynamic_sampling drops groups with
    equal rewards from the loss (re-sampling once more with --dynamic_sampling_rounds=2): the logged figures
    equal the formulas applied to the dumped trajectories."""
    workdir = tmp_path / "dapo"
    done = _train(workdir, "--mode=rl", "--rl_steps=2", "--dump_every=1", "--eval_every=0", "--overlong_buffer=64",
                  "--dynamic_sampling", "--dynamic_sampling_rounds=2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(l) for l in (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "rl/reward/overlong_penalty" in r]
    dumped = [json.loads(l) for l in (workdir / "trajectories.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for step, row in enumerate(logged, 1):
        trajs = [t for t in dumped if t["step"] == step]
        penalty = [max(-1.0, min(0.0, (96 - 64 - t["response_tokens"]) / 64)) for t in trajs]
        assert row["rl/reward/overlong_penalty"] == pytest.approx(sum(penalty) / len(trajs), abs=1e-6)
        shaped = [t["reward"] + p for t, p in zip(trajs, penalty)]
        groups = [shaped[i:i + 2] for i in range(0, len(shaped), 2)]  # --group_size=2, dumped in group order
        kept = sum(max(g) > min(g) for g in groups) / len(groups)
        assert row["rl/dynamic_sampling/kept_groups"] == pytest.approx(kept)
        assert ("rl/loss" in row) == (kept > 0)  # no group left: no optimiser step
        if kept < 1:  # short of informative groups after the first rollout: a second one was made
            assert row["rl/dynamic_sampling/rounds"] == 2
    assert any(r["rl/reward/overlong_fraction"] > 0 for r in logged)  # the penalty acted in this run
    bad = _train(tmp_path / "bad", "--mode=rl", "--overlong_buffer=200", timeout=300)
    assert bad.returncode != 0 and "--overlong_buffer=200 must be in [0, --max_response_tokens=96]" in bad.stderr


def test_reward_shaping_and_group_dropping_by_hand():
    """The trainer's DAPO glue on hand-made trajectories: penalty 0 up to max - buffer tokens, linear to -1 at
    max, -1 beyond; a group with equal shaped rewards loses its loss mask, the others keep theirs."""
    from types import SimpleNamespace

    import numpy as np

    from aepo_jax.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(overlong_buffer=4, max_response_tokens=10, dynamic_sampling=True)
    trajs = [SimpleNamespace(response=[0] * n) for n in (6, 8, 10, 11)]
    reward, logged = trainer._shape_rewards(np.array([1.0, 1.0, 0.5, 0.0], np.float32), trajs)
    np.testing.assert_allclose(reward, [1.0, 0.5, -0.5, -1.0])  # penalties 0, -0.5, -1, -1
    assert logged == {"reward/overlong_penalty": pytest.approx(-2.5 / 4), "reward/overlong_fraction": 0.75}
    batch = {"loss_mask": np.ones((6, 3), np.float32)}
    kept = trainer._drop_flat_groups(batch, np.array([1.0, 1.0, 0.0, 1.0, 0.3, 0.3], np.float32), 2)
    assert kept == {"dynamic_sampling/kept_groups": pytest.approx(1 / 3)}
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [0, 0, 3, 3, 0, 0])
    trainer.cfg = SimpleNamespace(overlong_buffer=0, max_response_tokens=10, dynamic_sampling=False)
    same, none = trainer._shape_rewards(np.array([0.2], np.float32), trajs[:1])
    assert none == {} and same[0] == np.float32(0.2)
    assert trainer._drop_flat_groups(batch, np.zeros(6, np.float32), 2) == {}


def test_dynamic_sampling_rounds_collect_informative_groups():
    """--dynamic_sampling_rounds: fresh questions are rolled out until questions_per_step groups have unequal
    rewards (then it stops), flat groups fill a shortfall, and the rollout metrics add up over the rounds."""
    from types import SimpleNamespace

    from aepo_jax.data.datasets import EpochSampler
    from aepo_jax.train.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.train_records = [SimpleNamespace(question=f"q{i}", answers=[]) for i in range(8)]
    trainer.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: str(ids[0]))
    reward_fn = lambda text, answers: SimpleNamespace(score=float(text))
    plan = [[(1, 1), (0, 1)], [(0, 0), (1, 1)], [(0, 1), (1, 0)]]  # per round, per question: the 2 rewards
    calls = []

    def run_rollout(records, round_index):
        calls.append((round_index, [r.question for r in records]))
        groups = [[SimpleNamespace(response=[r]) for r in rewards] for rewards in plan[round_index]]
        return SimpleNamespace(groups=groups, metrics={"rollout/seconds": 1.0, "rollout/x": float(round_index)})

    def collect(rounds, dynamic=True):
        trainer.cfg = SimpleNamespace(questions_per_step=2, group_size=2, dynamic_sampling=dynamic,
                                      dynamic_sampling_rounds=rounds, overlong_buffer=0, max_response_tokens=10)
        calls.clear()
        sampler = EpochSampler(8, seed=0)
        order = sampler._order(0).tolist()
        return trainer._rollout_groups(sampler, run_rollout, reward_fn), order

    (records, groups, scored, metrics), order = collect(rounds=5)
    assert [c[0] for c in calls] == [0, 1, 2]  # stopped once two informative groups existed
    assert [r.question for r in records] == [f"q{order[1]}", f"q{order[4]}"]  # round 0's 2nd, round 2's 1st
    assert [[s.score for s in g] for g in scored] == [[0.0, 1.0], [0.0, 1.0]]
    assert metrics == {"rollout/seconds": 3.0, "rollout/x": 1.0, "dynamic_sampling/rounds": 3.0}
    (records, _, scored, metrics), order = collect(rounds=2)  # one informative group: a flat one fills in
    assert [r.question for r in records] == [f"q{order[1]}", f"q{order[0]}"]
    assert metrics["dynamic_sampling/rounds"] == 2.0
    (records, _, _, metrics), order = collect(rounds=5, dynamic=False)  # off: one rollout, as drawn
    assert len(calls) == 1 and [r.question for r in records] == [f"q{order[0]}", f"q{order[1]}"]
    assert "dynamic_sampling/rounds" not in metrics
