"""Real-time streaming latency: frames one at a time through filter + classifier + saliency, as ``lclsc predict``.

    python experiments/bench/realtime.py [--n 300] [--archs tiny,resnet18] [--image-size 128] \
        [--saliency gradcam,sc,none] [--filter-arch tiny] [--out experiments/results/realtime]

For each backbone and saliency choice, a ``protocols.stream.StreamPredictor`` (the one compiled
per-frame function of ``lclsc predict VIDEO``: batch 1, fixed shapes, compiled at construction)
runs a frame filter (the same backbone, or ``--filter-arch``; linear head, 2 classes) and a GEI
classifier (3 classes) plus the saliency map (``gradcam`` at the last stage, ``sc`` the LCL-SC maps,
or ``none``) and the causal window, on ``--n`` frames of the pCLE simulator streamed one at a time. Warm-up (compilation
and 5 frames) is excluded. Weights are UNTRAINED (random init): latency does not depend on them.
Threads: whatever XLA uses on this machine (all cores). Writes ``latency.json`` and ``latency.md``
(p50/p90/p99/max ms per frame and frames/s) to ``--out``; a pCLE device streams ~12 frames/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from lclsc_jax import data
from lclsc_jax.data import FILTER_CLASSES
from lclsc_jax.protocols import stream
from lclsc_jax.train import config as C
from lclsc_jax.train import loop
from lclsc_jax.train import sharding as shd

DEVICE_FPS = 12.0  # a pCLE device's frame rate
WARMUP = 5


def _untrained(arch: str, image_size: int, loss: str, n_classes: int, seed: int):
    """``(model, variables, global_emb, cfg)`` of a freshly initialised run (random unit class embeddings)."""
    cfg = C.load("tiny", {"model.arch": arch, "data.image_size": image_size, "loss.name": loss, "seed": seed,
                          **({"model.embed_dim": 128} if arch != "tiny" else {})})
    model = loop.build_model(cfg, n_classes)
    state = loop.init_state(cfg, model, n_classes, shd.make_mesh(1))
    g = np.random.default_rng(seed).normal(size=(n_classes, cfg.model.embed_dim)).astype(np.float32)
    return model, state.variables, g / np.linalg.norm(g, axis=1, keepdims=True), cfg


def _frames(n: int, image_size: int) -> np.ndarray:
    """``(n, S, S, 1)`` uint8 simulator frames (cycled when the simulator gives fewer)."""
    imgs = data.generate_arrays(data.synthetic_config(image_size=image_size, num_patients=3,
                                                      images_per_patient=8))["image"]
    return imgs[np.arange(n) % len(imgs)]


def measure(arch: str, saliency: str, n: int, image_size: int, filter_arch: str | None = None) -> dict:
    """Latency statistics of ``n`` frames streamed through filter + classifier + ``saliency`` for ``arch``.

    ``filter_arch``: the filter's backbone (default: the classifier's).
    """
    model, variables, g, cfg = _untrained(arch, image_size, "lcl_sc", 3, 0)
    fmodel, fvars, _, fcfg = _untrained(filter_arch or arch, image_size, "ce", len(FILTER_CLASSES), 1)
    t0 = time.perf_counter()
    sp = stream.StreamPredictor(model, variables, cfg, ("healthy", "glioma", "meningioma"), global_emb=g,
                                filter_model=fmodel, filter_variables=fvars, filter_cfg=fcfg, saliency=saliency,
                                window=12)
    frames = _frames(n + WARMUP, image_size)
    for f in frames[:WARMUP]:
        sp(f)
    compile_s = time.perf_counter() - t0
    lat = []
    t1 = time.perf_counter()
    for f in frames[WARMUP:]:
        lat.append(sp(f)["latency_ms"])
    wall = time.perf_counter() - t1
    lat = np.asarray(lat)
    return {"arch": arch, "filter_arch": filter_arch or arch, "saliency": saliency, "image_size": image_size,
            "frames": n,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()), "mean_ms": float(lat.mean()),
            "frames_per_s": n / wall, "keeps_up": bool(np.percentile(lat, 99) <= 1e3 / DEVICE_FPS),
            "warmup_s": compile_s}


def to_markdown(rows: list[dict], meta: dict) -> str:
    """A markdown table of :func:`measure` rows."""
    head = (f"Streaming latency per frame, batch 1, filter + classifier + saliency + causal window, "
            f"{rows[0]['image_size']} px, {rows[0]['frames']} frames after warm-up; untrained weights; "
            f"{meta['device']} ({meta['cpu_count']} CPU cores). A pCLE device streams {DEVICE_FPS:g} frames/s "
            f"({1e3 / DEVICE_FPS:.0f} ms/frame).\n\n")
    lines = ["| backbone | filter | saliency | p50 ms | p90 ms | p99 ms | max ms | frames/s | p99 <= 83 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['filter_arch']} | {r['saliency']} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['frames_per_s']:.1f} | "
                     f"{'yes' if r['keeps_up'] else 'no'} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="frames timed per configuration (default 300)")
    ap.add_argument("--archs", default="tiny,resnet18")
    ap.add_argument("--saliency", default="gradcam,sc,none")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--filter-arch", help="backbone of the frame filter (default: the classifier's own)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results", "realtime"))
    args = ap.parse_args()
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "")
    meta = {"device": d.platform if kind in ("", d.platform) else f"{d.platform} ({kind})", "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(), "weights": "untrained (random init)"}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for arch in args.archs.split(","):
        for sal in args.saliency.split(","):
            r = measure(arch, sal, args.n, args.image_size, args.filter_arch)
            rows.append(r)
            print(f"{arch:>10} {sal:>8}: p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                  f"{r['frames_per_s']:.1f} frames/s", flush=True)
            with open(os.path.join(args.out, "latency.json"), "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "latency.md"), "w") as f:
        f.write(to_markdown(rows, meta))
    print(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
