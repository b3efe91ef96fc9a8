"""The one prediction path: a run's eval step over fixed-size, padded batches, valid rows gathered to the host.

Training validation, ``evaluate``, ``predict``, cross-validation, the CAM benchmark and the
ablation all predict through :func:`predict_batches` (via ``protocols.runs.predict`` above this
layer); :func:`~lclsc_jax.train.config.uses_gei` decides GEI cosine vs the linear head.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as steps_lib
from lclsc_jax.train.config import Config
from lclsc_jax.train.state import TrainState

#: What :func:`predict_batches` returns, per valid row.
PREDICTION_KEYS = ("probs", "embedding", "label", "index", "patient")


def eval_batch_size(cfg: Config, mesh: jax.sharding.Mesh) -> int:
    """``cfg.train.eval_batch_size`` rounded down to a multiple of the data-parallel devices x processes (at least one each)."""
    n = shd.data_parallel_size(mesh) * jax.process_count()
    return max(n, (cfg.train.eval_batch_size // n) * n)


def predict_batches(cfg: Config, model: Any, state: TrainState, mesh: jax.sharding.Mesh,
                    batches: Iterable[dict[str, np.ndarray]], eval_step: Any = None) -> dict[str, np.ndarray]:
    """Run the eval step over padded batches (``data.eval_batches`` / ``data.array_batches``); valid rows only.

    Returns host arrays ``probs (N, C)``, ``embedding (N, D)``, ``label (N,)``, ``index (N,)``,
    ``patient (N,)`` in batch order, gathered over processes. ``eval_step``: a compiled
    ``steps.jit_eval_step`` to reuse (training validation compiles it once).
    """
    eval_step = eval_step or steps_lib.jit_eval_step(steps_lib.make_eval_step(model, cfg), mesh,
                                                     shd.shardings_of(state))
    out: dict[str, list[np.ndarray]] = {k: [] for k in PREDICTION_KEYS}
    for batch in batches:
        res = eval_step(state, shd.to_global(batch, mesh, steps_lib.EVAL_KEYS))
        res = multihost_utils.process_allgather(res, tiled=True) if jax.process_count() > 1 else jax.device_get(res)
        host = {k: allgather_host(batch[k]) for k in ("valid", "label", "index", "patient")}
        valid = host["valid"].astype(bool)
        for k in ("probs", "embedding"):
            out[k].append(np.asarray(res[k])[valid])
        for k in ("label", "index", "patient"):
            out[k].append(host[k][valid])
    return {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in out.items()}


def allgather_host(x: np.ndarray) -> np.ndarray:
    """Concatenate a host array's per-process rows in process order (identity on one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    if np.asarray(x).dtype.kind in "US":  # strings cannot cross devices: gather their codes
        arr = np.asarray(x).astype("U64")
        codes = np.frombuffer(arr.tobytes(), np.uint32).reshape(arr.shape[0], -1)
        g = np.asarray(multihost_utils.process_allgather(codes, tiled=True))
        return np.frombuffer(g.astype(np.uint32).tobytes(), dtype="U64").reshape(-1)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
