"""Train-step images/s of every backbone in JAX next to the same model in PyTorch (timm), in one run.

    python experiments/bench/backbones.py [--archs resnet18,tf_efficientnetv2_s,...] [--image-size 128] \
        [--batch 32] [--dtype float32] [--steps 5] [--torch] [--torch-compile] [--out backbones.json]

For every arch: the project's own train step (``lclsc train``'s: cross-entropy on a linear head,
AdamW, global-norm clipping, donated state) on a device-resident synthetic batch of 3-channel
images, timed as ``train_step.py`` times it (median of windows); XLA's cost analysis of the
compiled step gives its FLOPs and, with the device's peak, the MFU; the forward alone gives the
forward FLOPs per image. With ``--torch`` the same architecture runs in PyTorch in the same
process: timm's model (or the project's torch reference for LeNet-5 / AlexNet), cross-entropy +
AdamW, forward + backward + step, on the GPU when there is one with channels_last and AMP
bfloat16 (``--dtype bfloat16``) and optionally ``torch.compile`` (``--torch-compile``). Results
are written after every arch, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402 - the project's step benchmark, shared

from lclsc_jax import models  # noqa: E402

DEFAULT_ARCHS = ("lenet5", "alexnet", "resnet18", "resnet50", "tf_efficientnetv2_s", "efficientnetv2_s",
                 "inception_v3", "vit_small_patch16", "vit_base_patch16", "convnext_tiny", "densenet121")
TOKEN_ARCHS = ("vit",)


def forward_flops(bench: ts.Bench, batch: int) -> float | None:
    """FLOPs of one inference forward per image: XLA's cost analysis of the *lowered* (unoptimised) HLO.

    The lowered count is the model's arithmetic on every backend; a compiled GPU program hides its
    convolutions and attention in cuDNN custom calls, which the compiled cost analysis does not count.
    """
    state = jax.eval_shape(bench.new_state)
    fn = jax.jit(lambda v, x: bench.model.apply(v, x, train=False)["logits"])
    flops = ts.flops_of(fn.lower(state.variables, bench.batch["image"]).cost_analysis())
    return flops / batch if flops else None


def step_flops(bench: ts.Bench) -> float | None:
    """FLOPs of one train step from the lowered HLO (backend-independent; see :func:`forward_flops`)."""
    return ts.flops_of(bench.jitted.lower(jax.eval_shape(bench.new_state), bench.batch).cost_analysis())


def jax_row(arch: str, args: argparse.Namespace, mesh: Any, peak: float | None) -> dict[str, Any]:
    """Compile and time the project's CE train step of ``arch``; its FLOPs and MFU."""
    cfg = ts.make_config(arch, args.image_size, 3, args.dtype, "ce", args.batch, args.set)
    bench = ts.Bench(cfg, mesh)
    if args.flops_only:  # trace only: the arithmetic of the step and the forward, nothing compiled or run
        return {"arch": arch, "image_size": args.image_size, "batch": args.batch,
                "step_gflop": (step_flops(bench) or float("nan")) / 1e9,
                "forward_gflop_per_image": (forward_flops(bench, args.batch) or float("nan")) / 1e9,
                "params_m": models.num_params(jax.eval_shape(bench.new_state).variables) / 1e6}
    bench.compile()
    timing = bench.time(args.steps, args.warmup, args.repeats)
    bench.flops = step_flops(bench)  # MFU from the model's arithmetic, not the compiled program's count
    row = ts.result_row(bench, timing, peak)
    row["forward_gflop_per_image"] = (forward_flops(bench, args.batch) or float("nan")) / 1e9
    row["params_m"] = models.num_params(bench.new_state().variables) / 1e6
    del bench
    gc.collect()
    return row


def torch_row(arch: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time forward + backward + AdamW of the PyTorch model of ``arch`` on one synthetic batch."""
    import torch

    from lclsc_jax.interop.timm_reference import reference_model, require_timm

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    if arch in models.BACKBONES:
        net = reference_model(arch, num_classes=ts.NUM_CLASSES, in_channels=3)
    else:  # the ResNets: timm's are torchvision's architecture
        net = require_timm().create_model(arch, pretrained=False, num_classes=ts.NUM_CLASSES)
    net = net.to(dev).train()
    cnn = not any(t in arch for t in TOKEN_ARCHS)
    fmt = torch.channels_last if (cuda and cnn) else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev).to(memory_format=fmt)
    y = torch.arange(args.batch, device=dev) % ts.NUM_CLASSES
    amp = cuda and args.dtype == "bfloat16"

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = net(x)
            out = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return loss

    fn = torch.compile(step) if args.torch_compile else step
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    windows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        windows.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(windows)
    gc.collect()
    return {"torch_step_s": step_s, "torch_images_per_s": args.batch / step_s, "torch_warmup_s": warm_s,
            "torch_compile": bool(args.torch_compile), "torch_amp_bf16": amp,
            "torch_channels_last": fmt == torch.channels_last, "torch_version": torch.__version__}


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    """The results as one Markdown table."""
    head = ("| arch | params M | fwd GFLOP/img | batch | JAX compile s | JAX step ms | JAX images/s | MFU "
            "| PyTorch images/s | JAX / PyTorch |")
    lines = [f"device: {info['device_count']} x {info['device_kind']} ({info['platform']}), jax {info['jax']}, "
             f"{args.image_size} px, 3 channels, {args.dtype}, batch {args.batch}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        tips = r.get("torch_images_per_s")
        t_txt = f"{tips:.1f}" if tips else "n/a"
        ratio = f"{r['images_per_s'] / tips:.2f}x" if tips else "n/a"
        lines.append(
            f"| {r['arch']} | {r['params_m']:.1f} | {r['forward_gflop_per_image']:.3f} | {r['batch']} "
            f"| {r['compile_s']:.1f} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} | {mfu} "
            f"| {t_txt} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per window")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch model in the same run")
    ap.add_argument("--torch-compile", action="store_true", help="wrap the PyTorch step in torch.compile")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--flops-only", action="store_true",
                    help="only trace: FLOPs per train step and per forward image, nothing compiled or run")
    ap.add_argument("--out", default=None, help="write the results as JSON here (after every arch)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in models.ARCHS]
    if unknown:
        print(f"skipping unknown archs {unknown}; known: {models.ARCHS}", file=sys.stderr)
        archs = [a for a in archs if a in models.ARCHS]
    info = ts.machine_info()
    mesh = ts.shd.make_mesh()
    peak = ts.peak_flops(info["device_kind"], args.dtype)
    rows: list[dict[str, Any]] = []
    for arch in archs:
        t0 = time.perf_counter()
        try:
            row = jax_row(arch, args, mesh, peak)
            if args.torch and arch != "tiny":  # the tiny CNN has no PyTorch twin
                row.update(torch_row(arch, args))
        except Exception as err:  # noqa: BLE001 - one arch failing must not lose the others' results
            print(f"{arch}: FAILED {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            continue
        rows.append(row)
        if args.flops_only:
            print(f"{arch}: {row['step_gflop']:.1f} GFLOP/step, {row['forward_gflop_per_image']:.2f} GFLOP/image "
                  "forward", file=sys.stderr, flush=True)
            continue
        print(f"{arch}: JAX {row['images_per_s']:.1f} images/s"
              + (f", PyTorch {row['torch_images_per_s']:.1f}" if "torch_images_per_s" in row else "")
              + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"machine": info, "args": vars(args), "peak_flops_per_device": peak, "results": rows},
                          f, indent=2, default=float)
        jax.clear_caches()
    if args.out and args.flops_only:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2, default=float)
    if not args.flops_only:
        print(markdown(rows, info, args))
    return rows


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
