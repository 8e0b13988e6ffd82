"""The README's two commands stay true: CI runs the documented test command, the demo command runs."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_extracts_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"cmd=\$\((.*)\)\n", script).group(1)
    got = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert got == _bash_blocks()[1]
    assert "pytest" in got and 'pip install -e ".[test]"' in got


def test_readme_main_command_is_the_cpu_demo():
    main = _bash_blocks()[0].split("&& ")[-1]
    assert main == "python -m aepo_jax.train"
    done = subprocess.run([sys.executable, "-m", "aepo_jax.train", "--dry_run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # with no flags the run uses configs/cpu_demo.flags: every value there shows in the resolved config
    resolved = dict(line.split(None, 1) for line in done.stdout.splitlines() if line and not line.startswith("mesh "))
    for line in (ROOT / "configs" / "cpu_demo.flags").read_text().splitlines():
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            assert value in resolved[name] or str(float(value)) in resolved[name], (name, value)
