"""Parity table of every registry backbone against its PyTorch reference (issue 16).

    python experiments/backbone_parity.py [--archs a,b] [--image-size 96] [--out experiments/results/backbones]

For each arch: the reference (timm, or the project's torch module for LeNet-5 / AlexNet) with
random weights, random BatchNorm statistics and a 5-class classifier is saved as ``.pth`` and as
``.safetensors``; each file goes through ``interop.verify`` (the ``lclsc verify`` library call:
the JAX model the file fills vs the reference, every stage, pooled features and logits, float32).
Then the JAX variables are exported (``interop.export_torch_weights``) and the exported file is
verified again (the round trip). For scale, the reference's own float32 vs float64 logit gap on
the same batch is shown too. Writes ``parity.md`` and ``parity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from lclsc_jax import interop, models
from lclsc_jax.interop import torch_reference as tref
from lclsc_jax.interop.timm_reference import reference_model

K = 5


def float64_gap(net, arch: str, size: int, channels: int) -> float:
    """max |logits_float32 - logits_float64| of the reference itself on one random batch."""
    import copy

    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, channels, size, size)).astype(np.float32))
    with torch.no_grad():
        a = net(x)
        b = copy.deepcopy(net).double()(x.double())
    a = a[0] if isinstance(a, tuple) else a
    b = b[0] if isinstance(b, tuple) else b
    return float((a.double() - b).abs().max())


# How each reference's random weights are drawn so its activations stay O(1) through the depth:
# "he": every conv/linear weight re-drawn He-normal (timm's InceptionV3 init with random BN statistics
# reaches 1e10; torch's AlexNet init gives logits of 1e-2); "affine": timm's matrices kept, norm
# affines, biases, layer scales and tokens randomised (timm starts them at 1/0/1e-6, which would hide
# a mis-mapped one); absent: timm's init as it is (with random BN statistics, as for every arch).
WEIGHTS = {"inception_v3": "he", "inception_v3_aux": "he", "alexnet": "he", "lenet5": "he",
           "vit_small_patch16": "affine", "vit_small_patch16_gap": "affine", "vit_base_patch16": "affine",
           "vit_base_patch16_gap": "affine", "convnext_tiny": "affine"}


def realistic_weights(net, mode: str, seed: int = 0) -> None:
    """Re-draw every conv/linear weight He-normal (std sqrt(2 / fan_in)), biases and norm affines around
    their defaults, and layer scales / tokens at O(0.1), so activations stay O(1) through the depth
    (timm's own init with random BN statistics reaches 1e10 in InceptionV3, where float32 means nothing)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf == "weight":
                if mode == "he":
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            elif leaf == "weight":  # norm scales
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # biases, layer scales (gamma), cls_token, pos_embed
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def worst_stage(report) -> tuple[str, float]:
    """The stage with the largest relative difference and that difference."""
    stages = [d for d in report.diffs if d.name.startswith("features/")]
    d = max(stages, key=lambda d: d.max_rel)
    return d.name.removeprefix("features/"), d.max_rel


def logit_diff(report) -> float:
    """max |Δ logits| of a verify report."""
    return next(d.max_abs for d in report.diffs if d.name == "logits")


def logit_rel(report) -> float:
    """max |Δ logits| / max |logits| of a verify report."""
    return next(d.max_rel for d in report.diffs if d.name == "logits")


def run_arch(arch: str, size: int, tmp: str) -> dict:
    """The parity row of one arch."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = reference_model(arch, num_classes=K)
    if arch in WEIGHTS:
        realistic_weights(net, WEIGHTS[arch])
    tref.randomize_batch_norm(net, 0)
    net.eval()
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    pth, st = os.path.join(tmp, f"{arch}.pth"), os.path.join(tmp, f"{arch}.safetensors")
    torch.save(sd, pth)
    save_file(sd, st)
    row: dict = {"arch": arch, "image_size": size, "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    for name, path in (("pth", pth), ("safetensors", st)):
        t0 = time.perf_counter()
        rep = interop.verify(path, arch, image_size=size)
        row[name] = {"passed": rep.passed, "logits_max_abs": logit_diff(rep), "logits_max_rel": logit_rel(rep),
                     "worst_stage": worst_stage(rep),
                     "seconds": time.perf_counter() - t0}
    model, variables = interop.load_torch_model(st, arch)
    out = os.path.join(tmp, f"{arch}_export.safetensors")
    interop.export_torch_weights(variables, arch, out)
    rep = interop.verify(out, arch, image_size=size)
    row["export_round_trip"] = {"passed": rep.passed, "logits_max_abs": logit_diff(rep),
                                "worst_stage": worst_stage(rep)}
    row["torch_float32_vs_float64"] = float64_gap(net, arch, size, 3)
    return row


def markdown(rows: list[dict]) -> str:
    """One row per arch: logits max |Δ| for .pth / .safetensors / export round trip, worst stage."""
    lines = ["| arch | params M | px | .pth logits max abs | .safetensors logits max abs (rel.) | export round trip "
             "logits max abs | worst stage (rel.) | timm fp32 vs fp64 | all pass |", "|---" * 9 + "|"]
    for r in rows:
        ok = r["pth"]["passed"] and r["safetensors"]["passed"] and r["export_round_trip"]["passed"]
        ws = r["safetensors"]["worst_stage"]
        lines.append(f"| {r['arch']} | {r['params_m']:.1f} | {r['image_size']} | {r['pth']['logits_max_abs']:.1e} "
                     f"| {r['safetensors']['logits_max_abs']:.1e} ({r['safetensors']['logits_max_rel']:.1e}) "
                     f"| {r['export_round_trip']['logits_max_abs']:.1e} "
                     f"| {ws[0]} {ws[1]:.1e} | {r['torch_float32_vs_float64']:.1e} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


# A size each arch accepts (Inception needs >= 75 px, AlexNet >= 63) that keeps CPU time short.
SIZES = {"inception_v3": 96, "inception_v3_aux": 299, "lenet5": 32}  # timm runs the aux head in eval too: 299 px


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(models.BACKBONES))
    ap.add_argument("--image-size", type=int, default=64, help="default size (some archs override it)")
    ap.add_argument("--out", default="experiments/results/backbones")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [a for a in args.archs.split(",") if a]:
            size = SIZES.get(arch, args.image_size)
            t0 = time.perf_counter()
            rows.append(run_arch(arch, size, tmp))
            print(f"{arch}: logits {rows[-1]['safetensors']['logits_max_abs']:.1e} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    with open(os.path.join(args.out, "parity.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "parity.json"), "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
