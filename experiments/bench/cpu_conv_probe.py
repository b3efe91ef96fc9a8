"""Where XLA CPU loses to PyTorch on small ResNets: one 3x3 conv per ResNet-18 stage, fwd and bwd.

    python experiments/bench/cpu_conv_probe.py [--batch 32] [--image-size 64] [--reps 5]

For each stage's 3x3 stride-1 convolution at the spatial size a ``--image-size`` input gives it
(ResNet-18: /4, /8, /16, /32), times in JAX (jit, NHWC/HWIO, float32) and PyTorch (NCHW) on the
same shapes: the forward, the input gradient and the filter gradient (each its own compiled
function / autograd call). Prints a Markdown table of milliseconds and the JAX/PyTorch ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def jax_times(b: int, s: int, c: int, reps: int) -> dict[str, float]:
    """Forward, input-gradient and filter-gradient ms of a 3x3 SAME conv ``(b, s, s, c) -> c``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, s, s, c), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32) * 0.05)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x_, w_):
        return jax.lax.conv_general_dilated(x_, w_, (1, 1), "SAME", dimension_numbers=dn)

    fwd = jax.jit(conv)
    dx = jax.jit(jax.grad(lambda x_, w_: jnp.sum(conv(x_, w_) ** 2) * 0.5, argnums=0))
    dw = jax.jit(jax.grad(lambda x_, w_: jnp.sum(conv(x_, w_) ** 2) * 0.5, argnums=1))
    return {"fwd": _time(lambda: fwd(x, w).block_until_ready(), reps),
            "dx": _time(lambda: dx(x, w).block_until_ready(), reps),
            "dw": _time(lambda: dw(x, w).block_until_ready(), reps)}


def torch_times(b: int, s: int, c: int, reps: int) -> dict[str, float]:
    """The same three in PyTorch (the bwd times subtract the forward, as autograd runs both)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((b, c, s, s), np.float32))
    w = torch.from_numpy(rng.standard_normal((c, c, 3, 3), np.float32) * 0.05)
    f = lambda x_, w_: torch.nn.functional.conv2d(x_, w_, padding=1)  # noqa: E731
    with torch.no_grad():
        fwd = _time(lambda: f(x, w), reps)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def grad_of(t):
        def run():
            out = f(xg if t is xg else x, wg if t is wg else w)
            (g,) = torch.autograd.grad((out ** 2).sum() * 0.5, t)
            return g
        return run

    return {"fwd": fwd, "dx": _time(grad_of(xg), reps) - fwd, "dw": _time(grad_of(wg), reps) - fwd}


def main(argv: list[str] | None = None) -> None:
    """Print the per-stage table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"3x3 conv, batch {args.batch}, ResNet-18 stage shapes for a {args.image_size}px input, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}\n")
    print("| stage | spatial | channels | op | JAX ms | PyTorch ms | JAX/PyTorch |")
    print("|---|---|---|---|---:|---:|---:|")
    for k, (div, c) in enumerate(((4, 64), (8, 128), (16, 256), (32, 512)), start=1):
        s = max(1, args.image_size // div)
        jt, tt = jax_times(args.batch, s, c, args.reps), torch_times(args.batch, s, c, args.reps)
        for op in ("fwd", "dx", "dw"):
            print(f"| stage{k} | {s}x{s} | {c} | {op} | {jt[op]:.2f} | {tt[op]:.2f} | "
                  f"{jt[op] / max(tt[op], 1e-3):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
