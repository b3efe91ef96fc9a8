"""Compile time, step time and correctness of the sharded train step on 1, 2, 4, 8 CPU devices.

    python experiments/bench/scaling.py [--devices 1,2,4,8] [--arch tiny --image-size 64 \
        --loss lcl_sc --batch 32 --steps 5] [--out scaling.json]

One subprocess per device count with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(the flag must be set before JAX starts), the same *global* batch everywhere, batch-sharded
over the ``data`` axis with the state replicated. Every run starts from the same seed and
takes the same three batches; the loss of the third step and a checksum of the parameters
after it must agree across device counts (the losses, BN and the EMA all see the global
batch). The simulated devices share the host's cores, so step times show the cost of
partitioning and collectives on one machine, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run in a subprocess whose XLA_FLAGS fixed the device count; returns the measurements."""
    import jax
    import numpy as np

    sys.path.insert(0, HERE)
    import train_step as tsb
    from lclsc_jax.train import sharding as shd

    mesh = shd.make_mesh()
    cfg = tsb.make_config(args.arch, args.image_size, 1, args.dtype, args.loss, args.batch)
    shd.check_batch_size(args.batch, mesh)
    bench = tsb.Bench(cfg, mesh).compile()

    # Correctness: three different batches from the same initial state.
    state = bench.new_state()
    losses = []
    for seed in range(3):
        state, metrics = bench.compiled(state, tsb.synthetic_batch(cfg, mesh, seed=seed))
        losses.append(float(jax.device_get(metrics["loss"])))
    params = jax.device_get(state.params)
    checksum = float(sum(np.abs(np.asarray(p, np.float64)).sum() for p in jax.tree_util.tree_leaves(params)))
    emb = np.asarray(jax.device_get(state.global_emb), np.float64)

    timing = bench.time(args.steps, warmup=2, repeats=args.repeats)
    return {"devices": jax.device_count(), "compile_s": bench.compile_s, "step_s": timing["step_s"],
            "images_per_s": args.batch / timing["step_s"], "losses": losses, "param_abs_sum": checksum,
            "global_emb": emb.tolist(), "loadavg_1m": round(os.getloadavg()[0], 2)}


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One worker subprocess per device count."""
    rows = []
    for n in map(int, args.devices.split(",")):
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env = dict(os.environ, XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]),
                   JAX_PLATFORMS="cpu")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--arch", args.arch,
               "--image-size", str(args.image_size), "--loss", args.loss, "--batch", str(args.batch),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--dtype", args.dtype]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{n} devices failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{n} devices: loss@3 {row['losses'][-1]:.9f}, {1e3 * row['step_s']:.1f} ms/step", file=sys.stderr,
              flush=True)
    return rows


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import numpy as np

    ref = rows[0]
    head = ("| devices | compile s | step ms | images/s | loss step 1 | loss step 3 | max loss diff vs "
            f"{ref['devices']} dev | param |sum| rel. diff | EMA emb max diff | load 1m |")
    lines = [f"{args.arch} {args.image_size}x{args.image_size}, loss {args.loss}, {args.dtype}, global batch "
             f"{args.batch}, {os.cpu_count()} host CPUs", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        dl = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        dp = abs(r["param_abs_sum"] - ref["param_abs_sum"]) / ref["param_abs_sum"]
        de = float(np.max(np.abs(np.asarray(r["global_emb"]) - np.asarray(ref["global_emb"]))))
        lines.append(f"| {r['devices']} | {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} "
                     f"| {r['losses'][0]:.7f} | {r['losses'][-1]:.7f} | {dl:.1e} | {dp:.1e} | {de:.1e} "
                     f"| {r['loadavg_1m']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--loss", default="lcl_sc")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=32, help="global batch (divisible by every device count)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = run_all(args)
    print(table(rows, args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
