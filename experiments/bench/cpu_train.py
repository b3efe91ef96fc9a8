"""CPU train-step images/s: this JAX step next to an equivalent PyTorch step, in the same run.

    python experiments/bench/cpu_train.py [--archs tiny,resnet18] [--sizes 64,128] \
        [--losses ce,lcl_sc] [--batch 32] [--steps 5] [--out cpu_train.json]
    python experiments/bench/cpu_train.py --variants [--archs resnet18 --sizes 64 --losses ce]

Both frameworks run forward + backward + AdamW update (global-norm clipping 1.0, weight decay
1e-4) on the same synthetic batch, with ``torch.set_num_threads`` = the CPU count and XLA's own
thread pool on the same cores. The PyTorch side mirrors the JAX model exactly (the tiny CNN
below; ``lclsc_jax.interop.torch_reference.torch_resnet`` for ResNets, NCHW, PyTorch's default)
and, for ``lcl_sc``, the whole objective: second view of every ``eq_stride``-th sample under a
D4 transform, prototype CE + SupCon against EMA class embeddings, TK-MMP saliency CE with the
field-of-view mask, the equivariance MSE, and the EMA update.

``--variants`` re-runs the JAX step in one subprocess per XLA/JAX setting (flags must be set
before JAX starts) and prints what each bought against the default setting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 4
EMBED_DIM = 128

# (name, XLA_FLAGS to add, extra CLI args for the JAX step). The first is the baseline.
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("default", "", []),
    ("bfloat16 compute", "", ["--dtype", "bfloat16"]),
    ("no donation", "", ["--no-donate"]),
    ("remat on", "", ["--set", "model.remat=true"]),
    ("eigen single-thread", "--xla_cpu_multi_thread_eigen=false", []),
    ("2 devices x 1 core (data parallel)", "--xla_force_host_platform_device_count=2", []),
    ("oneDNN on", "--xla_cpu_use_onednn=true", []),
    ("XNNPACK off", "--xla_cpu_use_xnnpack=false", []),
    ("fast math", "--xla_cpu_enable_fast_math=true", []),
    ("concurrency-optimised scheduler", "--xla_cpu_enable_concurrency_optimized_scheduler=true", []),
    ("new fusion emitters off", "--xla_cpu_use_fusion_emitters=false", []),
    ("prefer 512-bit vectors", "--xla_cpu_prefer_vector_width=512", []),
]


def median_step_s(run_steps, steps: int, warmup: int, repeats: int) -> float:
    """Median seconds per step over ``repeats`` windows of ``steps`` calls of ``run_steps(n)``."""
    run_steps(warmup)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(steps)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------


def jax_step_time(arch: str, size: int, loss: str, batch: int, steps: int, warmup: int, repeats: int,
                  dtype: str = "float32", donate: bool = True, extra: list[str] | None = None
                  ) -> dict[str, Any]:
    """Seconds per JAX train step (the project's step) and its compile time."""
    import jax

    sys.path.insert(0, HERE)
    import train_step as tsb  # the GPU benchmark's builder: same step, same synthetic batch
    from lclsc_jax.train import sharding as shd

    mesh = shd.make_mesh()
    cfg = tsb.make_config(arch, size, 1, dtype, loss, batch, extra)
    bench = tsb.Bench(cfg, mesh, donate=donate).compile()
    holder = {"state": bench.new_state()}

    def run(n: int) -> None:
        holder["state"], _ = bench.run(holder["state"], n)

    step_s = median_step_s(run, steps, warmup, repeats)
    return {"step_s": step_s, "compile_s": bench.compile_s, "flops": bench.flops,
            "devices": jax.device_count()}


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------


def torch_tiny_cnn(in_channels: int, num_classes: int | None, embed_dim: int | None) -> Any:
    """PyTorch twin of the Flax tiny CNN: five conv3x3-BN-ReLU stages, pooled, heads."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            chans, strides = (16, 32, 64, 128, 128), (1, 2, 2, 2, 1)
            layers, c_in = [], in_channels
            for c, s in zip(chans, strides):
                layers += [nn.Conv2d(c_in, c, 3, s, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
            self.body = nn.Sequential(*layers)
            self.fc = nn.Linear(c_in, num_classes) if num_classes else None
            self.head = (nn.Sequential(nn.Linear(c_in, c_in), nn.ReLU(), nn.Linear(c_in, embed_dim))
                         if embed_dim else None)

        def forward(self, x):
            f = self.body(x)
            pooled = torch.flatten(f.mean((2, 3)), 1)
            out = {"features": {"stage4": f}, "pooled": pooled}
            if self.fc is not None:
                out["logits"] = self.fc(pooled)
            if self.head is not None:
                out["embedding"] = self.head(pooled)
            return out

    return Tiny()


def torch_model(arch: str, loss: str) -> Any:
    """The PyTorch model of ``arch``: a linear head for CE, a projection head for LCL-SC."""
    from lclsc_jax.interop.torch_reference import torch_resnet

    num_classes, embed = (NUM_CLASSES, None) if loss == "ce" else (None, EMBED_DIM)
    if arch == "tiny":
        return torch_tiny_cnn(1, num_classes, embed)
    return torch_resnet(arch, num_classes=num_classes, in_channels=1, embed_dim=embed)


def _normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _d4(x, t: int, dims: tuple[int, int]):
    """The project's D4 convention (``lclsc_jax.method.transforms``) on the spatial ``dims`` (h, w)."""
    import torch

    y = torch.rot90(x, t % 4, dims=dims)
    return torch.flip(y, dims=(dims[1],)) if t >= 4 else y


def _tk_mmp(maps, mask, k: int, alpha: float = -1.0):
    """Masked top-k max minus bottom-k min over space of ``maps (B, h, w, C)`` -> ``(B, C)``."""
    import torch

    b, h, w, c = maps.shape
    flat = maps.reshape(b, h * w, c).transpose(1, 2)  # (B, C, n)
    valid = mask.reshape(1, 1, h * w)
    k_eff = min(k, int(mask.sum()))
    top = torch.where(valid, flat, float("-inf")).topk(k, dim=-1).values[..., :k_eff].mean(-1)
    bottom = torch.where(valid, flat, float("inf")).topk(k, dim=-1, largest=False).values[..., :k_eff].mean(-1)
    return top + alpha * bottom


def _supcon(z, y, tau: float):
    """Vectorised SupCon L_out (anchors without positives skipped)."""
    import torch

    zn = _normalize(z)
    sim = zn @ zn.T / tau
    eye = torch.eye(len(y), dtype=torch.bool)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, -1e9), dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    per = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    has = n_pos > 0
    return (per * has).sum() / has.sum().clamp_min(1)


def torch_lcl_sc_loss(model, x, y, g, seen, t, mask, *, tau=0.1, stride=4, k_frac=0.1):
    """The LCL-SC objective (same terms and defaults as ``lclsc_jax.train.steps``) and the z's."""
    import torch
    import torch.nn.functional as F

    sub = slice(None, None, stride)
    x_t = torch.stack([_d4(xi, int(ti), (1, 2)) for xi, ti in zip(x[sub], t)])
    out, out_t = model(x), model(x_t)
    z_all = torch.cat([out["embedding"], out_t["embedding"]])
    y_all = torch.cat([y, y[sub]])
    loss = F.cross_entropy(_normalize(z_all) @ _normalize(g).T / tau, y_all) + _supcon(z_all, y_all, tau)

    def maps_of(o):
        local = model.head(o["features"]["stage4"].permute(0, 2, 3, 1))  # (B, h, w, D)
        return _normalize(local) @ _normalize(g).T  # (B, h, w, C)

    maps, maps_t = maps_of(out), maps_of(out_t)
    h, w = maps.shape[1:3]
    k = max(1, min(h * w, int(k_frac * h * w + 0.5)))
    logits = _tk_mmp(torch.cat([maps, maps_t]), mask, k) / tau
    ce = F.cross_entropy(logits, y_all)
    target = torch.stack([_d4(m, int(ti), (0, 1)) for m, ti in zip(maps[sub], t)])
    m_t = torch.stack([_d4(mask[..., None].float(), int(ti), (0, 1)) for ti in t]) > 0.5
    eq = ((maps_t - target) ** 2 * m_t).sum() / (m_t.sum() * maps.shape[-1]).clamp_min(1)
    return loss + ce + eq, z_all.detach(), y_all


def torch_step_time(arch: str, size: int, loss: str, batch: int, steps: int, warmup: int, repeats: int
                    ) -> dict[str, Any]:
    """Seconds per PyTorch train step (forward, backward, clip, AdamW) of the twin model."""
    import torch
    import torch.nn.functional as F

    from lclsc_jax.evaluate.shortcuts import inscribed_disc

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = torch_model(arch, loss).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen)
    y = torch.arange(batch) % NUM_CLASSES
    g = _normalize(torch.randn(NUM_CLASSES, EMBED_DIM, generator=gen))
    seen = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    with torch.no_grad():
        h = model(x[:1])["features"]["stage4"].shape[-1]
    mask = torch.from_numpy(inscribed_disc(h, h))

    def one_step() -> None:
        nonlocal g, seen
        opt.zero_grad(set_to_none=True)
        if loss == "ce":
            total = F.cross_entropy(model(x)["logits"], y)
        else:
            t = torch.randint(0, 8, (len(range(0, batch, 4)),), generator=gen)
            total, z, y_all = torch_lcl_sc_loss(model, x, y, g, seen, t, mask)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if loss != "ce":
            with torch.no_grad():  # EMA of the class embeddings
                onehot = F.one_hot(y_all, NUM_CLASSES).float()
                counts = onehot.sum(0)
                means = onehot.T @ _normalize(z) / counts.clamp_min(1)[:, None]
                blended = torch.where(seen[:, None], 0.99 * g + 0.01 * means, means)
                g = torch.where((counts > 0)[:, None], _normalize(blended), g)
                seen = seen | (counts > 0)

    def run(n: int) -> None:
        for _ in range(n):
            one_step()

    return {"step_s": median_step_s(run, steps, warmup, repeats), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def side_by_side(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (arch, size, loss) cell: JAX and PyTorch images/s, their ratio, the load average."""
    rows = []
    for arch in args.archs.split(","):
        for size in map(int, args.sizes.split(",")):
            for loss in args.losses.split(","):
                row = {"arch": arch, "size": size, "loss": loss, "batch": args.batch, "load_before": load1()}
                if "jax" in args.frameworks:
                    row["jax"] = jax_step_time(arch, size, loss, args.batch, args.steps, args.warmup,
                                               args.repeats, args.dtype, not args.no_donate, args.set)
                if "torch" in args.frameworks:
                    row["torch"] = torch_step_time(arch, size, loss, args.batch, args.steps, args.warmup,
                                                   args.repeats)
                row["load_after"] = load1()
                rows.append(row)
                print(_row_md(row), flush=True) if args.stream else None
    return rows


def _ips(row: dict[str, Any], fw: str) -> float | None:
    return row["batch"] / row[fw]["step_s"] if fw in row else None


def _row_md(r: dict[str, Any]) -> str:
    j, t = _ips(r, "jax"), _ips(r, "torch")
    ratio = f"{t / j:.2f}x" if j and t else "n/a"
    fmt = lambda v: f"{v:.1f}" if v else "n/a"  # noqa: E731
    comp = f"{r['jax']['compile_s']:.1f}" if "jax" in r else "n/a"
    return (f"| {r['arch']} | {r['size']}x{r['size']} | {r['loss']} | {r['batch']} | {fmt(j)} | {fmt(t)} "
            f"| {ratio} | {comp} | {r['load_before']}/{r['load_after']} |")


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| arch | size | loss | batch | JAX images/s | PyTorch images/s | PyTorch/JAX | JAX compile s "
            "| load 1m before/after |")
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1)] + [_row_md(r) for r in rows])


def variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The JAX step under each entry of :data:`VARIANTS`, one subprocess each."""
    rows = []
    names = set(args.only.split(",")) if args.only else None
    for name, flags, extra in VARIANTS:
        if names and name not in names and name != "default":
            continue
        env = dict(os.environ, XLA_FLAGS=" ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f))
        cmd = [sys.executable, os.path.abspath(__file__), "--frameworks", "jax", "--json-stdout",
               "--archs", args.archs, "--sizes", args.sizes, "--losses", args.losses,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"variant {name!r} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            rows.append({"variant": name, "flags": flags, "args": extra, "error": proc.stderr[-500:]})
            continue
        cells = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"variant": name, "flags": flags, "args": extra, "cells": cells})
        print(f"{name}: " + ", ".join(f"{c['arch']}/{c['size']}/{c['loss']} {_ips(c, 'jax'):.1f} img/s "
                                      f"(load {c['load_before']})" for c in cells), file=sys.stderr, flush=True)
    return rows


def variants_table(rows: list[dict[str, Any]]) -> str:
    base = {(c["arch"], c["size"], c["loss"]): _ips(c, "jax") for c in rows[0].get("cells", [])}
    head = "| variant | XLA_FLAGS / args | cell | JAX images/s | vs default | load 1m |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        setting = " ".join([r["flags"], *r["args"]]).strip() or "(none)"
        if "error" in r:
            lines.append(f"| {r['variant']} | `{setting}` | - | failed | - | - |")
            continue
        for c in r["cells"]:
            ips = _ips(c, "jax")
            b = base.get((c["arch"], c["size"], c["loss"]))
            gain = f"{ips / b:.2f}x" if b else "n/a"
            lines.append(f"| {r['variant']} | `{setting}` | {c['arch']} {c['size']} {c['loss']} | {ips:.1f} "
                         f"| {gain} | {c['load_before']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="tiny,resnet18")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--losses", default="ce,lcl_sc")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per window")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    ap.add_argument("--frameworks", default="jax,torch")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX compute dtype")
    ap.add_argument("--no-donate", action="store_true", help="JAX: do not donate the state")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="JAX config overrides")
    ap.add_argument("--variants", action="store_true", help="compare XLA/JAX settings (subprocesses)")
    ap.add_argument("--only", default="", help="--variants: comma-separated variant names to run")
    ap.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.stream = not args.json_stdout and not args.variants

    if args.variants:
        rows = variants(args)
        print(variants_table(rows))
    else:
        if args.stream:
            print(f"{os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
            print(table([]))
        rows = side_by_side(args)
        if args.json_stdout:
            print(json.dumps(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": "variants" if args.variants else "side_by_side", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
