"""Weakly supervised 3D tumour segmentation by relevance maps, on the synthetic brain benchmark (issue 18).

One CPU-sized study, every step through the library the CLI runs:

1. train a 3D classifier of tumour type (``--config brain3d``: tiny 3D CNN, LCL-SC) on the
   benchmark's training subjects;
2. train its optimal perturbation generator (``lclsc relevance train``);
3. ``benchmark-cams`` on the held-out test subjects: Grad-CAM, Grad-CAM++, SC maps, occlusion,
   supervoxel perturbation, the generator, and the class-blind baselines; maps thresholded at the
   tumour's own volume (Dice/IoU/HD95 at the mask's area, as ``benchmark-cams`` scores every map);
4. intervals from a patient bootstrap (one volume per subject, so subjects are the unit), and
   paired differences against Grad-CAM.

The seed paper (Rajapaksa & Khalvati 2022) reports Dice 0.44 for its relevance maps vs 0.11 for
Grad-CAM on BraTS: the *shape* to compare with, not a number to copy.

    python experiments/relevance3d.py --out experiments/results/relevance3d
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

METHODS = ("gradcam", "gradcam++", "sc", "occlusion", "superpixel", "perturbation_generator")
METRICS = ("dice@area", "iou@area", "hd95@area", "pr_auc")


def _log(msg: str) -> None:
    print(f"[relevance3d {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_classifier(workdir: str, args: argparse.Namespace) -> dict:
    """Step 1: the 3D classifier (resumes / skips when the run is finished)."""
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    overrides = {"data.image_size": args.size, "brain.n_subjects": args.subjects, "train.steps": args.steps,
                 "seed": args.seed}
    if args.cache_dir:
        overrides["data.cache_dir"] = args.cache_dir
    cfg = loop.resolve_config(workdir, C.load("brain3d"), overrides)
    return loop.train(cfg, workdir, progress=False)


def bootstrap_table(frames: dict, methods: list[str], n_boot: int) -> list[dict]:
    """Per method and metric: the test-volume mean with a 95% patient-bootstrap interval; Dice paired vs Grad-CAM."""
    from lclsc_jax.evaluate import statistics

    rows = []
    columns = frames["columns"]  # {(method, stage, metric): (N,)}
    patients = frames["patient"]

    def values(method: str, metric: str) -> np.ndarray | None:
        if metric == "iou@area":  # per volume, IoU = Dice / (2 - Dice) for the same two binary masks
            d = values(method, "dice@area")
            return None if d is None else d / (2.0 - d)
        hits = [v for (m, _, k), v in columns.items() if m == method and k == metric]
        return hits[0] if hits else None

    ref = values("gradcam", "dice@area")
    for method in methods:
        row: dict = {"method": method}
        for metric in METRICS:
            v = values(method, metric)
            if v is None:
                continue
            b = statistics.hierarchical_bootstrap(v, patients, n_boot=n_boot, levels="patients")
            row[metric] = {k: b[k] for k in ("estimate", "ci_low", "ci_high", "n_patients")}
        v = values(method, "dice@area")
        if ref is not None and v is not None and method != "gradcam":
            d = statistics.paired_bootstrap(v, ref, patients, n_boot=n_boot, levels="patients")
            row["dice_minus_gradcam"] = {k: d[k] for k in ("estimate", "ci_low", "ci_high")}
        rows.append(row)
    return rows


def _cell(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("estimate") is None:
        return "—"
    return f"{d['estimate']:.{digits}f} [{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def markdown(rows: list[dict], meta: dict) -> str:
    """The results as a Markdown table."""
    lines = [f"Test subjects: {meta['n_test']} ({meta['size']}^3 voxels); classifier test accuracy "
             f"{meta['test_accuracy']:.3f}; 95% intervals from {meta['n_boot']} patient-bootstrap resamples.", "",
             "| method | Dice@area | IoU@area | HD95@area (mm) | PR-AUC | Dice − Grad-CAM |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_cell(r.get('dice@area'))} | {_cell(r.get('iou@area'))} | "
                     f"{_cell(r.get('hd95@area'), 1)} | {_cell(r.get('pr_auc'))} | "
                     f"{_cell(r.get('dice_minus_gradcam'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/results/relevance3d")
    p.add_argument("--size", type=int, default=32, help="voxels per side (default 32)")
    p.add_argument("--subjects", type=int, default=90, help="subjects of the benchmark (default 90)")
    p.add_argument("--steps", type=int, default=600, help="classifier steps (default 600)")
    p.add_argument("--generator-steps", type=int, default=400, help="generator steps (default 400)")
    p.add_argument("--area-weight", type=float, default=0.1)
    p.add_argument("--supervoxels", type=int, default=0, help="generator masks pooled over supervoxels (0: voxels)")
    p.add_argument("--supervoxel-segments", type=int, default=100,
                   help="SLIC supervoxels of the `superpixel` perturbation baseline (default 100)")
    p.add_argument("--stage", default="stage3", help="CAM stage (default stage3: 4^3 cells at 32^3)")
    p.add_argument("--max-images", type=int, default=0, help="test volumes scored (0: all)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--rescore", action="store_true", help="reuse the benchmark's per-volume scores if written")
    args = p.parse_args(argv)

    from lclsc_jax.protocols import cam_benchmark, relevance

    os.makedirs(args.out, exist_ok=True)
    workdir = os.path.join(args.out, "run")
    t0 = time.time()
    _log(f"1/3 classifier -> {workdir}")
    summary = train_classifier(workdir, args)
    t_train = time.time() - t0
    _log(f"classifier done ({t_train:.0f} s): val {summary['val']}")
    t1 = time.time()
    gen = relevance.train_generator(workdir, steps=args.generator_steps, area_weight=args.area_weight,
                                    n_segments=args.supervoxels, seed=args.seed, log=_log)
    t_gen = time.time() - t1
    _log(f"2/3 generator done ({t_gen:.0f} s): {gen}")
    t2 = time.time()
    bench_dir = os.path.join(args.out, "cam_benchmark")
    frames_path = os.path.join(bench_dir, cam_benchmark.FRAME_FILE)
    if args.rescore and os.path.exists(frames_path):
        _log(f"3/3 reusing {frames_path} (--rescore)")
    else:
        cam_benchmark.benchmark_cams(workdir, list(METHODS), [args.stage], "test", args.max_images or None, (0.5,),
                                     bench_dir, specificity=False, progress=True,
                                     method_options={"occlusion": {"patch_size": args.size // 4,
                                                                   "stride": args.size // 8},
                                                     "superpixel": {"n_segments": args.supervoxel_segments}})
    t_bench = time.time() - t2
    frames = cam_benchmark.load_frames(frames_path)
    methods = list(METHODS) + [f"blind:{b}" for b in cam_benchmark.BLIND_VOLUME_MAPS]
    rows = bootstrap_table(frames, methods, args.n_boot)
    acc = float(np.mean(frames["predicted"] == frames["label"]))
    meta = {"size": args.size, "subjects": args.subjects, "classifier_steps": args.steps,
            "generator_steps": args.generator_steps, "area_weight": args.area_weight,
            "supervoxels": args.supervoxels, "stage": args.stage, "n_test": int(len(frames["index"])),
            "test_accuracy": acc, "n_boot": args.n_boot, "seconds": {"classifier": t_train, "generator": t_gen,
                                                                    "benchmark": t_bench},
            "machine": f"{os.cpu_count()} CPU cores", "val": summary["val"], "generator": gen}
    with open(os.path.join(args.out, "relevance3d.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2, default=float)
    md = markdown(rows, meta)
    with open(os.path.join(args.out, "relevance3d.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
