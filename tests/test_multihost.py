"""Two real processes (jax.distributed, gloo on CPU, 2 devices each) == one process with 4 devices."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    ref = tmp_path / "ref.npz"
    subprocess.run([sys.executable, WORKER, str(ref), "1", "0", "0", "4"], check=True, env=_env(), timeout=600)
    port = str(_free_port())
    out = tmp_path / "multi.npz"
    procs = [subprocess.Popen([sys.executable, WORKER, str(out), "2", str(i), port, "2"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    a, b = np.load(ref), np.load(out)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    np.testing.assert_allclose(a["global_emb"], b["global_emb"], atol=1e-5)
    keys = [k for k in a.files if k.startswith("p")]
    assert keys and set(keys) == {k for k in b.files if k.startswith("p")}
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=2e-5)
