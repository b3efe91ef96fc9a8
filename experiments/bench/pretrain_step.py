"""What a pretraining step costs next to a supervised one, and the on-device augmentation's share of it.

    python experiments/bench/pretrain_step.py --arch tiny --size 64 --batch 64
    python experiments/bench/pretrain_step.py --arch resnet18 --size 128 --batch 32 --objective dino

Same process, same model, same devices, compiled once, timed after warm-up (median of ``--repeats``):
  * the pretraining step on B frames x V views (``pretrain.objective``), views drawn on the device;
  * a supervised cross-entropy step on B*V frames (the same number of images through the network);
  * ``make_views`` alone on B frames (the augmentation's share = its time / the pretraining step's).
Goals (issue 17): pretraining step <= 1.15x the supervised one; augmentation <= 10% of the step.
Prints one JSON line per configuration (add ``--out FILE`` to append it to a JSONL file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from lclsc_jax.data import device_augment
from lclsc_jax.train import config as C
from lclsc_jax.train import loop, sharding
from lclsc_jax.train import pretrain_state as ps
from lclsc_jax.train import pretrain_steps as psteps
from lclsc_jax.train import steps as steps_lib
from lclsc_jax.train.state import make_optimizer


def _time(fn, *args, repeats: int) -> list[float]:
    """Seconds per call of ``fn(*args)`` (blocking on its outputs), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t0)
    return out


def bench(arch: str, size: int, batch: int, objective: str, repeats: int, n_local: int, dtype: str) -> dict:
    """Time the three steps for one configuration; returns the figures."""
    sets = {"model.arch": arch, "data.image_size": size, "train.batch_size": batch, "pretrain.objective": objective,
            "pretrain.dino_out_dim": 1024, "pretrain.dino_hidden_dim": 512, "views.n_local": n_local,
            "model.dtype": dtype}
    cfg = C.override(C.load("pretrain"), sets)
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, size, size, cfg.data.channels)).astype(np.float32)
    labels = rng.integers(0, 3, size=batch).astype(np.int32)
    bat = sharding.batch_sharded(mesh)

    # Pretraining step (state not donated: the same state is stepped again and again).
    model = ps.build_model(cfg)
    tx = make_optimizer(cfg)
    _, shardings = ps.abstract_state(cfg, model, tx, mesh)
    state = jax.jit(lambda k: ps.create_state(model, tx, cfg, k), out_shardings=shardings)(jax.random.PRNGKey(0))
    step = psteps.jit_pretrain_step(psteps.make_pretrain_step(model, tx, cfg), mesh, shardings, donate=False)
    b = {"image": jax.device_put(images, bat), "label": jax.device_put(labels, bat)}
    t_pre = _time(step, state, b, repeats=repeats)

    # Views alone.
    views = jax.jit(lambda k, x: device_augment.make_views(k, x, cfg.views, size))
    t_aug = _time(views, jax.random.PRNGKey(1), b["image"], repeats=repeats)

    # Supervised cross-entropy step on as many images as the pretraining step puts through the network.
    n_views = cfg.views.n_global + cfg.views.n_local
    sup = C.override(cfg, {"loss.name": "ce", "train.batch_size": batch * n_views})
    smodel = loop.build_model(sup, 3)
    sstate = loop.init_state(sup, smodel, 3, mesh)
    sstep = steps_lib.jit_train_step(steps_lib.make_train_step(smodel, make_optimizer(sup), sup), mesh, donate=False)
    sb = {"image": jax.device_put(np.concatenate([images] * n_views), bat),
          "label": jax.device_put(np.concatenate([labels] * n_views), bat)}
    t_sup = _time(sstep, sstate, sb, repeats=repeats)

    med = {k: statistics.median(v) for k, v in (("pretrain", t_pre), ("supervised", t_sup), ("views", t_aug))}
    return {"arch": arch, "size": size, "batch": batch, "views": n_views, "objective": objective,
            "devices": jax.device_count(), "backend": jax.default_backend(), "machine": platform.node(),
            "cpus": os.cpu_count(), "seconds": med,
            "pretrain_over_supervised": med["pretrain"] / med["supervised"],
            "views_share_of_step": med["views"] / med["pretrain"],
            "pretrain_images_per_s": batch * n_views / med["pretrain"],
            "supervised_images_per_s": batch * n_views / med["supervised"],
            "dtype": dtype}


def main() -> None:
    """Parse arguments, run, print (and append) one JSON line per configuration."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=["tiny"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--objective", default="simclr", choices=("simclr", "dino", "supcon"))
    ap.add_argument("--n-local", type=int, default=0, help="DINO's local views")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--out", help="append the JSON lines to this file")
    args = ap.parse_args()
    for arch in args.arch:
        res = bench(arch, args.size, args.batch, args.objective, args.repeats, args.n_local, args.dtype)
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
