"""Sandbox bootstrap: isolates itself, then runs one model-written Python cell (a script, not a module).

`python_tool.PythonTool` starts it as `python -I _sandbox_child.py` with an empty environment, a fresh work
directory as cwd, its own session (process group), and a JSON request on stdin:
  {"code", "status_fd", "uid" (int when the parent is root, else null), "limits" {...}, "read_paths", "probe"}
Before any model code runs it reports what isolation it achieved as one JSON object on `status_fd` and
closes that fd, so the code cannot forge the report. Only the standard library is used, and every module
the bootstrap needs is imported before privileges are dropped.

Isolation steps, in order (Linux only; a step the OS refuses is recorded in the status and, where one
exists, replaced by the fallback named here):
 1. Namespaces via unshare(2): network (no interfaces but a down loopback: no network at all), PID (the
    cell cannot see or signal host processes, and when the namespace's init dies the kernel kills every
    process in it) and IPC. Root needs nothing else; other users get a user namespace too. Because
    unshare(CLONE_NEWPID) applies to children, the bootstrap forks the namespace's init (pid 1), which
    forks the cell (pid 2: init ignores signals it has no handler for, the cell must not); each waits for
    its child and exits like it, a death by signal N as exit status 128 + N. On SIGTERM the outer process
    SIGKILLs init, so the kernel kills the whole namespace and the outer process reaps init before exiting.
    Network fallback: Landlock TCP rules (step 5) plus an audit hook that refuses to create sockets in this
    interpreter (it does not cover subprocesses the cell starts).
 2. Root only, and only when the Python installation sits under a directory other users cannot enter
    (e.g. pyenv under /root): a private mount namespace in which that directory is replaced by an empty
    tmpfs holding bind mounts of the Python prefixes, so the unprivileged uid of step 4 can import the
    standard library and site-packages and sees nothing else of that directory. If this is needed and
    fails, the cell does not run.
 3. Resource limits: CPU seconds, address space (memory), processes + threads (fork bombs), file size,
    open files, no core dumps.
 4. Root only: drop to the unprivileged `uid` the parent chose (groups, gid and uid; failing is fatal),
    then ask for SIGKILL when the parent dies. The cell can neither write root's files nor signal root's
    processes.
 5. no_new_privs and a Landlock ruleset (Linux >= 5.13): writes only below the work directory (and
    /dev/null), reads only from the system and Python directories (+ `read_paths`), no TCP connect/bind
    (ABI >= 4), no signals to processes outside the sandbox (ABI >= 6).
Then the cell runs like a notebook cell: a final bare expression has its repr printed unless it is None.
"""
import ast
import builtins
import ctypes
import json
import linecache
import os
import resource
import signal
import sys
import traceback
import types

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights (uapi/linux/landlock.h).
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FS_FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # valid on a file
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/sys",
                     "/dev/zero", "/dev/random", "/dev/urandom")
# Fixed, non-secret variables: keep numeric libraries to one thread each (threads count against the
# process limit, and a many-core host would otherwise start one per core in every sandbox).
CELL_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CELL_FILENAME = "<cell>"


class SetupError(Exception):
    """A mandatory isolation step failed; the cell must not run."""


def _errno_error(what):
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags):
    if _LIBC.unshare(flags) != 0:
        raise _errno_error("unshare")


def _mount(source, target, fstype, flags, data=None):
    args = [None if a is None else a.encode() for a in (source, target, fstype)]
    if _LIBC.mount(*args, flags, None if data is None else data.encode()) != 0:
        raise _errno_error(f"mount {target}")


def _prctl(option, value):
    if _LIBC.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        raise _errno_error(f"prctl({option})")


def _python_prefixes():
    return sorted({os.path.realpath(p) for p in
                   (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})


def _hidden_ancestor(path):
    """The topmost ancestor of `path` that other users cannot enter (mode lacks o+x), or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _private_mounts(root, prefixes, status):
    """Step 2, in the new mount namespace: a private /dev/shm (multiprocessing needs one) and, as root,
    the Python installation exposed to the unprivileged uid."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    status["private_shm"] = True
    if root:
        status["python_exposed"] = _expose_python(prefixes)


def _expose_python(prefixes):
    """Replaces each hidden ancestor of the Python prefixes by a tmpfs holding binds of the prefixes."""
    plan = {}
    for prefix in prefixes:
        hidden = _hidden_ancestor(prefix)
        if hidden is not None:
            plan.setdefault(hidden, []).append(prefix)
    if not plan:
        return False
    for hidden, paths in plan.items():  # a prefix inside another one comes with its bind mount
        plan[hidden] = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]
    for hidden, paths in plan.items():
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]  # reachable after the tmpfs hides them
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for path, fd in zip(paths, fds):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
    return True


def _wait_and_exit(pid):
    """Waits for child `pid` and exits with its status; death by signal N becomes exit status 128 + N."""
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(code if code >= 0 else 128 - code)


def _fork_and_wait(status_fd, kill_child_on_sigterm=False):
    """The parent waits for the child and exits like it (never returns); the child goes on."""
    pid = os.fork()
    if pid:
        os.close(status_fd)  # only the process that runs the cell reports
        if kill_child_on_sigterm:  # how the tool stops a cell: killing init tears the namespace down
            signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
        _wait_and_exit(pid)


def _set_limits(limits):
    # CPU: the soft limit sends SIGXCPU (reported as such), the hard one a second later SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    for name, value in (("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_NPROC", limits["nproc"]),
                        ("RLIMIT_FSIZE", limits["fsize_bytes"]), ("RLIMIT_NOFILE", limits["nofile"]),
                        ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def _drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        raise SetupError(f"could not drop privileges to uid {uid}")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(writable, read_paths, status):
    """Step 5. Returns quietly (status['landlock_abi'] = 0) when the kernel has no Landlock."""
    abi = _LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi <= 0:
        return
    # Every filesystem right this ABI knows: bits 0..12 (ABI 1), +REFER (2), +TRUNCATE (3), +IOCTL_DEV (5).
    handled_fs = (1 << (13 if abi == 1 else 14 if abi == 2 else 15 if abi < 5 else 16)) - 1
    attr = _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                            ctypes.c_uint32(0))
    if ruleset < 0:
        raise _errno_error("landlock_create_ruleset")
    rules = [(p, handled_fs) for p in writable]
    rules.append(("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV))
    rules += [(p, FS_READ) for p in read_paths]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # absent, or not ours to enter: nothing to allow
        if not os.path.isdir(path):
            access &= FS_FILE_ONLY
        rule = _PathBeneathAttr(access & handled_fs, fd)
        ret = _LIBC.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                            ctypes.c_uint32(0))
        os.close(fd)
        if ret != 0:
            raise _errno_error(f"landlock_add_rule {path}")
    if _LIBC.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
        raise _errno_error("landlock_restrict_self")
    os.close(ruleset)
    status.update(landlock_abi=abi, fs_confined=True, signals_scoped=abi >= 6,
                  tcp_blocked=abi >= 4)


def _deny_sockets(event, _args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in this sandbox")


def _isolate(request, status):
    """Steps 1-5. With namespaces it forks twice; only the process that will run the cell returns."""
    root = os.geteuid() == 0
    prefixes = _python_prefixes()
    namespaces = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS
    try:
        _unshare(namespaces if root else namespaces | CLONE_NEWUSER)
        status["namespaces"] = True
        if not root:  # map our own ids into the new user namespace
            uid, gid = os.getuid(), os.getgid()
            maps = {"setgroups": "deny", "uid_map": f"{uid} {uid} 1", "gid_map": f"{gid} {gid} 1"}
            for name, text in maps.items():
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    except OSError as e:
        status["namespace_error"] = str(e)
    if status["namespaces"]:
        try:
            _private_mounts(root, prefixes, status)
        except OSError as e:
            status["mount_error"] = str(e)
    if root and not status["python_exposed"] and any(_hidden_ancestor(p) for p in prefixes):
        raise SetupError("the Python installation is not readable by an unprivileged user and no private "
                         f"mount could expose it ({status['namespace_error'] or status['mount_error']})")
    if status["namespaces"]:  # unshare(CLONE_NEWPID) applies to children: fork the namespace's init
        _fork_and_wait(request["status_fd"], kill_child_on_sigterm=True)
    _set_limits(request["limits"])
    if root:
        _drop_privileges(request["uid"])
        status["uid"] = request["uid"]
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    writable = [os.getcwd(), "/dev/shm"] if status["private_shm"] else [os.getcwd()]
    _landlock(writable, [*SYSTEM_READ_PATHS, *prefixes, *request["read_paths"]], status)
    if status["namespaces"]:  # init ignores signals it has no handler for: the cell runs as pid 2
        _fork_and_wait(request["status_fd"])
    else:
        sys.addaudithook(_deny_sockets)
        status["socket_hook"] = True
    status["network"] = ("namespace" if status["namespaces"] else
                         "landlock-tcp+audit-hook" if status["tcp_blocked"] else "audit-hook")


def _print_exception(exc):
    """Prints the traceback from the first frame of the cell on (the bootstrap's frames are noise)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    sys.stdout.flush()
    traceback.print_exception(type(exc), exc, tb)


def _run_cell(code):
    """Runs `code` as __main__; prints a final bare expression's repr; exits 1 on an exception."""
    os.environ.update(CELL_ENV)
    linecache.cache[CELL_FILENAME] = (len(code), None, code.splitlines(True), CELL_FILENAME)
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [""]
    sys.stdout.reconfigure(line_buffering=True)  # output printed before a hang or a kill still arrives
    try:
        tree = ast.parse(code, CELL_FILENAME)
    except SyntaxError as e:
        traceback.print_exception(type(e), e, None)
        sys.exit(1)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    try:
        exec(compile(tree, CELL_FILENAME, "exec"), main.__dict__)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), CELL_FILENAME, "eval"), main.__dict__)
            if value is not None:
                print(repr(value))
    except Exception as e:  # any error of the cell: the model reads the traceback
        _print_exception(e)
        sys.exit(1)


def main():
    request = json.loads(sys.stdin.buffer.read())
    status = {"ok": True, "namespaces": False, "namespace_error": None, "private_shm": False,
              "python_exposed": False, "mount_error": None, "uid": None, "landlock_abi": 0,
              "fs_confined": False, "signals_scoped": False, "tcp_blocked": False, "socket_hook": False}
    try:
        _isolate(request, status)
    except (SetupError, OSError) as e:
        status.update(ok=False, error=f"{type(e).__name__}: {e}")
    with os.fdopen(request["status_fd"], "w") as f:
        f.write(json.dumps(status))
    if not status["ok"]:
        sys.exit(70)
    if not request["probe"]:
        _run_cell(request["code"])


if __name__ == "__main__":
    main()
