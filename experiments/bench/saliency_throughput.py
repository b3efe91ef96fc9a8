"""Saliency throughput: maps per second per method, ResNet-18 at 224x224, JAX vs pytorch-grad-cam.

    python experiments/bench/saliency_throughput.py                    # all methods, JAX only
    python experiments/bench/saliency_throughput.py --torch            # + pytorch-grad-cam, same weights
    python experiments/bench/saliency_throughput.py --methods gradcam ablationcam crm scorecam --torch

Prints a Markdown table. JAX timings exclude compilation (one warm-up call per method); each
method is timed on ``--batch`` images (Score-CAM and other heavy methods on ``--heavy-batch``).
pytorch-grad-cam needs ``pip install --no-deps grad-cam==1.5.7 ttach opencv-python-headless``;
torchvision is stubbed when missing (it is only used for preprocessing there).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax import explain, models

TORCH_CLASSES = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "gradcam++": "GradCAMPlusPlus",
                 "xgradcam": "XGradCAM", "layercam": "LayerCAM", "gradcam_elementwise": "GradCAMElementWise",
                 "eigencam": "EigenCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM", "fullgrad": "FullGrad"}
HEAVY = ("scorecam", "occlusion", "superpixel", "smoothgrad", "integrated_gradients", "fullgrad")
# Measured by the lead on this 2-core machine with pytorch-grad-cam 1.5.7 (maps/s), for reference.
LEAD_TORCH = {"gradcam": 4.3, "scorecam": 0.081, "ablationcam": 0.078}


def _stub_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        fn, ops = types.ModuleType("torchvision.transforms.functional"), types.ModuleType("torchvision.ops")
        tr.Compose = tr.Normalize = tr.ToTensor = fn.resize = ops.box_iou = None
        tr.functional, tv.transforms, tv.ops = fn, tr, ops
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                            "torchvision.transforms.functional": fn, "torchvision.ops": ops})


def time_jax(method, model, variables, x, targets, reps: int) -> float:
    """Maps per second of ``explain.saliency`` (compiled; compilation excluded)."""
    f = lambda: explain.saliency(method, model, variables, x, targets, "stage4").block_until_ready()  # noqa: E731
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return reps * x.shape[0] / (time.perf_counter() - t0)


def time_torch(method, net, x_np, targets) -> float:
    import torch

    _stub_torchvision()
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Logits(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, xx):
            return self.n(xx)["logits"]

    w = Logits(net).eval()
    cam = getattr(pgc, TORCH_CLASSES[method])(model=w, target_layers=[] if method == "fullgrad" else [net.layer4])
    xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    tg = [ClassifierOutputTarget(int(t)) for t in targets]
    if method in ("gradcam", "hirescam", "gradcam++", "xgradcam", "layercam", "gradcam_elementwise", "eigencam"):
        cam(input_tensor=xt, targets=tg)  # warm-up
    t0 = time.perf_counter()
    cam(input_tensor=xt, targets=tg)
    return x_np.shape[0] / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=[m for m in explain.METHODS if m != "sc"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heavy-batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--torch", action="store_true", help="also time pytorch-grad-cam on the same weights")
    p.add_argument("--torch-batch", type=int, default=1)
    args = p.parse_args(argv)

    model = models.create("resnet18", 5, head="linear")
    rs = np.random.RandomState(0)
    x_all = rs.randn(max(args.batch, args.heavy_batch, args.torch_batch), args.size, args.size, 3).astype(np.float32)
    net = None
    if args.torch:
        import torch

        from lclsc_jax.interop import load_torch_weights
        from lclsc_jax.interop.torch_reference import randomize_batch_norm, torch_resnet

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count() or 1)
        net = torch_resnet("resnet18", num_classes=5, embed_dim=128)
        randomize_batch_norm(net, 0)
        net.eval()
        variables = load_torch_weights({k: v.detach().numpy() for k, v in net.state_dict().items()}, "resnet18")
    else:
        variables = model.init(jax.random.key(0), jnp.asarray(x_all[:1]), train=False)
    targets_all = np.asarray(jnp.argmax(model.apply(variables, jnp.asarray(x_all), train=False)["logits"], -1))

    rows = []
    for m in args.methods:
        b = args.heavy_batch if m in HEAVY else args.batch
        x, t = jnp.asarray(x_all[:b]), jnp.asarray(targets_all[:b])
        jx = time_jax(m, model, variables, x, t, args.reps)
        tt = None
        if net is not None and m in TORCH_CLASSES:
            tb = args.torch_batch
            tt = time_torch(m, net, x_all[:tb], targets_all[:tb])
        ref = tt if tt is not None else LEAD_TORCH.get(m)
        rows.append((m, b, jx, tt, LEAD_TORCH.get(m), None if ref is None else jx / ref))
        print(f"# {m}: {jx:.3f} maps/s" + (f", torch {tt:.3f}" if tt else ""), file=sys.stderr, flush=True)

    print(f"\nResNet-18, {args.size}x{args.size}, CPU ({os.cpu_count()} cores, {platform.processor() or 'cpu'}), "
          f"jax {jax.__version__}\n")
    print("| method | JAX batch | JAX maps/s | pytorch-grad-cam maps/s (here) | lead's torch maps/s | ratio JAX/torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, b, jx, tt, lead, ratio in rows:
        fmt = lambda v: "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")  # noqa: E731
        print(f"| {m} | {b} | {fmt(jx)} | {fmt(tt)} | {fmt(lead)} | {'-' if ratio is None else f'{ratio:.1f}x'} |")


if __name__ == "__main__":
    main()
