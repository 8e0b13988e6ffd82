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


def test_readme_demo_command_runs():
    demo = _bash_blocks()[0].split("&& ")[-1].split()
    assert demo[0] == "python"
    done = subprocess.run([sys.executable, *demo[1:], "--new_tokens", "4"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens/s" in done.stdout
