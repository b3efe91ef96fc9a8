"""Is the built-in pCLE benchmark honest? Generation time, shortcut audit, and the class-blind floor vs Grad-CAM.

    python experiments/honest_benchmark.py --out experiments/results/honest_benchmark
    python experiments/honest_benchmark.py --out ... --demo runs/demo     # also score a trained demo run

For each image size (default 64 and 128 px) on the default benchmark (24 patients x 40 frames):
  1. the time to generate it (NumPy, one process), without the TFDS write;
  2. ``lclsc audit-data``: patient-wise CV of global-statistics classifiers and the held-out-patient
     accuracy on the trainer's split; the best must stay near chance (1/3);
  3. with ``--demo``: ``benchmark-cams`` of the demo run (Grad-CAM and SC at the last stage) with the
     class-blind rows, and the ratio best blind Dice / Grad-CAM Dice (target <= 0.6).
Writes ``summary.json`` and ``summary.md`` under ``--out`` and the audit reports in sub-folders.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from lclsc_jax import data
from lclsc_jax.protocols import cam_benchmark
from lclsc_jax.protocols import audit
from lclsc_jax.train import loop

DICE_KEYS = ("dice@area", "dice@otsu", "dice@0.5", "pr_auc", "pointing_game")


def generation_seconds(cfg: data.SyntheticConfig) -> float:
    """Wall time to generate every frame of ``cfg`` in memory (one process)."""
    t0 = time.perf_counter()
    data.generate_arrays(cfg)
    return time.perf_counter() - t0


def audit_size(size: int, out: str, cache: str, folds: int) -> dict:
    """Audit the default benchmark at ``size`` px; returns the key numbers."""
    cfg = data.SyntheticConfig(image_size=size)
    ds = data.load(synthetic=cfg, cache_dir=cache)
    rep = audit.audit_dataset(ds, os.path.join(out, f"audit_{size}px"), folds=folds, progress=True)
    b = rep["best"]
    held = [(s["accuracy"], clf, g) for clf, by_g in rep["held_out"]["classifiers"].items() for g, s in by_g.items()]
    acc, clf, g = max(held)
    return {"size": size, "frames": len(ds),
            "best_cv": {"classifier": b["classifier"], "features": b["group"], "accuracy": b["accuracy"],
                        "balanced_accuracy": b["balanced_accuracy"], "ci": b["accuracy_ci"]},
            "best_held_out": {"classifier": clf, "features": g, "accuracy": acc},
            "top_statistic": rep["univariate"][0], "verdict": rep["verdict"], "chance": rep["chance"],
            "blind": rep.get("blind_maps")}


def floor_vs_gradcam(workdir: str, out: str, max_images: int) -> dict:
    """benchmark-cams of a trained run (Grad-CAM, SC at the last stage) with the blind rows; the ratios."""
    rows = cam_benchmark.benchmark_cams(workdir, ["gradcam", "sc"], ["last"], "test", max_images, (0.5,),
                                        os.path.join(out, "cam_benchmark"))
    by = {r["method"]: r for r in rows if not r["error"]}
    blind = {m: r for m, r in by.items() if m.startswith("blind:")}
    res: dict = {"rows": {m: {k: r.get(k) for k in DICE_KEYS} for m, r in by.items()}}
    for key in DICE_KEYS:
        if "gradcam" in by and blind and by["gradcam"].get(key):
            best = max(blind, key=lambda m: blind[m][key] or 0.0)
            res[f"ratio_{key}"] = {"best_blind": best, "blind": blind[best][key], "gradcam": by["gradcam"][key],
                                   "ratio": (blind[best][key] or 0.0) / by["gradcam"][key]}
    return res


def main() -> None:
    """Run the measurements and write the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/honest_benchmark")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--folds", type=int, default=8)
    ap.add_argument("--demo", help="a trained demo workdir to score (Grad-CAM vs the class-blind floor)")
    ap.add_argument("--max-images", type=int, default=240, help="test frames scored with --demo (default: all 240)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"sizes": {}}
    with tempfile.TemporaryDirectory() as cache:
        for size in args.sizes:
            secs = generation_seconds(data.SyntheticConfig(image_size=size))
            print(f"[honest] {size} px: generated 960 frames in {secs:.1f} s", flush=True)
            summary["sizes"][size] = {"generation_seconds": round(secs, 1), **audit_size(size, args.out, cache,
                                                                                        args.folds)}
    if args.demo:
        summary["demo"] = {"workdir": args.demo, **floor_vs_gradcam(args.demo, args.out, args.max_images)}
    loop.write_json(os.path.join(args.out, "summary.json"), summary)
    lines = ["| size | generation s | best global-statistics classifier, patient-wise CV [95% CI] "
             "| best on the held-out test patients | most predictive statistic | verdict |",
             "|---|---|---|---|---|---|"]
    for size, s in summary["sizes"].items():
        b, h, t = s["best_cv"], s["best_held_out"], s["top_statistic"]
        lines.append(f"| {size} px | {s['generation_seconds']} | {b['classifier']}/{b['features']}: "
                     f"{b['accuracy']:.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}] | {h['classifier']}/{h['features']}: "
                     f"{h['accuracy']:.3f} | {t['feature']} {t['accuracy']:.3f} | {s['verdict']['level']} |")
    if "demo" in summary:
        lines += ["", "| Dice | best blind map | blind | Grad-CAM | ratio |", "|---|---|---|---|---|"]
        for key in DICE_KEYS:
            r = summary["demo"].get(f"ratio_{key}")
            if r:
                lines.append(f"| {key} | {r['best_blind']} | {r['blind']:.3f} | {r['gradcam']:.3f} | {r['ratio']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
