"""Seconds and peak memory per volume of every 3D explanation method, against MONAI's GradCAM and OcclusionSensitivity.

One MONAI 3D ResNet-18 (``conv1_t_stride=2``, random weights and BN statistics, eval mode) is
run in MONAI (PyTorch) and, imported with ``interop.monai3d``, in this project (JAX), on one
volume of the synthetic brain benchmark. Each method runs in its own process, so its peak
resident memory (``ru_maxrss``) is its own: the table gives the peak minus the process's
resident memory after the model and the volume were loaded, and the first call (with the
compile) and a second call (methods whose first call takes over 20 s are called once). Where the
method is the same (Grad-CAM at the last stage / MONAI's
``layer4``; occlusion with the same cube, stride and zero fill), the maps are correlated
(Pearson, ours vs MONAI's; for occlusion, our score drop vs MONAI's occluded logit, so -1 is
agreement and the table reports the absolute value).

    python experiments/bench/explain3d.py --size 64 --out experiments/results/explain3d
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

OURS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "ablationcam", "scorecam",
        "occlusion", "superpixel", "perturbation_generator")
MONAI = ("monai:gradcam", "monai:gradcam++", "monai:occlusion")
CAMS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "ablationcam", "scorecam")
NUM_CLASSES = 3


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _volume(size: int) -> np.ndarray:
    """One brain-benchmark volume ``(S, S, S, 1)`` in model-input units (``data.normalize_images``)."""
    from lclsc_jax import data
    from lclsc_jax.data import brain3d
    from lclsc_jax.data.settings import BrainConfig
    from lclsc_jax.data.volumes import normalize_intensity, to_uint8

    rec = brain3d.generate_subject(BrainConfig(size=size, n_subjects=3), 0)[0]
    return data.normalize_images(to_uint8(normalize_intensity(rec["image"])))


def _options(method: str, size: int) -> dict:
    patch = max(2, size // 4)
    if method == "occlusion":
        return {"patch_size": patch, "stride": patch // 2, "fill": 0.0, "chunk_size": 8}
    if method == "superpixel":
        return {"n_segments": 200, "chunk_size": 8}
    if method in ("ablationcam", "scorecam"):
        return {"chunk_size": 32}
    return {}


def child(method: str, size: int, out: str) -> dict:
    """Run one method on one volume in this process; return its timings and memory, save its map."""
    import torch

    from lclsc_jax.interop import monai3d

    torch.set_num_threads(os.cpu_count() or 1)
    net = monai3d.random_monai_resnet("resnet18_3d", 1, NUM_CLASSES, seed=0)
    x = _volume(size)[None]  # (1, S, S, S, 1)
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    with torch.no_grad():
        target = int(net(xt).argmax())
    if method.startswith("monai:"):
        from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity

        kind = method.split(":")[1]
        if kind == "occlusion":
            o = _options("occlusion", size)
            occ = OcclusionSensitivity(nn_module=net, mask_size=o["patch_size"], n_batch=8, mode=0.0, overlap=0.5,
                                       activate=False)

            def run() -> np.ndarray:
                with torch.no_grad():
                    m, _ = occ(xt)
                return np.asarray(m)[0, target]
        else:
            # Raw maps (MONAI's default post-processing maps (min, max) to (1, 0), for display).
            cam = (GradCAM if kind == "gradcam" else GradCAMpp)(nn_module=net, target_layers="layer4",
                                                                 postprocessing=lambda m: m)

            def run() -> np.ndarray:
                return cam(xt, class_idx=target).detach().numpy()[0, 0]
    else:
        import jax

        from lclsc_jax import explain

        model, variables = monai3d.monai_state_dict_to_variables(
            {k: v.detach().numpy() for k, v in net.state_dict().items()}, "resnet18_3d")
        name = method
        opts = _options(name, size)
        if name == "perturbation_generator":
            from lclsc_jax.train import relevance as rel

            gcfg = rel.GeneratorConfig()
            gen = rel.make_generator(gcfg)
            state = rel.init_state(gcfg, gen, x.shape[1:])
            opts = {"generator": gen, "generator_variables": {"params": state.params}}
        xj = jax.numpy.asarray(x)

        def run() -> np.ndarray:
            # CAMs: ReLU, upsample, min-max (as MONAI: ReLU before the upsampling); the rest raw.
            return np.asarray(explain.saliency(name, model, variables, xj, [target], stage="stage4",
                                               normalize=name in CAMS, **opts))[0]
    base = _current_rss_mib()
    t0 = time.perf_counter()
    m = run()
    t_first = time.perf_counter() - t0
    calls = 1
    t_second = t_first  # a slow method (minutes): the compile is a small part, one call is its cost
    if t_first < 20.0:
        calls = 2
        t0 = time.perf_counter()
        m = run()
        t_second = time.perf_counter() - t0
    peak = _rss_mib()
    np.save(os.path.join(out, "maps", method.replace(":", "_") + ".npy"), np.asarray(m, np.float32))
    return {"method": method, "size": size, "seconds_first": t_first, "seconds": t_second, "calls": calls,
            "peak_rss_mib": peak, "rss_before_mib": base, "peak_minus_before_mib": peak - base}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="voxels per side (default 64)")
    p.add_argument("--methods", nargs="+", default=list(OURS) + list(MONAI))
    p.add_argument("--out", default="experiments/results/explain3d")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = os.path.join(args.out, f"{args.size}")
    os.makedirs(os.path.join(out, "maps"), exist_ok=True)
    if args.child:
        print(json.dumps(child(args.child, args.size, out)), flush=True)
        return 0
    rows = []
    for method in args.methods:
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--out", args.out, "--child", method],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{method}: failed\n{r.stderr[-2000:]}", flush=True)
            rows.append({"method": method, "size": args.size, "error": r.stderr.strip().splitlines()[-1]})
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{method:>24}: {row['seconds']:.2f} s (first {row['seconds_first']:.2f} s), peak "
              f"{row['peak_rss_mib']:.0f} MiB (+{row['peak_minus_before_mib']:.0f}) [{time.time() - t0:.0f} s]",
              flush=True)
    maps = {f[:-4]: np.load(os.path.join(out, "maps", f)) for f in os.listdir(os.path.join(out, "maps"))}
    corr = {}
    for ours, ref, sign in (("gradcam", "monai_gradcam", 1), ("gradcam++", "monai_gradcam++", 1),
                            ("occlusion", "monai_occlusion", -1)):
        if ours in maps and ref in maps:
            corr[f"{ours} vs {ref}"] = sign * _corr(maps[ours], maps[ref])
    result = {"size": args.size, "machine": f"{os.cpu_count()} CPU cores", "rows": rows, "correlation": corr}
    with open(os.path.join(out, "explain3d.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(corr, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
