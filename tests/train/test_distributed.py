"""Multi-host path: two local processes join through jax.distributed.initialize on loopback (gloo on CPU),
shard the train state over both processes' devices, and take the same steps as one process does."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train" / "multihost_worker.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(process_id, port, num_processes, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(WORKER), str(process_id), str(port), str(num_processes)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_match_one():
    port = _free_port()
    procs = [_launch(i, port, 2, devices=2) for i in range(2)]
    results = [_result(p) for p in procs]
    reference = _result(_launch(0, port, 1, devices=4))
    assert [r["processes"] for r in results] == [2, 2] and [r["devices"] for r in results] == [4, 4]
    assert reference["processes"] == 1 and reference["devices"] == 4
    for r in results:
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["checksum"], reference["checksum"], rtol=1e-6)
    assert results[0]["losses"][1] != results[0]["losses"][0]  # the first step changed the parameters
