"""Every flagfile in configs/ resolves with --dry_run; bad flags fail with the flag's name."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGFILES = sorted((ROOT / "configs").glob("*.flags"))


def _train(*args):
    return subprocess.run([sys.executable, "-m", "aepo_jax.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_configs_exist():
    assert {p.name for p in FLAGFILES} >= {"tpu_v4.flags", "gpu_h100.flags", "gpu_h200x2.flags",
                                          "cpu_demo.flags"}


@pytest.mark.parametrize("flagfile", FLAGFILES, ids=lambda p: p.name)
def test_dry_run_resolves(flagfile):
    done = _train(f"--flagfile={flagfile}", "--dry_run")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(None, 1) for line in done.stdout.splitlines() if line and not line.startswith("mesh "))
    # every line of the flagfile is reflected in the resolved values
    for line in flagfile.read_text().splitlines():
        if line.startswith("--"):
            name, _, value = line[2:].partition("=")
            assert name in lines, name
            if value:
                assert value in lines[name] or str(float(value)) in lines[name], (name, value, lines[name])
            else:
                assert lines[name] == "True", name
    assert "mesh" in done.stdout.splitlines()[-1]


def test_bad_flag_value_is_named():
    done = _train("--rollout=ppo", "--dry_run")
    assert done.returncode != 0 and "rollout" in done.stderr and "grpo" in done.stderr
    done = _train("--not_a_flag=1", "--dry_run")
    assert done.returncode != 0 and "not_a_flag" in done.stderr


def test_attention_flag_picks_cudnn_only_where_it_runs():
    import jax
    import jax.numpy as jnp
    import pytest
    from types import SimpleNamespace
    from aepo_jax.train.trainer import Trainer

    pick = lambda choice, dtype: Trainer._attention_impl(SimpleNamespace(cfg=SimpleNamespace(attention=choice)),
                                                         dtype)
    on_gpu = jax.devices()[0].platform == "gpu"
    assert pick("auto", jnp.float32) == "xla" and pick("xla", jnp.bfloat16) == "xla"
    assert pick("auto", jnp.bfloat16) == ("cudnn" if on_gpu else "xla")
    if not on_gpu:
        with pytest.raises(ValueError, match="--attention=cudnn needs a GPU and --compute_dtype=bfloat16"):
            pick("cudnn", jnp.bfloat16)
