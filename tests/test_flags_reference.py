"""README.md's flags reference is the one `tools/flags_reference.py` generates from aepo_jax/train/flags.py,
and the generator notices when it is not."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from aepo_jax.train import flags as train_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("flags_reference", ROOT / "tools" / "flags_reference.py")
flags_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flags_reference)


def _tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "flags_reference.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_readme_flags_reference_is_current():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    diff = flags_reference.stale_diff(text, flags_reference.render())
    assert not diff, f"README.md's flags reference is stale; run `{flags_reference.WRITE_COMMAND}`\n{diff}"


def test_lists_every_flag_of_the_module_once_and_no_absl_builtin():
    block = flags_reference.render()
    ours = [f.name for f in flags.FLAGS.get_flags_for_module(train_flags.__name__)]
    assert ours and sorted(ours) == sorted(train_flags.resolved())
    for name in ours:
        assert block.count(f"| `--{name}` |") == 1, name
    for builtin in ("flagfile", "undefok", "verbosity", "logtostderr", "help", "helpfull"):
        assert f"`--{builtin}`" not in block
    # grouped by the `# --- group ---` comments of flags.py, in definition order
    headers = [line for line in block.splitlines() if line.startswith("**")]
    assert headers[:2] == ["**run**", "**model**"] and "**tools**" in headers
    assert block.index("`--mode`") < block.index("`--model_path`") < block.index("`--search_top_k`")


def test_defaults_and_choices_come_from_the_definitions():
    lines = {line.split(" | ")[0]: line for line in flags_reference.render().splitlines()
             if line.startswith("| `--")}
    group_size = flags.FLAGS["group_size"]
    assert lines["| `--group_size`"] == f"| `--group_size` | `{group_size.default}` | {group_size.help} |"
    assert "| unset |" in lines["| `--model_path`"]
    assert "| `true` |" in lines["| `--pre_monitor`"]
    assert "(one of `grpo`, `arpo`, `aepo`)" in lines["| `--rollout`"]
    assert "<grpo|arpo|aepo>" not in lines["| `--rollout`"]  # absl's enum prefix is dropped


def test_render_follows_a_changed_definition():
    """Against a private FlagValues: a new flag, a changed default and a new group all show up."""
    source = ("# --- first ---\n"
              'A = flags.DEFINE_integer("alpha", 3, "An <int> | with a pipe")\n'
              "# --- second group -------\n"
              'B = flags.DEFINE_enum("beta", "x", ["x", "y"], "Choice")\n')
    fv = flags.FlagValues()
    flags.DEFINE_integer("alpha", 3, "An <int> | with a pipe", flag_values=fv, module_name="fake_flags")
    flags.DEFINE_enum("beta", "x", ["x", "y"], "Choice", flag_values=fv, module_name="fake_flags")
    block = flags_reference.render(fv, "fake_flags", source)
    assert "**first**" in block and "**second group**" in block
    assert "| `--alpha` | `3` | An &lt;int&gt; \\| with a pipe |" in block
    assert "| `--beta` | `x` | Choice (one of `x`, `y`) |" in block

    changed = flags.FlagValues()
    flags.DEFINE_integer("alpha", 4, "An <int> | with a pipe", flag_values=changed, module_name="fake_flags")
    flags.DEFINE_enum("beta", "x", ["x", "y"], "Choice", flag_values=changed, module_name="fake_flags")
    flags.DEFINE_bool("gamma", False, "New", flag_values=changed, module_name="fake_flags")
    changed_block = flags_reference.render(changed, "fake_flags", source + 'C = flags.DEFINE_bool("gamma", ...)\n')
    assert changed_block != block
    assert "| `--alpha` | `4` |" in changed_block and "| `--gamma` | `false` | New |" in changed_block

    readme = f"intro\n{flags_reference.BEGIN}\n{flags_reference.END}\noutro\n"
    current = flags_reference.with_block(readme, block)
    assert flags_reference.stale_diff(current, block) == ""
    assert "--alpha" in flags_reference.stale_diff(current, changed_block)


def test_flag_without_help_is_refused():
    fv = flags.FlagValues()
    flags.DEFINE_integer("silent", 1, None, flag_values=fv, module_name="fake_flags")
    with pytest.raises(ValueError, match="--silent has no help text"):
        flags_reference.render(fv, "fake_flags", 'flags.DEFINE_integer("silent", 1, None)\n')


def test_check_fails_on_a_stale_copy_and_write_fixes_only_the_block(tmp_path):
    current = flags_reference.with_block((ROOT / "README.md").read_text(encoding="utf-8"),
                                         flags_reference.render())
    start, end = flags_reference.current_block(current)
    block = current[start:end]
    name = f"| `--group_size` | `{train_flags.GROUP_SIZE.default}` |"
    assert name in block
    stale = current[:start] + block.replace(name, "| `--group_size` | `999` |") + current[end:]
    copy = tmp_path / "README.md"
    copy.write_text(stale, encoding="utf-8")

    done = _tool("--check", "--readme", str(copy))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stale" in done.stderr and "python tools/flags_reference.py --write" in done.stderr
    assert "-| `--group_size` | `999` |" in done.stderr  # the diff shows what changed

    done = _tool("--write", "--readme", str(copy))
    assert done.returncode == 0, done.stderr
    assert copy.read_text(encoding="utf-8") == current  # text outside the markers untouched
    assert _tool("--check", "--readme", str(copy)).returncode == 0


def test_missing_markers_are_named(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text("# no markers here\n", encoding="utf-8")
    done = _tool("--check", "--readme", str(copy))
    assert done.returncode == 2 and flags_reference.BEGIN in done.stderr
    with pytest.raises(flags_reference.MarkerError):
        flags_reference.current_block(f"{flags_reference.END}\n{flags_reference.BEGIN}\n")


def test_print_mode_prints_the_block():
    done = _tool()
    assert done.returncode == 0 and done.stdout == flags_reference.render()
