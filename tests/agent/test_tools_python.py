"""The sandboxed `python` tool: normal cells, and hostile code that must end in a clear result while the
host (this test process, its files, its environment, its network) stays unharmed."""
import concurrent.futures
import os
import signal
import socket
import sys
import time
import tracemalloc
import uuid

import pytest

from aepo_jax.agent.tools import PythonTool, sandbox_status
from aepo_jax.agent.tools.python_tool import SANDBOX_UIDS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")


@pytest.fixture(scope="module")
def status():
    return sandbox_status()


@pytest.fixture(scope="module")
def tool():
    return PythonTool(timeout_s=5)


def _processes_of(uid):
    """Pids of all processes (zombies included) whose real uid is `uid`."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                if next(line for line in f if line.startswith("Uid:")).split()[1] == str(uid):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_sandbox_starts_and_reports(status):
    assert status["ok"], status
    if os.geteuid() == 0:
        assert status["uid"] in SANDBOX_UIDS


def test_prints_stdout_and_final_expression(tool):
    r = tool.call("x = 6\nprint('x is', x)\nx * 7")
    assert (r.ok, r.error_kind, r.text) == (True, None, "x is 6\n42")
    assert r.elapsed_s > 0


def test_final_expression_repr_and_none(tool):
    assert tool.call("'a' + 'b'").text == "'ab'"
    assert tool.call("print('only print')").text == "only print"  # print(...) returns None
    assert tool.call("x = 1").text == "(no output)"


def test_exception_gives_traceback_of_the_cell_only(tool):
    r = tool.call("def f(d):\n    return 1 / d\n\nf(0)")
    assert not r.ok and r.error_kind == "error"
    assert r.text.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "<cell>", line 4' in r.text and 'File "<cell>", line 2, in f' in r.text
    assert "_sandbox_child" not in r.text


def test_syntax_error_reported(tool):
    r = tool.call("def f(:\n    pass")
    assert not r.ok and r.error_kind == "error"
    assert "SyntaxError" in r.text and 'File "<cell>", line 1' in r.text


def test_stdout_before_an_exception_is_kept(tool):
    r = tool.call("print('step 1')\nraise ValueError('bad value')")
    assert not r.ok
    assert r.text.startswith("step 1\n") and r.text.endswith("ValueError: bad value")


def test_nonzero_exit_status(tool):
    r = tool.call("import sys\nsys.exit(3)")
    assert (r.ok, r.text) == (False, "Process exited with status 3.")


def test_empty_and_oversized_code_are_malformed(tool):
    for code in ("", "  \n\t"):
        r = tool.call(code)
        assert (r.ok, r.error_kind) == (False, "malformed") and "empty code" in r.text
    r = tool.call("x = 1\n" * 20_000)
    assert (r.ok, r.error_kind) == (False, "malformed") and "too long" in r.text


def test_site_packages_importable(tool):
    r = tool.call("import numpy as np\nint(np.arange(5).sum())")
    assert (r.ok, r.text) == (True, "10"), r.text


def test_infinite_loop_times_out_and_keeps_earlier_output():
    start = time.monotonic()
    r = PythonTool(timeout_s=1).call("print('started')\nwhile True:\n    pass")
    assert time.monotonic() - start < 4
    assert (r.ok, r.error_kind) == (False, "timeout")
    assert r.text == "started\nTimeoutError: the code ran longer than 1 s and was stopped."


def test_closing_its_output_does_not_escape_the_timeout():
    r = PythonTool(timeout_s=1).call("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)")
    assert (r.ok, r.error_kind) == (False, "timeout")


def test_memory_bomb_hits_the_memory_limit(tool):
    r = tool.call("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))")
    assert (r.ok, r.error_kind) == (False, "error")
    assert r.text.splitlines()[-1] == "MemoryError"


def test_fork_bomb_is_contained_and_cleaned_up():
    code = ("import os\nprint(os.getuid())\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    start = time.monotonic()
    r = PythonTool(timeout_s=2, max_processes=16).call(code)
    assert time.monotonic() - start < 6
    assert (r.ok, r.error_kind) == (False, "timeout")
    uid = int(r.text.splitlines()[0])
    if os.geteuid() == 0:  # the uid is the cell's own: all its processes are gone, not even a zombie is left
        assert uid in SANDBOX_UIDS and _processes_of(uid) == []


def test_cannot_write_outside_its_directory(status, tmp_path):
    if not (status["fs_confined"] or status["uid"] is not None):
        pytest.skip("neither Landlock nor an unprivileged uid is available here")
    tag = uuid.uuid4().hex
    targets = [f"/tmp/aepo_escape_test_{tag}", str(tmp_path / "escape"),
               os.path.expanduser(f"~/aepo_escape_{tag}")]
    if not status["fs_confined"]:  # a different uid alone cannot stop writes to world-writable /tmp
        targets = targets[1:]
    code = (f"import os\nprint(os.getcwd())\n"
            f"open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n"
            f"for path in {targets!r}:\n"
            f"    try:\n        open(path, 'w').write('escaped')\n        print('WROTE', path)\n"
            f"    except OSError as e:\n        print('refused', type(e).__name__)\n")
    try:
        r = PythonTool(timeout_s=5).call(code)
        lines = r.text.splitlines()
        assert r.ok and lines[1] == "ok", r.text
        assert "WROTE" not in r.text and lines[2:] == ["refused PermissionError"] * len(targets)
        assert not any(os.path.exists(t) for t in targets)
        assert not os.path.exists(lines[0])  # the work directory is gone
    finally:
        for t in targets:
            if os.path.exists(t):
                os.remove(t)


def test_parent_environment_is_not_visible(tool, monkeypatch):
    secret = f"aepo-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AEPO_TEST_SECRET", secret)
    code = (f"import os\nprint(sorted(os.environ))\n"
            f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\n"
            f"except OSError as e:\n    print('refused', type(e).__name__)")
    r = tool.call(code)
    assert r.ok, r.text
    assert secret not in r.text
    names = eval(r.text.splitlines()[0])  # the printed list of variable names
    assert set(names) <= {"LC_CTYPE", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}
    assert r.text.splitlines()[1].startswith("refused")


def test_no_network_connection_reaches_the_host(tool):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (f"import socket\ntry:\n"
                f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                f"    s.sendall(b'leak')\n    print('CONNECTED')\n"
                f"except OSError as e:\n    print('refused', type(e).__name__)")
        r = tool.call(code)
        assert r.ok and r.text.startswith("refused") and "CONNECTED" not in r.text, r.text
        server.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing arrived from the sandbox ...
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = server.accept()  # ... while a connection from the host does arrive
            conn.close()


def test_cannot_kill_its_parent(tool):
    code = (f"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('still running')\n"
            f"os.kill({os.getpid()}, signal.SIGKILL)")
    r = tool.call(code)
    # We are still alive to check; the direct kill of this process failed inside the sandbox.
    assert not r.ok and r.text.startswith("still running"), r.text
    assert r.text.splitlines()[-1].split(":")[0] in ("ProcessLookupError", "PermissionError")


def test_huge_output_is_truncated_with_bounded_memory():
    tool = PythonTool(timeout_s=20, max_output_bytes=4096)
    tracemalloc.start()
    start = time.monotonic()
    try:
        r = tool.call("import sys\nblock = 'x' * (1 << 20)\n"
                      "for _ in range(100):\n    sys.stdout.write(block)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 10
    assert r.ok and r.text.startswith("x" * 4096)
    assert r.text[4096:] == f"\n... [output truncated: {100 << 20} bytes, showing the first 4096]"
    assert peak < 8 << 20  # the 100 MB never sat in this process


def test_cpu_limit_reported_by_signal(tool):
    r = tool.call("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass")
    assert (r.ok, r.error_kind) == (False, "error")
    assert r.text == f"Process killed by signal {signal.SIGXCPU.name} (CPU time limit exceeded)."


def test_concurrent_calls_in_a_thread_pool(tool):
    codes = [f"import time\ntime.sleep(0.4)\n{i} * {i}" for i in range(8)]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(tool.call, codes))
    assert [r.text for r in results] == [str(i * i) for i in range(8)]
    assert time.monotonic() - start < 8 * 0.4  # they overlapped


def test_config_round_trip():
    tool = PythonTool(timeout_s=3, memory_mb=512, extra_read_paths=["/opt/data"])
    config = tool.to_config()
    assert config == {"name": "python", "timeout_s": 3.0, "memory_mb": 512, "max_processes": 16,
                      "max_file_mb": 16, "max_output_bytes": 8192, "traceback_lines": 20,
                      "extra_read_paths": ["/opt/data"]}
    assert PythonTool.from_config(config).to_config() == config


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="'memory_mb': expected a positive integer, got 0"):
        PythonTool(memory_mb=0)
    with pytest.raises(ValueError, match="'extra_read_paths': expected a list of absolute paths"):
        PythonTool(extra_read_paths=["relative/dir"])
