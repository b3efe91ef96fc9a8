"""Worker for test_multihost.py: train 3 steps on a fixed global batch, save the parameters.

Usage: python multihost_worker.py OUT.npz NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES [FSDP]
(NUM_PROCESSES == 1 runs without jax.distributed; FSDP, default 1, shards the parameters and the
optimizer state over that many devices, ``train.fsdp``.)
"""

import os
import sys

out, nproc, pid, port, ndev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
fsdp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lclsc_jax.train import config as C  # noqa: E402
from lclsc_jax.train import loop  # noqa: E402
from lclsc_jax.train import sharding as shd  # noqa: E402
from lclsc_jax.train import steps as S  # noqa: E402
from lclsc_jax.train.state import make_optimizer  # noqa: E402

if nproc > 1:
    shd.maybe_initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
assert jax.process_count() == nproc and jax.device_count() == nproc * ndev

cfg = C.load("tiny", ["loss.name=lcl_sc", f"train.fsdp={fsdp}"])
B, NC = 16, 3
rng = np.random.default_rng(0)
batches = [{"image": rng.normal(size=(B, 32, 32, 1)).astype(np.float32),
            "label": rng.integers(0, NC, B).astype(np.int32)} for _ in range(3)]
mesh = shd.make_mesh(fsdp=fsdp)
model = loop.build_model(cfg, NC)
state = loop.init_state(cfg, model, NC, mesh)
sharded = [x for x in jax.tree_util.tree_leaves(state.params) if not x.sharding.is_fully_replicated]
assert bool(sharded) == (fsdp > 1)
step = S.jit_train_step(S.make_train_step(model, make_optimizer(cfg), cfg), mesh, shd.shardings_of(state))
rows = slice(pid * B // nproc, (pid + 1) * B // nproc)  # this process's share of each global batch
losses = []
for b in batches:
    state, m = step(state, shd.to_global({k: v[rows] for k, v in b.items()}, mesh, S.TRAIN_KEYS))
    losses.append(float(m["loss"]))
host = shd.to_host(state.params)
if pid == 0:
    leaves = jax.tree_util.tree_leaves(host)
    np.savez(out, losses=np.asarray(losses), global_emb=np.asarray(jax.device_get(state.global_emb)),
             **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})
