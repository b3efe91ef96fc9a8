"""The ``lclsc`` command: train, evaluate, predict, explain, cv, benchmark-cams, ablate, verify, demo, config."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

DATA_HELP = "synthetic (built-in synthetic pCLE data), a folder ROOT/<class>/<patient>/<frame>.png, or a CSV manifest"


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="coordinator address host:port (or $LCLSC_COORDINATOR); "
                   "LCLSC_DISTRIBUTED=1 uses JAX's cluster auto-detection (SLURM, MPI, TPU)")
    g.add_argument("--num-processes", type=int, help="number of processes (or $LCLSC_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's index (or $LCLSC_PROCESS_ID)")
    g.add_argument("--local-devices", type=int, help="devices this process uses (default: all local ones)")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="best",
                   help="which checkpoint: best (by validation metric), latest, or a step number (default: best)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from lclsc_jax.train.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="lclsc", description="Interpretable classification of endomicroscopy images with LCL-SC (JAX/Flax).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lclsc demo --workdir runs/demo\n"
               "  lclsc train --workdir runs/r18 --config default --set train.steps=3000 model.arch=resnet18\n"
               "  lclsc evaluate --workdir runs/r18 --split test\n"
               "  lclsc predict --workdir runs/r18 frame1.png frame2.png --json\n"
               "  lclsc explain --workdir runs/r18 --method gradcam --stage stage4 frame1.png --out maps/\n"
               "  lclsc cv --workdir runs/cv5 --config demo --folds 5\n"
               "  lclsc benchmark-cams --workdir runs/demo --methods gradcam sc eigencam --stages stage2 last\n"
               "  lclsc ablate --preset quick --out runs/ablation --workers 2")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume) a run", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model in WORKDIR; an existing WORKDIR is resumed from its latest "
                                   "checkpoint (model, optimizer, EMA class embeddings and data position).",
                       epilog="config keys: see `lclsc config --list`; presets: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--workdir", required=True, help="run directory (config, checkpoints, metrics, TensorBoard)")
    p.add_argument("--data", help=DATA_HELP + " (default: the config's data.source)")
    p.add_argument("--config", help="preset name or JSON file (default: 'default', or the workdir's saved config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. train.lr=3e-4")
    p.add_argument("--init-from", metavar="FILE", help="start the backbone from PyTorch weights (.pt/.pth/.safetensors, "
                   "torchvision naming); the heads are re-initialised")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_distributed(p)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a patient-wise split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", help=DATA_HELP + " (default: the run's data)")
    p.add_argument("--split", default="test", help="train, val, test (default) or all")
    p.add_argument("--out", help="output directory (default: WORKDIR/eval)")
    _add_checkpoint(p)

    p = sub.add_parser("predict", help="class and probabilities for image files")
    p.add_argument("--workdir", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    _add_checkpoint(p)

    p = sub.add_parser("explain", help="saliency maps (.npy + PNG overlays) for image files")
    p.add_argument("--workdir", required=True)
    p.add_argument("--method", default="sc", help="a method of lclsc_jax.explain.METHODS, or 'all' for a grid")
    p.add_argument("--stage", default="last", help="feature stage to explain (e.g. stage3, stage4; default: last)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output directory")
    _add_checkpoint(p)

    p = sub.add_parser("cv", help="patient-wise k-fold or leave-one-patient-out cross-validation",
                       description="Train and evaluate one run per fold in WORKDIR/fold_XX; finished folds are "
                                   "skipped and an interrupted fold resumes, so re-running the command continues a CV.")
    p.add_argument("--workdir", required=True, help="CV directory (fold_XX/, cv_summary.json, figures/)")
    p.add_argument("--data", help=DATA_HELP + " (default: the config's data.source)")
    p.add_argument("--config", default="default", help="preset name or JSON file (default: default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--folds", type=int, default=5, help="number of patient-wise folds (default 5)")
    g.add_argument("--lopo", action="store_true", help="leave-one-patient-out instead of k folds")
    p.add_argument("--nested", action="store_true", help="hold out data.val_fraction of each fold's training "
                   "patients to select the best checkpoint (default: the last checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress output")

    p = sub.add_parser("benchmark-cams", help="saliency methods x stages against ground-truth masks (Dice, IoU, ...)")
    p.add_argument("--workdir", required=True, help="a trained run whose data has masks (e.g. synthetic)")
    p.add_argument("--methods", nargs="+", help="methods of lclsc_jax.explain.METHODS (default: the CAM family)")
    p.add_argument("--stages", nargs="+", help="feature stages (default: every stage of the model)")
    p.add_argument("--split", default="test", help="train, val, test (default) or all")
    p.add_argument("--max-images", type=int, default=64, help="images scored (default 64)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5], help="fixed thresholds besides Otsu")
    p.add_argument("--faithfulness", action="store_true", help="also deletion/insertion AUC (slower)")
    p.add_argument("--out", help="output directory (default: WORKDIR/cam_benchmark)")
    _add_checkpoint(p)

    from lclsc_jax.evaluate.ablation import add_ablation_arguments

    p = sub.add_parser("ablate", help="a grid of configs x seeds, patient-wise, resumable; one results table",
                       description="Run an ablation sweep (see docs/protocols.md). Finished runs are skipped, so "
                                   "re-running the same command resumes it; --slurm writes a job array instead.")
    add_ablation_arguments(p)
    p.set_defaults(slurm_command="lclsc ablate")

    p = sub.add_parser("verify", help="parity of PyTorch weights run in PyTorch and in this JAX model")
    p.add_argument("--torch-weights", required=True, metavar="FILE", help=".pt/.pth state_dict or .safetensors")
    p.add_argument("--arch", required=True, help="resnet18, resnet34 or resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")

    p = sub.add_parser("demo", help="train on synthetic pCLE data, evaluate, write saliency figures (CPU minutes)")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override demo config keys")

    p = sub.add_parser("config", help="show a resolved config or list every key")
    p.add_argument("--config", default="default")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--list", action="store_true", help="list every key with its default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lclsc`` command."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lclsc {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop, sharding

    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                          args.local_devices)
    overrides = C.parse_overrides(args.set)
    if args.data:
        overrides["data.source"] = args.data
    cfg = C.load(args.config) if args.config else None
    cfg = loop.resolve_config(args.workdir, cfg, overrides)
    summary = loop.train(cfg, args.workdir, init_from=args.init_from, progress=not args.no_progress)
    loop._log(f"finished at step {summary['step']}; validation: {summary['val']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lclsc_jax.train import inference

    m = inference.evaluate_run(args.workdir, args.data, args.split, args.checkpoint, args.out)
    print(format_metrics(m))
    print(f"written: {os.path.join(args.out or os.path.join(args.workdir, 'eval'), 'metrics.json')}")
    return 0


def format_metrics(m: dict) -> str:
    """A short human-readable summary of ``classification_metrics`` output."""
    keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "auroc", "ece", "patient_accuracy")
    lines = [f"{m.get('split', '')} ({m.get('n', '?')} images, checkpoint step {m.get('checkpoint_step', '?')})"]
    lines += [f"  {k:<18} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float))]
    return "\n".join(lines)


def _predict(args: argparse.Namespace) -> int:
    from lclsc_jax.train import inference

    rows = inference.predict_files(args.workdir, args.images, args.checkpoint)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            probs = " ".join(f"{c}={p:.3f}" for c, p in r["probabilities"].items())
            print(f"{r['path']}\t{r['class']}\t{r['probability']:.3f}\t{probs}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from lclsc_jax import explain
    from lclsc_jax.train import inference

    run = inference.load_run(args.workdir, args.checkpoint)
    images = inference.load_images(run.cfg, args.images)
    written = explain.write_explanations(run.model, run.variables, images, [os.path.basename(p) for p in args.images],
                                         args.out, args.method, args.stage, global_emb=run.global_emb,
                                         class_names=run.class_names, tau=run.cfg.loss.tau)
    for path in written:
        print(path)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from lclsc_jax.evaluate import cross_validation as cv
    from lclsc_jax.train import config as C

    overrides = C.parse_overrides(args.set)
    if args.data:
        overrides["data.source"] = args.data
    cfg = C.load(args.config, overrides)
    summary = cv.cross_validate(cfg, args.workdir, folds=None if args.lopo else args.folds, lopo=args.lopo,
                                       nested=args.nested, seed=args.seed, progress=not args.no_progress,
                                       figures=not args.no_figures)
    print(cv.format_cv_summary(summary))
    print(f"written: {os.path.join(args.workdir, cv.CV_SUMMARY)}")
    return 0


def _benchmark_cams(args: argparse.Namespace) -> int:
    from lclsc_jax.evaluate import cam_benchmark

    out = args.out or os.path.join(args.workdir, "cam_benchmark")
    rows = cam_benchmark.benchmark_cams(args.workdir, args.methods, args.stages, args.split, args.max_images,
                                        args.thresholds, out, which=args.checkpoint, faithfulness=args.faithfulness)
    with open(os.path.join(out, "cam_benchmark.md")) as f:
        print(f.read())
    return 0 if rows and not all(r["error"] for r in rows) else 1


def _ablate(args: argparse.Namespace) -> int:
    from lclsc_jax.evaluate import ablation

    return ablation.ablation_command(args)


def _verify(args: argparse.Namespace) -> int:
    from lclsc_jax import interop

    report = interop.verify(args.torch_weights, args.arch, batch_size=args.batch_size, image_size=args.image_size,
                            in_channels=args.in_channels, tol=args.tol)
    print(report.format())
    return 0 if report.passed else 1


def _config(args: argparse.Namespace) -> int:
    from lclsc_jax.train import config as C

    cfg = C.load(args.config, args.set)
    if args.list:
        for k, v in C.flatten(cfg).items():
            print(f"{k} = {v!r}")
    else:
        print(json.dumps(C.to_dict(cfg), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Train the demo preset, evaluate on held-out patients, write saliency figures."""
    from lclsc_jax import data
    from lclsc_jax.train import config as C
    from lclsc_jax.train import inference, loop

    t0 = time.time()
    cfg = loop.resolve_config(args.workdir, C.load("demo"), C.parse_overrides(args.set))
    print(f"[demo] training {cfg.model.arch} with loss {cfg.loss.name} on synthetic pCLE data "
          f"({cfg.data.image_size}x{cfg.data.image_size}) in {args.workdir}", flush=True)
    loop.train(cfg, args.workdir)
    t_train = time.time() - t0
    metrics = inference.evaluate_run(args.workdir, split="test")
    print(format_metrics(metrics))
    fig_dir = os.path.join(args.workdir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    run = inference.load_run(args.workdir)
    ds = loop.load_dataset(run.cfg)
    test_idx = inference.run_splits(args.workdir, run.cfg, ds)["test"]
    data.render_examples(ds, 12, os.path.join(fig_dir, "synthetic_examples.png"))
    written = _demo_saliency(run, ds, test_idx, fig_dir)
    summary = {"accuracy": metrics["accuracy"], "f1": metrics["f1"], "auroc": metrics["auroc"],
               "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
               "figures": written}
    loop.write_json(os.path.join(args.workdir, "demo_summary.json"), summary)
    print(f"[demo] test accuracy {metrics['accuracy']:.3f} on held-out patients; "
          f"{summary['total_seconds']:.0f} s in all; figures in {fig_dir}")
    return 0


def _demo_saliency(run, ds, test_idx, fig_dir: str) -> list[str]:
    """Saliency figures for one test image per class: SC maps, Grad-CAM, and a grid of every method."""
    import numpy as np

    from lclsc_jax import explain

    picks = [int(test_idx[np.flatnonzero(ds.labels[test_idx] == c)[0]])
             for c in range(len(run.class_names)) if np.any(ds.labels[test_idx] == c)]
    images = np.stack([ds.source[i]["image"] for i in picks])
    names = [f"test{i}_{run.class_names[ds.labels[i]]}" for i in picks]
    written = []
    for method in ("sc", "gradcam"):
        written += explain.write_explanations(run.model, run.variables, images, names,
                                              os.path.join(fig_dir, method), method, "last",
                                              global_emb=run.global_emb, class_names=run.class_names,
                                              tau=run.cfg.loss.tau)
    written += explain.write_explanations(run.model, run.variables, images, names,
                                          os.path.join(fig_dir, "all_methods"), "all", "last",
                                          global_emb=run.global_emb, class_names=run.class_names,
                                          tau=run.cfg.loss.tau)
    return written


_COMMANDS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "explain": _explain, "cv": _cv,
             "benchmark-cams": _benchmark_cams, "ablate": _ablate, "verify": _verify, "demo": _demo,
             "config": _config}


if __name__ == "__main__":
    sys.exit(main())
