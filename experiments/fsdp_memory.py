"""Per-device bytes of parameters + optimizer state under FSDP (``train.fsdp``), from the state's shardings.

    python experiments/fsdp_memory.py                       # ResNet-50 and ViT-B/16, fsdp 1, 2, 4, 8
    python experiments/fsdp_memory.py --arch resnet18 --optimizer sgd

No training and no allocation: the abstract train state (``jax.eval_shape``) carries the shardings
that ``lclsc train --set train.fsdp=N`` places it with (``sharding.state_sharding``), and
``sharding.bytes_per_device`` adds up the shard each device would hold. 8 CPU devices are simulated
(XLA_FLAGS, set before JAX is imported); the numbers are those of any 8 accelerators.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lclsc_jax.train import config as C  # noqa: E402
from lclsc_jax.train import loop  # noqa: E402
from lclsc_jax.train import sharding as shd  # noqa: E402

NUM_CLASSES = 2


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def table(arch: str, optimizer: str, image_size: int, fsdps: tuple[int, ...]) -> list[str]:
    """Markdown rows: per-device MiB of params and optimizer state, their ratio to replication, the ideal 1/N."""
    cfg = C.load("default", [f"model.arch={arch}", f"data.image_size={image_size}", f"train.optimizer={optimizer}"])
    model = loop.build_model(cfg, NUM_CLASSES)
    rows, whole = [], None
    for n in fsdps:
        abstract = loop.abstract_state(cfg, model, NUM_CLASSES, shd.make_mesh(8, fsdp=n))
        params, opt = (max(shd.bytes_per_device(t).values()) for t in (abstract.params, abstract.opt_state))
        leaves = jax.tree_util.tree_leaves({"p": abstract.params, "o": abstract.opt_state})
        rep = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves if x.sharding.is_fully_replicated)
        whole = whole or params + opt
        count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))
        rows.append(f"| {arch} ({count / 1e6:.1f} M) | {n} | {_mib(params)} | {_mib(opt)} | {_mib(params + opt)} "
                    f"| {(params + opt) / whole:.3f} | {1 / n:.3f} | {_mib(rep)} |")
    return rows


def main() -> None:
    """Print the table for each ``--arch``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["resnet50", "vit_base_patch16"])
    ap.add_argument("--optimizer", default="adamw", choices=C.OPTIMIZERS)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    print(f"Per-device bytes on 8 devices, {args.optimizer}, float32 master weights "
          f"(MiB; 'replicated' = leaves too small or not divisible, on every device whole)\n")
    print("| model (params) | fsdp | params | optimizer state | total | vs fsdp=1 | 1/N | replicated |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        print("\n".join(table(arch, args.optimizer, args.image_size, tuple(args.fsdp))))


if __name__ == "__main__":
    main()
