"""Two real processes (jax.distributed, gloo on CPU) == one process with as many devices; also with FSDP."""

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


def _two_processes(out, local_devices: int, *extra: str) -> None:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, str(out), "2", str(i), port, str(local_devices), *extra],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def _assert_same(ref, out) -> None:
    a, b = np.load(ref), np.load(out)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    np.testing.assert_allclose(a["global_emb"], b["global_emb"], atol=1e-5)
    keys = [k for k in a.files if k.startswith("p")]
    assert keys and set(keys) == {k for k in b.files if k.startswith("p")}
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    ref = tmp_path / "ref.npz"
    subprocess.run([sys.executable, WORKER, str(ref), "1", "0", "0", "4"], check=True, env=_env(), timeout=600)
    out = tmp_path / "multi.npz"
    _two_processes(out, 2)
    _assert_same(ref, out)


@pytest.fixture(scope="module")
def eight_device_reference(tmp_path_factory):
    """One process, 8 devices, replicated state (plain data parallelism)."""
    ref = tmp_path_factory.mktemp("ref") / "ref8.npz"
    subprocess.run([sys.executable, WORKER, str(ref), "1", "0", "0", "8"], check=True, env=_env(), timeout=600)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [4, 8])  # 4: shards within each process; 8: shards across the two
def test_two_processes_with_fsdp_match_one_process(tmp_path, eight_device_reference, fsdp):
    """2 processes x 4 devices with parameters and optimizer state sharded ``fsdp`` ways == 1 x 8 replicated."""
    out = tmp_path / "fsdp.npz"
    _two_processes(out, 4, str(fsdp))
    _assert_same(eight_device_reference, out)
