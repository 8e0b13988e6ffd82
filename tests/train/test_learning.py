"""The CPU demo's learning run, shortened: RL must raise the reward (issue: built-in demo).

The demo world's cold-start traces come from an imperfect teacher: `world.DEMO_GUESS_FRACTION` of them
answer with a guess instead of searching, so after SFT the policy guesses about that often, decided by one
token after its first thought. A guess earns 0 and a searched, right answer 1, so RL that works raises the
share of searching trajectories and with it the reward of the same questions. This test runs that loop
through `python -m aepo_jax.train` as the README's demo does, shortened for CI: SFT on the single-hop
questions' traces only (the shortest, so the reading they need is learned in a few hundred steps), then
AEPO RL on eight fixed single-hop training questions x k = 8. A broken sign, mask, advantage or rollout
alignment anywhere in the loop leaves the reward flat or lowers it.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from aepo_jax.data import world as world_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SFT_STEPS, RL_STEPS = 500, 10
TEMPLATES = ("single_city", "single_colour", "single_ally", "single_founded")


@pytest.mark.slow
def test_rl_raises_the_reward_of_the_demo(tmp_path):
    workdir = tmp_path / "run"
    paths = world_lib.build_demo(workdir / "world", seed=0)  # the trainer reuses the world it finds there
    world = world_lib.make_world(0)
    sft = pathlib.Path(paths["sft.jsonl"]).read_text().splitlines()
    train = pathlib.Path(paths["train.jsonl"]).read_text().splitlines()
    single = [i for i, q in enumerate(world.train) if q.template in TEMPLATES]
    (tmp_path / "sft.jsonl").write_text("".join(sft[i] + "\n" for i in single))
    (tmp_path / "questions.jsonl").write_text("".join(train[i] + "\n" for i in single[:8]))
    done = subprocess.run(
        [sys.executable, "-m", "aepo_jax.train", "--flagfile=configs/cpu_demo.flags", f"--workdir={workdir}",
         f"--sft_file={tmp_path / 'sft.jsonl'}", f"--train_file={tmp_path / 'questions.jsonl'}",
         f"--sft_steps={SFT_STEPS}", "--max_seq_len=192", f"--rl_steps={RL_STEPS}", "--questions_per_step=8",
         "--group_size=8", "--learning_rate=1e-3", "--eval_every=0", "--eval_questions=4", "--eval_k=1",
         "--checkpoint_every=1000", "--dump_every=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, env=dict(os.environ, XLA_FLAGS=""))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics" / "metrics.jsonl").read_text().splitlines()]
    rl = {row["step"] - SFT_STEPS: row for row in rows if "rl/reward/mean" in row}
    assert sorted(rl) == list(range(1, RL_STEPS + 1))
    reward = np.array([rl[s]["rl/reward/mean"] for s in sorted(rl)])
    searched = np.array([rl[s]["rl/rollout/tool_calls_per_traj"] for s in sorted(rl)])
    print("reward", reward.round(3), "tool calls", searched.round(3))
    assert searched[:3].mean() < 0.9, "after SFT the policy already always searches: nothing for RL to learn"
    assert searched[-3:].mean() > searched[:3].mean() + 0.1, f"RL did not make the policy search more: {searched}"
    assert reward[-3:].mean() > reward[:3].mean() + 0.1, f"RL did not raise the reward: {reward}"
