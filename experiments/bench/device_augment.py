"""Time of data.make_views (the on-device views of lclsc pretrain), jitted, after a warm-up: ms per batch.

    python experiments/bench/device_augment.py [--batch 64] [--sizes 64 128] [--steps 5] [--n-local 0]

Default ViewsConfig (every op drawn with its probability; all are computed and selected, as under
vmap), 2 global views of the image size, 1 channel. Runs on JAX's default device (the CPU here).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from lclsc_jax.data.device_augment import make_views
from lclsc_jax.data.settings import ViewsConfig


def measure(batch: int, size: int, cfg: ViewsConfig, steps: int) -> tuple[float, float]:
    """``(compile_s, ms_per_batch)`` of the jitted ``make_views`` on a ``(batch, size, size, 1)`` batch."""
    images = jax.device_put(np.random.default_rng(0).normal(size=(batch, size, size, 1)).astype(np.float32))
    fn = jax.jit(lambda k, x: make_views(k, x, cfg, size))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.PRNGKey(0), images))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        out = fn(jax.random.PRNGKey(i + 1), images)
    jax.block_until_ready(out)
    return compile_s, 1e3 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--n-local", type=int, default=0, help="DINO local crops (0: SimCLR's two global views)")
    args = ap.parse_args()
    cfg = ViewsConfig(n_global=2, n_local=args.n_local)
    dev = jax.devices()[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"device {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    print(f"batch {args.batch}, {cfg.n_global} global + {cfg.n_local} local views, {args.steps} timed calls\n")
    print("| image size | compile s | ms / batch | images/s |")
    print("|---|---|---|---|")
    for size in args.sizes:
        compile_s, ms = measure(args.batch, size, cfg, args.steps)
        print(f"| {size}x{size} | {compile_s:.1f} | {ms:.1f} | {1e3 * args.batch / ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
