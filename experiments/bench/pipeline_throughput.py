"""Throughput (images/s) of data.train_iterator for 128x128 and 224x224, 0 and 2 grain workers.

    python experiments/bench/pipeline_throughput.py [--batch 64] [--steps 20] [--cache DIR]

Full augmentation (D4 + affine + intensity) is on, as in LCL-SC training (the LCL-SC second
view is drawn on the device by the train step, not here).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from lclsc_jax import data


def measure(ds, workers: int, batch: int, steps: int, warmup: int = 2) -> float:
    """Images per second over ``steps`` batches after ``warmup`` batches (workers started)."""
    it = data.train_iterator(
        ds, range(len(ds)), global_batch_size=batch, seed=0, num_workers=workers,
        process_index=0, process_count=1,
    )
    try:
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * batch / (time.perf_counter() - t0)
    finally:
        if hasattr(it, "close"):
            it.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--cache", default=None, help="dataset cache dir (default: a temp dir)")
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="lclsc_bench_")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    print(f"batch {args.batch}, {args.steps} timed steps, full augmentation\n")
    print("| image size | workers | images/s |")
    print("|---|---|---|")
    for size in args.sizes:
        cfg = data.SyntheticConfig(num_patients=8, images_per_patient=32, image_size=size)
        t0 = time.perf_counter()
        ds = data.load(synthetic=cfg, cache_dir=cache)
        build_s = time.perf_counter() - t0
        for w in args.workers:
            ips = measure(ds, w, args.batch, args.steps)
            print(f"| {size}x{size} | {w} | {ips:.0f} |", flush=True)
        print(f"<!-- {size}px: built {len(ds)} images in {build_s:.1f} s -->")


if __name__ == "__main__":
    main()
