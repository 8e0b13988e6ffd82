"""The `python` tool: runs model-written code in an isolated, resource-limited child process.

Each call gets a fresh temporary work directory (deleted afterwards), an empty environment (inside, only
fixed thread-count variables and Python's own LC_CTYPE appear), its own process group, and the isolation
that `_sandbox_child.py` sets up where the OS allows it (its docstring has the details and fallbacks):
  - network, PID, IPC and mount namespaces: no network, host processes invisible, a private /dev/shm;
    without namespaces: Landlock TCP rules plus an in-process audit hook that refuses sockets;
  - limits on CPU time, memory (RLIMIT_AS), processes (fork bombs), file size, open files;
  - as root: a fresh unprivileged uid per call (so it cannot write root's files or signal this process);
  - Landlock: writes only in the work directory, reads only system and Python directories, no signals
    out of the sandbox.
The parent enforces the wall-clock timeout (stopping the whole sandbox), reads stdout / stderr
incrementally with a byte cap (100 MB of output never sits in our memory), and turns every outcome into
result text:
  exit 0       -> stdout without trailing newlines ("(no output)" if empty), ok=True
  exception    -> stdout + the last lines of the traceback, ok=False, error_kind='error'
  timeout      -> stdout so far + a TimeoutError line, ok=False, error_kind='timeout'
  killed       -> stdout + the signal (e.g. SIGXCPU = CPU time limit), ok=False, error_kind='error'
`sandbox_status()` reports which mechanisms this machine actually provides.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

from aepo_jax.agent.tools.base import Tool, ToolError, require

log = logging.getLogger(__name__)

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
# When we are root each call runs under its own uid from this range (uids with a passwd entry are
# skipped), so concurrent cells cannot touch each other's files or processes and the process limit
# counts one cell only. Another process on the host drawing from the same range could collide.
SANDBOX_UIDS = range(50_000, 60_000)
MAX_CODE_CHARS = 100_000
_READ_CHUNK = 65_536
_EXIT_GRACE_S = 0.5  # after the main process exits, how long to wait for its stragglers to close the pipes
_STOP_GRACE_S = 1.0  # how long a SIGTERMed child may take to shut its sandbox down before SIGKILL


class _UidPool:
    """Hands out distinct unused uids from `SANDBOX_UIDS` to concurrent calls."""

    def __init__(self):
        self._lock = threading.Lock()
        self._in_use: set[int] = set()

    def acquire(self) -> int:
        with self._lock:
            for _ in range(1000):
                uid = random.choice(SANDBOX_UIDS)
                if uid in self._in_use:
                    continue
                try:
                    pwd.getpwuid(uid)
                    continue  # a real account
                except KeyError:
                    self._in_use.add(uid)
                    return uid
        raise ToolError("error", "too many concurrent python calls: no free sandbox uid")

    def release(self, uid: int) -> None:
        with self._lock:
            self._in_use.discard(uid)


_UIDS = _UidPool()


class _Capture:
    """Bounded capture of one pipe: keeps the first (`keep='head'`) or last (`'tail'`) `cap` bytes."""

    def __init__(self, cap: int, keep: str):
        self.cap, self.keep = cap, keep
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.keep == "head":
            self.data += chunk[: max(0, self.cap - len(self.data))]
        else:
            self.data += chunk
            del self.data[: max(0, len(self.data) - self.cap)]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _Outcome(NamedTuple):
    """One child run: exit status, bounded stdout / stderr, whether it hit the timeout, sandbox status."""

    returncode: int
    out: _Capture
    err: _Capture
    timed_out: bool
    status: dict


class PythonTool(Tool):
    """Runs the code between `<python>` tags; see the module docstring for isolation and result text.

    Args:
      timeout_s: wall-clock limit per call.
      memory_mb: address-space limit (RLIMIT_AS) of the child.
      max_processes: process + thread limit (RLIMIT_NPROC) against fork bombs.
      max_file_mb: largest file the code may write (RLIMIT_FSIZE).
      max_output_bytes: stdout kept for the result (the rest is counted and dropped); the same cap
        bounds the stderr tail kept for tracebacks.
      traceback_lines: how many last stderr lines an error result shows.
      extra_read_paths: directories / files the code may read besides the system and Python installation
        (Landlock); nothing else on the host is readable where Landlock is available.
    """

    name = "python"
    tag = "python"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, max_processes: int = 16,
                 max_file_mb: int = 16, max_output_bytes: int = 8192, traceback_lines: int = 20,
                 extra_read_paths: list[str] | tuple[str, ...] = ()):
        require(timeout_s > 0, "timeout_s", "a positive number of seconds", timeout_s)
        for key, value in (("memory_mb", memory_mb), ("max_processes", max_processes),
                           ("max_file_mb", max_file_mb), ("max_output_bytes", max_output_bytes),
                           ("traceback_lines", traceback_lines)):
            require(isinstance(value, int) and value > 0, key, "a positive integer", value)
        require(all(isinstance(p, str) and os.path.isabs(p) for p in extra_read_paths), "extra_read_paths",
                "a list of absolute paths", extra_read_paths)
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.max_file_mb = max_file_mb
        self.max_output_bytes = max_output_bytes
        self.traceback_lines = traceback_lines
        self.extra_read_paths = list(extra_read_paths)

    def _run(self, text: str) -> str:
        if not text.strip():
            raise ToolError("malformed", "empty code: write Python code between <python> and </python>")
        if len(text) > MAX_CODE_CHARS:
            raise ToolError("malformed", f"code too long: {len(text)} characters (limit {MAX_CODE_CHARS})")
        return self._result_text(*self._execute(text, probe=False))

    def _execute(self, code: str, probe: bool) -> _Outcome:
        """Runs one child in a fresh work directory."""
        uid = _UIDS.acquire() if os.geteuid() == 0 else None
        workdir = tempfile.mkdtemp(prefix="aepo_python_")
        try:
            if uid is not None:
                os.chown(workdir, uid, uid)
            return self._spawn(code, workdir, uid, probe)
        finally:
            _remove_tree(workdir)
            if uid is not None:
                _UIDS.release(uid)

    def _spawn(self, code: str, workdir: str, uid: int | None, probe: bool) -> _Outcome:
        status_r, status_w = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-I", _CHILD], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=workdir,
                                    start_new_session=True, pass_fds=(status_w,))
        except OSError:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        request = {"code": code, "status_fd": status_w, "uid": uid, "probe": probe,
                   "read_paths": self.extra_read_paths,
                   "limits": {"cpu_s": int(self.timeout_s) + 2, "memory_bytes": self.memory_mb << 20,
                              "nproc": self.max_processes, "fsize_bytes": self.max_file_mb << 20,
                              "nofile": 256}}
        with proc, os.fdopen(status_r, "rb") as status_pipe:
            try:
                try:
                    proc.stdin.write(json.dumps(request).encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # the child died at start-up; its status / stderr say why
                out, err, status_bytes, timed_out = self._collect(proc, status_pipe)
            finally:
                _stop(proc)
        status = _parse_status(status_bytes, err)
        if uid is not None and (timed_out or not status.get("namespaces")):
            # Without a PID namespace, processes that left the process group (setsid) may still run; a
            # timeout during start-up can orphan the namespace's init. The uid is reused only when empty.
            _kill_uid(uid)
        return _Outcome(proc.returncode, out, err, timed_out, status)

    def _collect(self, proc, status_pipe) -> tuple[_Capture, _Capture, bytes, bool]:
        """Reads stdout, stderr and the status pipe until EOF, the deadline, or the exit grace runs out."""
        out = _Capture(self.max_output_bytes, "head")
        err = _Capture(self.max_output_bytes, "tail")
        status = _Capture(1 << 16, "head")
        deadline = time.monotonic() + self.timeout_s
        exit_deadline = None
        with selectors.DefaultSelector() as sel:
            for pipe, capture in ((proc.stdout, out), (proc.stderr, err), (status_pipe, status)):
                sel.register(pipe, selectors.EVENT_READ, capture)
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    return out, err, bytes(status.data), True
                if exit_deadline is None and proc.poll() is not None:
                    exit_deadline = now + _EXIT_GRACE_S
                if exit_deadline is not None and now >= exit_deadline:
                    break
                limit = min(deadline, exit_deadline or deadline)
                for key, _ in sel.select(timeout=min(limit - now, 0.1)):
                    chunk = os.read(key.fd, _READ_CHUNK)
                    if chunk:
                        key.data.add(chunk)
                    else:
                        sel.unregister(key.fileobj)
        try:  # all pipes closed: the child may still be running (it can close its own stdout)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return out, err, bytes(status.data), True
        return out, err, bytes(status.data), False

    def _result_text(self, returncode, out: _Capture, err: _Capture, timed_out: bool, status: dict) -> str:
        if not status.get("ok"):
            log.warning("python sandbox could not start: %s", status.get("error"))
            raise ToolError("error", f"sandbox setup failed: {status.get('error')}")
        stdout = out.text().rstrip("\n")
        if out.total > len(out.data):
            stdout += f"\n... [output truncated: {out.total} bytes, showing the first {len(out.data)}]"
        if timed_out:
            raise ToolError("timeout", _join(stdout, f"TimeoutError: the code ran longer than "
                                                     f"{self.timeout_s:g} s and was stopped."))
        if returncode == 0:
            return stdout if stdout else "(no output)"
        tail = "\n".join(err.text().rstrip().splitlines()[-self.traceback_lines:])
        sig = _death_signal(returncode, status)
        if sig is not None:
            why = {signal.SIGXCPU: " (CPU time limit exceeded)",
                   signal.SIGXFSZ: " (file size limit exceeded)"}.get(sig, "")
            tail = _join(tail, f"Process killed by signal {sig.name}{why}.")
        elif not tail:
            tail = f"Process exited with status {returncode}."
        raise ToolError("error", _join(stdout, tail))


def _join(*parts: str) -> str:
    return "\n".join(p.rstrip("\n") for p in parts if p)


def _death_signal(returncode: int, status: dict) -> signal.Signals | None:
    """The signal that killed the cell: Popen reports -N; the namespace's processes exit with 128 + N."""
    number = -returncode if returncode < 0 else returncode - 128 if status["namespaces"] else 0
    try:
        return signal.Signals(number) if number > 0 else None
    except ValueError:
        return None


def _parse_status(data: bytes, err: _Capture) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        return {"ok": False, "error": f"no sandbox status (stderr: {err.text().strip()[-500:]!r})"}


def _stop(proc: subprocess.Popen) -> None:
    """Ends the child and everything in its process group. A running child first gets SIGTERM: the
    bootstrap's outer process then kills the PID namespace and reaps its init (a SIGKILLed outer process
    would leave init as a zombie for the host's init to reap). Whatever is left then gets SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _kill_uid(uid: int, timeout_s: float = 5.0) -> None:
    """SIGKILLs every live process whose real uid is `uid` until none is left (or `timeout_s` passed)."""
    deadline = time.monotonic() + timeout_s
    while (pids := _live_pids_of_uid(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _live_pids_of_uid(uid: int) -> list[int]:
    """Pids with real uid `uid`, zombies left out (they hold nothing and cannot be killed)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # the process has just exited
        if fields["Uid"].split()[0] == str(uid) and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _remove_tree(path: str) -> None:
    """Deletes the work directory. Without root, first re-allows entering directories the code locked."""
    if os.geteuid() != 0:
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                full = os.path.join(root, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def sandbox_status() -> dict:
    """Which isolation mechanisms work on this machine (runs the bootstrap once, without code).

    Keys: ok / error (could the sandbox start at all); namespaces (network + PID + IPC + mount) and
    namespace_error; private_shm (a private /dev/shm), python_exposed (the Python installation was bind-
    mounted for the unprivileged uid) and mount_error; uid (the unprivileged uid, None when not root);
    landlock_abi (0 = no Landlock), fs_confined, signals_scoped, tcp_blocked (Landlock rules in force);
    socket_hook (the audit-hook fallback is in use); network (what keeps the cell off the network).
    """
    return PythonTool()._execute("", probe=True).status
