"""The ``lclsc`` command: train, evaluate, predict (images, videos), explain, sequences, report, protocols, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Any, Sequence

from lclsc_jax.protocols.grids import ABLATION_GRIDS

# Every models.ARCHS name (tests/test_backbone_registry.py checks; importing models here would slow start-up).
ARCH_HELP = ("tiny, resnet18, resnet34, resnet50, or timm/torchvision-layout: tf_efficientnetv2_s, efficientnetv2_s, "
             "inception_v3, inception_v3_aux, vit_small_patch16, vit_small_patch16_gap, vit_base_patch16, "
             "vit_base_patch16_gap, convnext_tiny, densenet121, alexnet, lenet5, and for volumes: tiny3d, or "
             "MONAI-layout: resnet18_3d, resnet34_3d")
DATA_HELP = "synthetic (built-in synthetic pCLE data), a folder ROOT/<class>/<patient>/<frame>.png, or a CSV manifest"


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="coordinator address host:port (or $LCLSC_COORDINATOR); "
                   "LCLSC_DISTRIBUTED=1 uses JAX's cluster auto-detection (SLURM, MPI, TPU)")
    g.add_argument("--num-processes", type=int, help="number of processes (or $LCLSC_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's index (or $LCLSC_PROCESS_ID)")
    g.add_argument("--local-devices", type=int, help="devices this process uses (default: all local ones)")


def _add_set(p: argparse.ArgumentParser, help: str = "override config keys") -> None:
    """``--set KEY=VALUE ...``: repeatable, every occurrence adds to the list (a key given two values is an error)."""
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help=help + "; repeatable (--set a=1 --set b=2 sets both)")


def add_ablation_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of the ablation command (``lclsc ablate``, ``experiments/ablate.py``) to ``p``."""
    p.add_argument("--out", required=True, help="shared output folder (plan.json, runs/<name>/, tables)")
    p.add_argument("--preset", default="quick", choices=sorted(ABLATION_GRIDS), help="which grid (default: quick)")
    p.add_argument("--grid", metavar="JSON", help="a grid JSON file instead of --preset")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the grid's)")
    p.add_argument("--split-seeds", type=int, nargs="+",
                   help="split seeds: a replicate is (split seed, seed); each draws its own folds or fixed split "
                        "(default: the grid's, else the config's data.split_seed)")
    p.add_argument("--config", help="base preset or JSON config (default: the grid's, e.g. demo)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides applied to every run; repeatable (--set a=1 --set b=2 sets both)")
    p.add_argument("--folds", type=int,
                   help="K-fold patient-wise CV per run, folds drawn with its split seed (default: the grid's; "
                        "0 = the fixed split)")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel child processes (default 1; 0 = in this process); >1 limits each to one thread")
    p.add_argument("--saliency-images", type=int,
                   help="test frames scored per run and fold (default: the grid's, else 16; 0 = every test frame)")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the ROAD gap")
    p.add_argument("--reference", default="ce", help="group the others are paired with (default: ce)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the tables (default 2000)")
    g = p.add_argument_group("cluster")
    g.add_argument("--slurm", action="store_true", help="write OUT/plan.json and OUT/ablation.slurm, do not run")
    g.add_argument("--run-index", type=int, help="run one entry of OUT/plan.json (a SLURM array task)")
    g.add_argument("--collect", action="store_true", help="gather finished runs into the tables")
    g.add_argument("--nodes", type=int, default=1, help="nodes per run (multi-host through jax.distributed)")
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--time", default="04:00:00", help="SLURM time limit per run")
    g.add_argument("--partition")
    g.add_argument("--max-parallel", type=int, help="at most this many array tasks at once")
    g.add_argument("--slurm-command", default="python experiments/ablate.py",
                   help="what each array task runs (default: python experiments/ablate.py)")
    return p


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
    _add_set(p, "override config keys, e.g. train.lr=3e-4")
    p.add_argument("--init-from", metavar="FILE_OR_RUN", help="start the backbone from PyTorch weights "
                   "(.pt/.pth/.safetensors, torchvision/timm naming) or a `lclsc pretrain` workdir; the heads are "
                   "re-initialised; see train.freeze_backbone_steps and train.backbone_lr_scale for fine-tuning")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_distributed(p)

    p = sub.add_parser("pretrain", help="self-supervised (SimCLR, DINO) or SupCon pretraining of an encoder",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Pretrain an encoder in WORKDIR on frames without labels (pretrain.objective: "
                                   "simclr, dino; supcon uses labels). Views are drawn on the device (views.*). "
                                   "An existing WORKDIR resumes; SIGTERM saves a checkpoint and exits 143. "
                                   "`lclsc train --init-from WORKDIR` fine-tunes the encoder (docs/pretrain.md).",
                       epilog="examples:\n  lclsc pretrain --workdir runs/pre --config pretrain\n"
                              "  lclsc pretrain --workdir runs/dino --config pretrain --set pretrain.objective=dino "
                              "views.n_local=4\n  lclsc train --workdir runs/ft --config demo --init-from runs/pre")
    p.add_argument("--workdir", required=True, help="run directory (a local path, gs:// or s3:// URL)")
    p.add_argument("--data", help=DATA_HELP + "; labels optional (a CSV without a label column, a folder "
                   "ROOT/<patient>/<frame> with --unlabelled) (default: the config's data.source)")
    p.add_argument("--unlabelled", action="store_true", help="--data is a folder ROOT/<patient>/<frame> or a CSV "
                   "without labels")
    p.add_argument("--config", help="preset name or JSON file (default: 'pretrain', or the workdir's saved config)")
    _add_set(p, "override config keys, e.g. pretrain.objective=dino train.fsdp=4")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_distributed(p)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a patient-wise split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", help=DATA_HELP + " (default: the run's data)")
    p.add_argument("--split", help="train, val, test or all (default: test of the run's own data; all of other "
                   "--data, whose classes must be among the run's)")
    p.add_argument("--out", help="output directory (default: WORKDIR/eval)")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="patient-bootstrap resamples of the 95%% intervals (default 1000; 0: no intervals)")
    _add_checkpoint(p)

    p = sub.add_parser("predict", help="class and probabilities for image files, a video or a folder of frames",
                       description="Predict image files; or, for ONE video file (MP4/AVI/MKV/MOV) or folder of "
                                   "numbered frames, predict frame by frame with an optional non-diagnostic frame "
                                   "filter and a causal window (docs/video.md).")
    p.add_argument("--workdir", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or one video file / frame folder")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    _add_checkpoint(p)
    v = p.add_argument_group("video or frame folder")
    v.add_argument("--filter", metavar="FILTER_RUN",
                   help="workdir of a frame filter run (trained with --set data.target=diagnostic loss.name=ce)")
    v.add_argument("--window", type=float, default=1.0, metavar="SECONDS",
                   help="causal window of the windowed decision, in seconds of video (default 1.0)")
    v.add_argument("--fps", type=float, help="frame rate of a frame folder (default 12); overrides a video's own")
    v.add_argument("--aggregate", choices=("mean_score", "vote"), default="mean_score",
                   help="window aggregator: mean of frame scores or confidence-weighted vote (default mean_score)")
    v.add_argument("--threshold", type=float, default=0.5,
                   help="a frame is kept when the filter's P(diagnostic) >= THRESHOLD (default 0.5)")
    v.add_argument("--saliency", choices=("gradcam", "sc", "none"), default="gradcam",
                   help="saliency map per frame for the overlay (default gradcam; sc = the run's SC maps)")
    v.add_argument("--csv", metavar="FILE", help="write per-frame and windowed predictions as CSV")
    v.add_argument("--json-out", metavar="FILE", help="write predictions and a summary as JSON")
    v.add_argument("--overlay", metavar="FILE.mp4",
                   help="write an overlay video (saliency in the field of view, class, confidence, filter flag)")

    from lclsc_jax.explain.registry import methods_help  # no JAX: the method list only

    p = sub.add_parser("explain", help="saliency maps (.npy + PNG overlays) for image files; NIfTI for volumes",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Explain the predictions of a trained run (--workdir) or of an imported "
                                   "torchvision/timm-named classifier (--torch-weights FILE --arch ARCH).\n\n"
                                   "methods (--method; docs/explain.md has formulas, costs and options):\n"
                                   + methods_help(),
                       epilog="examples:\n  lclsc explain --workdir runs/r18 --method sc frame1.png --out maps/\n"
                              "  lclsc explain --torch-weights cle_resnet18.pth --arch resnet18 --classes a,b,c "
                              "--method gradcam img.png --out maps/   (fc with 3 outputs)\n\n"
                              "--normalize: imagenet = (pixels/255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225) "
                              "(torchvision/timm ImageNet weights; RGB only), lclsc = (pixels/255 - 0.5) / 0.25 "
                              "(this project's runs), unit = pixels/255.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a trained run")
    src.add_argument("--torch-weights", metavar="FILE",
                     help="a classifier's state_dict (.pt/.pth/.safetensors, torchvision/timm ResNet naming, "
                          "with fc.*) instead of a run; needs --arch")
    p.add_argument("--arch", help="with --torch-weights: " + ARCH_HELP)
    p.add_argument("--classes", help="with --torch-weights: comma-separated class names, one per output of fc "
                   "(default: 0, 1, ...)")
    p.add_argument("--normalize", choices=EXPLAIN_NORMALIZE,
                   help="input normalisation (default: imagenet with --torch-weights; a run always uses lclsc)")
    p.add_argument("--image-size", type=int, help="with --torch-weights: images are resized to this square size "
                   "(default 224); a run uses its own")
    p.add_argument("--method", default=None, help="a method of lclsc_jax.explain.METHODS, or 'all' for a grid "
                   "(default: sc for a run, gradcam with --torch-weights)")
    p.add_argument("--stage", default="last", help="feature stage to explain (e.g. stage3, stage4; default: last)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist in --out")
    p.add_argument("--no-fov", action="store_true",
                   help="keep maps outside a circular field of view (default: frames with dark corners get maps "
                        "restricted to the field of view, where the tissue is)")
    _add_checkpoint(p)

    p = sub.add_parser("cv", help="patient-wise k-fold or leave-one-patient-out cross-validation",
                       description="Train and evaluate one run per fold in WORKDIR/fold_XX; finished folds are "
                                   "skipped and an interrupted fold resumes, so re-running the command continues a CV.")
    p.add_argument("--workdir", required=True, help="CV directory (fold_XX/, cv_summary.json, figures/)")
    p.add_argument("--data", help=DATA_HELP + " (default: the config's data.source)")
    p.add_argument("--config", default="default", help="preset name or JSON file (default: default)")
    _add_set(p)
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
    p.add_argument("--max-images", type=int, default=64, help="images scored (default 64; 0: every frame of the split)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5], help="fixed thresholds besides Otsu")
    p.add_argument("--faithfulness", action="store_true",
                   help="also faithfulness (slower): the ROAD gap LeRF - MoRF (noisy linear imputation) by default")
    p.add_argument("--faithfulness-metrics", nargs="+", default=["road"], choices=["road", "deletion", "insertion"],
                   help="perturbation measures with --faithfulness (default road; deletion/insertion: black fill "
                        "and blur)")
    p.add_argument("--faithfulness-score", default="rank", choices=["rank", "margin", "prob"],
                   help="what the curves follow: the target class's rank (default; comparable across a GEI and a "
                        "linear head), its logit margin, or its probability")
    p.add_argument("--no-specificity", action="store_true",
                   help="skip class specificity (true- vs wrong-class maps; halves the cost of expensive methods)")
    p.add_argument("--no-fov", action="store_true",
                   help="score maps over the whole frame, not only inside pCLE's circular field of view")
    p.add_argument("--pointing-ties", default="first", choices=["first", "any"],
                   help="pointing game with tied maxima: the first in raster order (default; a flat map misses) or "
                        "any maximum (Quantus; a flat map hits)")
    p.add_argument("--out", help="output directory (default: WORKDIR/cam_benchmark)")
    _add_checkpoint(p)

    p = sub.add_parser("sanity", help="saliency sanity checks: model and label randomisation (Adebayo et al. 2018)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Re-initialise the run's parameters block by block, from the heads (and the GEI "
                                   "class embeddings) down through the stages (cascading), and one block at a time "
                                   "(independent), and compare each method's maps with the original ones: Spearman "
                                   "rank correlation (abs and signed), SSIM, HOG similarity. A method passes when "
                                   "its maps are no longer similar once the network is random (mean Spearman(abs) "
                                   "< 0.5 after the full cascade). Writes sanity.json, sanity.csv, sanity.md, "
                                   "cascade_<method>.png and similarity.png; prints sanity.md. See docs/sanity.md.",
                       epilog="examples:\n  lclsc sanity --workdir runs/demo --methods sc gradcam layercam\n"
                              "  lclsc sanity --workdir runs/demo --label-randomization --max-images 32")
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--methods", nargs="+",
                   help="methods of lclsc_jax.explain.METHODS (default: sc on contrastive runs and every CAM)")
    p.add_argument("--stage", default="last", help="the stage the CAMs explain: a stage name or last (default)")
    p.add_argument("--max-images", type=int, default=16, help="images explained, evenly spaced over the split "
                   "(default 16)")
    p.add_argument("--split", default="test", help="train, val, test (default) or all")
    p.add_argument("--label-randomization", action="store_true",
                   help="also train the run's config on shuffled training labels (OUT/label_randomization) and "
                        "compare its maps with the real model's")
    p.add_argument("--out", help="output directory (default: WORKDIR/sanity)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the re-drawn parameters, class embeddings and label permutation (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_checkpoint(p)

    p = sub.add_parser("robustness", help="accuracy and saliency under graded pCLE corruptions (ImageNet-C style), mCE",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Degrade the run's test frames by each corruption of a pCLE probe (Poisson-Gaussian "
                                   "noise, defocus, motion blur, gamma, contrast, gain, another fibre bundle, dark / "
                                   "saturated / smeared frames) at severities 1-5 and score accuracy, balanced accuracy "
                                   "and saliency localisation (Grad-CAM, SC: Dice at the mask's area, PR-AUC) at each. "
                                   "With --reference, the mean corruption error mCE (Hendrycks & Dietterich 2019). "
                                   "Writes robustness.json/.csv/.md, robustness.png and examples.png; prints the tables. "
                                   "See docs/robustness.md.",
                       epilog="examples:\n  lclsc robustness --workdir runs/demo\n"
                              "  lclsc robustness --workdir runs/lcl_sc --reference runs/ce --corruptions noise defocus "
                              "--severities 1 3 5")
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--reference", metavar="RUN", help="a second run (e.g. a ce run with the same split) scored on the "
                   "same corrupted frames: the denominator of the corruption error CE and mCE")
    p.add_argument("--corruptions", nargs="+", metavar="NAME",
                   help="corruptions (default all): noise defocus motion_blur gamma contrast gain fibre_pattern dark "
                        "saturated smeared")
    p.add_argument("--severities", type=int, nargs="+", metavar="S",
                   help="severities in 1..5 (default all); severity 0, the clean frames, is always scored")
    p.add_argument("--max-images", type=int, default=32,
                   help="frames with a mask whose saliency maps are scored (default 32; 0 = none); every frame of the "
                        "split is classified")
    p.add_argument("--split", default="test", help="train, val, test (default) or all")
    p.add_argument("--out", help="output directory (default: WORKDIR/robustness)")
    _add_checkpoint(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random corruptions (default 0)")

    p = sub.add_parser("audit-data", help="shortcut audit: global image statistics vs class, class-blind maps vs masks",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fit simple classifiers (logistic regression, boosted trees, k-NN) on global "
                                   "statistics of each frame (histogram, power spectrum, gradients), patient-wise, "
                                   "and score class-blind saliency maps against the masks. If global statistics "
                                   "predict the class, a model's accuracy does not show that it learned the "
                                   "evidence. Writes audit.json, audit.md, audit.png, audit_maps.png; prints audit.md.",
                       epilog="examples:\n  lclsc audit-data --data synthetic --config demo\n"
                              "  lclsc audit-data --data frames.csv --set data.image_size=128 --out audit_mine")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--config", default="default",
                   help="preset or JSON file for the data settings (image size, channels, synthetic data, split; "
                        "default: default)")
    _add_set(p, "override config keys, e.g. data.image_size=64")
    p.add_argument("--folds", type=int, default=8,
                   help="patient-wise CV folds (default 8; reduced when there are fewer patients)")
    p.add_argument("--split", default="test", help="frames whose class-blind maps are scored: test (default), "
                   "train, val or all")
    p.add_argument("--max-map-images", type=int, default=64, help="frames scored for the blind maps (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, classifiers and bootstrap (default 0)")
    p.add_argument("--out", default="audit", help="output directory (default: ./audit)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")

    p = sub.add_parser("synth", help="export the simulated pCLE benchmark as PNG frames, masks and a manifest CSV",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write OUT/images/<patient>/s<seq>_f<frame>.png, OUT/masks/..., and "
                                   "OUT/manifest.csv (path,label,patient,mask,sequence,frame,diagnostic,kind), readable "
                                   "back with --data OUT/manifest.csv and by any other framework. Defaults: the default "
                                   "benchmark (24 patients x 40 frames, 128 px, seed 0).",
                       epilog="examples:\n  lclsc synth --out pcle64 --size 64\n"
                              "  lclsc synth --volumes --out brain48 --size 48 --patients 40\n"
                              "  lclsc synth --out pcle_noisy --option photons=5,20 nondiagnostic_fraction=0.3\n"
                              "  lclsc train --workdir runs/from_png --data pcle64/manifest.csv --config demo")
    p.add_argument("--out", required=True, help="output folder (must not hold a manifest yet)")
    p.add_argument("--volumes", action="store_true",
                   help="the 3D brain tumour benchmark instead: OUT/images/<subject>/v<k>.nii.gz, OUT/masks/..., "
                        "OUT/manifest.csv (path,label,patient,mask); see docs/volumes.md")
    p.add_argument("--patients", type=int, default=None, help="number of patients/subjects (default 24; 60 volumes)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per patient (default 40); with --volumes, volumes per subject (default 1)")
    p.add_argument("--size", type=int, default=None,
                   help="image size in pixels (default 128); with --volumes, voxels per side (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--option", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="any other simulator parameter (lclsc_jax.data.SyntheticConfig), e.g. noise=false, "
                        "fibre_cores=5000,10000, nondiagnostic_fraction=0.2; with --volumes one of "
                        "lclsc_jax.data.BrainConfig, e.g. classes=ring,diffuse channels=2 noise=0.05")

    p = sub.add_parser("ablate", help="a grid of configs x seeds, patient-wise, resumable; one results table",
                       description="Run an ablation sweep (see docs/protocols.md). Finished runs are skipped, so "
                                   "re-running the same command resumes it; --slurm writes a job array instead.")
    add_ablation_arguments(p)
    p.set_defaults(slurm_command="lclsc ablate")

    p = sub.add_parser("relevance", help="relevance maps of a 3D run: train its optimal perturbation generator",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="`lclsc relevance train --workdir RUN` trains a 3D U-Net against the run's frozen "
                                   "classifier so that perturbing the voxels it marks lowers the explained class's "
                                   "probability the most for the smallest marked volume (Rajapaksa & Khalvati 2022; "
                                   "docs/volumes.md). The generator lands in RUN/relevance/; then `lclsc explain "
                                   "--workdir RUN --method perturbation_generator VOLUME` maps a volume in one "
                                   "forward pass. Rerunning with more --steps resumes.",
                       epilog="example:\n  lclsc relevance train --workdir runs/brain3d --steps 400 --supervoxels 200")
    rsub = p.add_subparsers(dest="relevance_command", required=True)
    r = rsub.add_parser("train", help="train (or resume) the run's perturbation generator")
    r.add_argument("--workdir", required=True, help="a trained 3D run")
    r.add_argument("--steps", type=int, default=500, help="generator steps (default 500)")
    r.add_argument("--batch-size", type=int, default=4, help="volumes per step (default 4)")
    r.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    r.add_argument("--area-weight", type=float, default=0.1,
                   help="weight of the mean mask (the sparsity term that keeps the perturbation small; default 0.1)")
    r.add_argument("--tv-weight", type=float, default=0.0, help="weight of the mask's total variation (default 0)")
    r.add_argument("--supervoxels", type=int, default=0,
                   help="pool the mask over about this many SLIC supervoxels per volume (default 0: voxel-wise)")
    r.add_argument("--baseline", default="0",
                   help="what perturbed voxels become: a number (in model-input units), mean or blur (default 0)")
    r.add_argument("--target", choices=("predicted", "label"), default="predicted",
                   help="the class explained during training (default: the classifier's prediction)")
    r.add_argument("--width", type=int, default=8, help="U-Net channels at the first level (default 8)")
    r.add_argument("--depth", type=int, default=3, help="U-Net levels (default 3)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--log-every", type=int, default=50)
    _add_checkpoint(r)

    p = sub.add_parser("sequences", help="frame vs window vs sequence accuracy, optionally behind a frame filter",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Group the split's frames into sequences (patient, probe pass, frame index) and "
                                   "report frame, sliding-window and whole-sequence accuracy of the classifier run "
                                   "with patient-bootstrap 95%% intervals: mean of GEI scores, confidence-weighted "
                                   "vote and a small temporal model on frozen embeddings, with and without a "
                                   "non-diagnostic frame filter (a run trained with --set data.target=diagnostic "
                                   "loss.name=ce), plus the filter's sensitivity/specificity and the seconds a "
                                   "stable online decision needs. See docs/sequences.md.",
                       epilog="example:\n  lclsc sequences --workdir runs/cls --filter runs/filter --window 1.0")
    p.add_argument("--workdir", required=True, help="a trained tissue classifier run")
    p.add_argument("--filter", metavar="FILTER_RUN",
                   help="a frame filter run (data.target=diagnostic) trained on the same data")
    p.add_argument("--split", default="test", help="which split's sequences (default test)")
    p.add_argument("--fps", type=float, default=12.0, help="frames per second of the video (default 12)")
    p.add_argument("--window", type=float, default=1.0, help="sliding window length in seconds (default 1.0)")
    p.add_argument("--centred", action="store_true",
                   help="centred windows (past and future frames) instead of causal (online, past frames only)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="keep a frame when the filter's P(diagnostic) >= this (default 0.5)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval (default 1000)")
    p.add_argument("--temporal-steps", type=int, default=300,
                   help="Adam steps of the learned temporal model (default 300; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default WORKDIR/sequences)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    _add_checkpoint(p)

    p = sub.add_parser("verify", help="parity of PyTorch weights run in PyTorch and in this JAX model")
    p.add_argument("--torch-weights", required=True, metavar="FILE", help=".pt/.pth state_dict or .safetensors")
    p.add_argument("--arch", required=True, help=ARCH_HELP + " (MONAI 3D ResNets built with conv1_t_stride=2)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default 224; 32 for 3D archs: a "
                   "32^3 volume)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--in-channels", type=int, default=None, help="default: the weights' first layer's")
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")

    p = sub.add_parser("export", help="a trained run as ONNX (whole classifier) or PyTorch-named safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write the run's classifier for systems without JAX. onnx: one graph, uint8 frames "
                                   "(B, H, W, C) in, probs and embedding out, normalisation inside (ONNX Runtime "
                                   "runs it); safetensors: torchvision-named weights and OUT.json with the classes, "
                                   "head, GEI class embeddings and tau. See docs/interop.md.",
                       epilog="examples:\n  lclsc export --workdir runs/demo --out runs/demo/model.onnx --check\n"
                              "  lclsc export --workdir runs/demo --format safetensors --out runs/demo/model.safetensors")
    p.add_argument("--workdir", required=True, help="a trained run")
    p.add_argument("--out", required=True, help="the file to write (.onnx, or .safetensors)")
    p.add_argument("--format", default="onnx", choices=["onnx", "safetensors"], help="default onnx")
    p.add_argument("--batch-size", type=int, default=1,
                   help="the ONNX graph's batch size (shapes are static; default 1, a stream of frames)")
    p.add_argument("--check", action="store_true",
                   help="run the ONNX model in ONNX Runtime on the run's test frames and compare with JAX")
    _add_checkpoint(p)

    p = sub.add_parser("report", help="one self-contained HTML report of a run or a CV study (opens offline)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write WORKDIR/report.html for a training run (its held-out test patients) or a "
                                   "`lclsc cv` study (every fold's held-out patients): metrics with 95%% "
                                   "patient-bootstrap intervals, ROC, confusion matrices, calibration with per-bin "
                                   "counts, per-patient accuracy, the confidence analysis, a saliency gallery "
                                   "(correct and wrong cases per class, every method side by side) and the "
                                   "sanity/robustness/sequences results where they exist. Images are embedded; no "
                                   "server, no network. See docs/report.md.",
                       epilog="examples:\n  lclsc report runs/demo\n"
                              "  lclsc report runs/cv5 --out cv5.html --methods gradcam sc --gallery 3")
    p.add_argument("workdir", metavar="WORKDIR", help="a training workdir (lclsc train) or a CV study (lclsc cv)")
    p.add_argument("--out", help="the HTML file (default: WORKDIR/report.html)")
    p.add_argument("--methods", nargs="+", help="saliency methods of the gallery (default: sc on contrastive runs, "
                   "gradcam, gradcam++, layercam, eigencam, crm)")
    p.add_argument("--gallery", type=int, default=2,
                   help="correct and wrong cases per class in the saliency gallery (default 2; 0: no gallery)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the intervals (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    _add_checkpoint(p)

    p = sub.add_parser("demo", help="train on synthetic pCLE data, evaluate, write saliency figures and an HTML report (CPU minutes)")
    p.add_argument("--workdir", default="runs/demo")
    _add_set(p, "override demo config keys")

    p = sub.add_parser("config", help="show a resolved config or list every key")
    p.add_argument("--config", default="default")
    _add_set(p)
    p.add_argument("--list", action="store_true", help="list every key with its default")
    return parser


_PYTHON_FORMATWARNING = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' signature
    """The project's own warnings (data, splits) as one ``warning: ...`` line, without file and line number."""
    if category.__module__.startswith("lclsc_jax"):
        return f"warning: {message}\n"
    return _PYTHON_FORMATWARNING(message, category, filename, lineno, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lclsc`` command; what a user can fix is one line on stderr, not a traceback.

    Exit codes: 2 refused (bad input, config or a workdir in use), 1 stopped (diverged, a disk
    full or read-only), 130 Ctrl-C, 143 SIGTERM during training.
    """
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _format_warning
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        print(f"lclsc {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except (ValueError, FileNotFoundError) as e:  # a KeyError is a bug: it keeps its traceback
        print(f"lclsc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder
        print(f"lclsc {args.command}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - only errors that carry an exit code (loop.TrainingStopped)
        if not isinstance(getattr(e, "exit_code", None), int):
            raise
        print(f"lclsc {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


def _train(args: argparse.Namespace) -> int:
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop, sharding
    from lclsc_jax.train.reporting import log

    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                          args.local_devices)
    overrides = C.parse_overrides(args.set)
    if args.data:
        overrides["data.source"] = args.data
    if "data.source" in overrides:
        overrides["data.source"] = _source(str(overrides["data.source"]))
    cfg = C.load(args.config) if args.config else None
    cfg = loop.resolve_config(args.workdir, cfg, overrides)
    summary = loop.train(cfg, args.workdir, init_from=args.init_from, progress=not args.no_progress)
    log(f"finished at step {summary['step']}; validation: {summary['val']}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop, pretrain, sharding
    from lclsc_jax.train.reporting import log

    sharding.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                          args.local_devices)
    overrides = C.parse_overrides(args.set)
    if args.data:
        overrides["data.source"] = _source(args.data)
    if args.unlabelled:
        overrides["data.labelled"] = False
    cfg = C.load(args.config) if args.config else (None if _has_config(args.workdir) else C.load("pretrain"))
    cfg = loop.resolve_config(args.workdir, cfg, overrides)
    summary = pretrain.pretrain(cfg, args.workdir, progress=not args.no_progress)
    log(f"finished at step {summary['step']}; probe: {summary['probe']}")
    return 0


def _has_config(workdir: str) -> bool:
    """Whether ``workdir`` already holds a run's ``config.json`` (a resume)."""
    from lclsc_jax.data import storage

    return storage.exists(storage.join(workdir, "config.json"))


def _source(value: str) -> str:
    """``--data`` as saved in a run's config (``data.source_path``; imports no JAX)."""
    from lclsc_jax.data.io import source_path

    return source_path(value)


def _output_names(paths: Sequence[str]) -> list[str]:
    """Names for the output files of image ``paths``: the file names or, when two would give the same
    output stem (``a/0001.png``, ``b/0001.png``: frames of different patients), the path below the
    common folder with ``_`` for the separators (``a_0001.png``)."""
    def unique(names: list[str]) -> bool:
        return len({os.path.splitext(n)[0] for n in names}) == len(names)

    names = [os.path.basename(p) for p in paths]
    if unique(names):
        return names
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = [os.path.relpath(p, common).replace(os.sep, "_") for p in absolute]
    if not unique(names):  # the same file twice, or names differing only by their extension
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return names


def _evaluate(args: argparse.Namespace) -> int:
    from lclsc_jax.protocols import runs

    if args.n_boot < 0:
        raise ValueError(f"--n-boot must be >= 0, got {args.n_boot}")
    m = runs.evaluate_run(args.workdir, _source(args.data) if args.data else None, args.split,
                          args.checkpoint, args.out, n_boot=args.n_boot)
    print(format_metrics(m))
    print(f"written: {os.path.join(args.out or os.path.join(args.workdir, 'eval'), 'metrics.json')}")
    return 0


def format_metrics(m: dict) -> str:
    """A short human-readable summary of ``classification_metrics`` output."""
    keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "auroc", "ece", "patient_accuracy")
    lines = [f"{m.get('split', '')} ({m.get('n', '?')} images, checkpoint step {m.get('checkpoint_step', '?')})"]
    ci = m.get("intervals") or {}

    def interval(k: str) -> str:
        c = ci.get(k) or {}
        return f"  [{c['ci_low']:.4f}, {c['ci_high']:.4f}]" if c.get("ci_low") is not None else ""

    lines += [f"  {k:<18} {m[k]:.4f}{interval(k)}" for k in keys if isinstance(m.get(k), (int, float))]
    if ci:
        lines.append("  [95% intervals: patient bootstrap, patients within class then frames]")
    return "\n".join(lines)


def _predict(args: argparse.Namespace) -> int:
    from lclsc_jax.data import video

    if any(video.is_frame_source(p) for p in args.images):
        return _predict_video(args)
    video_only = [f"--{k.replace('_', '-')}" for k in ("filter", "csv", "json_out", "overlay", "fps")
                  if getattr(args, k) is not None]
    if video_only:
        print(f"lclsc predict: error: {', '.join(video_only)} apply to a video or a frame folder, not to image files",
              file=sys.stderr)
        return 2
    from lclsc_jax.protocols import runs

    rows = runs.predict_files(args.workdir, args.images, args.checkpoint)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            probs = " ".join(f"{c}={p:.3f}" for c, p in r["probabilities"].items())
            print(f"{r['path']}\t{r['class']}\t{r['probability']:.3f}\t{probs}")
    return 0


def _predict_video(args: argparse.Namespace) -> int:
    """``lclsc predict`` on one video file or frame folder: per-frame + windowed predictions, files, a summary."""
    if len(args.images) != 1:
        print("lclsc predict: error: a video file or frame folder must be the only input "
              f"(got {len(args.images)} inputs)", file=sys.stderr)
        return 2
    from lclsc_jax.data import video

    try:
        video.check_source(args.images[0])  # a bad input fails fast, before JAX and the run load
        from lclsc_jax.protocols import stream

        res = stream.predict_stream(args.workdir, args.images[0], filter_workdir=args.filter, window_s=args.window,
                                    fps=args.fps, aggregate=args.aggregate, threshold=args.threshold,
                                    saliency=args.saliency, out_csv=args.csv, out_json=args.json_out,
                                    overlay=args.overlay, which=args.checkpoint)
    except ImportError as e:
        if "lclsc-jax[video]" not in str(e):  # PyAV missing: say what to install; anything else is a bug
            raise
        print(f"lclsc predict: error: {e}", file=sys.stderr)
        return 2
    s = res["summary"]
    if args.json:
        for row in res["frames"]:
            print(json.dumps(row))
    decision = f"{s['decision']} ({s['confidence']:.3f})" if s["decision"] else "undecided (no kept frame)"
    print(f"{s['frames']} frames at {res['fps']:.3g} fps, {s['kept']} kept ({100 * s['kept_fraction']:.0f}%), "
          f"window {res['window']['frames']} frames ({res['window']['aggregate']})")
    print(f"sequence decision: {decision}")
    print(f"latency per frame: p50 {s['latency_ms_p50']:.1f} ms, p99 {s['latency_ms_p99']:.1f} ms "
          f"({1e3 / max(s['latency_ms_p50'], 1e-9):.0f} frames/s at p50)")
    for path in res["files"]:
        print(f"wrote {path}")
    return 0


EXPLAIN_NORMALIZE = ("imagenet", "lclsc", "unit")


def _explain_outputs(args: argparse.Namespace) -> list[str]:
    """Every file ``lclsc explain`` may write for ``args``: per image and method a map ``.npy``, and an overlay ``.png``."""
    from lclsc_jax.explain import METHODS

    method = args.method or ("gradcam" if args.torch_weights else "sc")
    methods = list(METHODS) if method == "all" else [method]
    stems = [os.path.splitext(n)[0] for n in _output_names(args.images)]
    return [os.path.join(args.out, f"{s}_{name}") for s in stems
            for name in [f"{m}.npy" for m in methods] + [f"{method}.png"]]


def _refuse_overwrite(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming an output of ``lclsc explain`` that exists, unless ``--overwrite``."""
    existing = [] if args.overwrite else [p for p in _explain_outputs(args) if os.path.exists(p)]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]} exists{more}: pass --overwrite to replace, or another --out")


def _explain(args: argparse.Namespace) -> int:
    from lclsc_jax import explain

    _refuse_overwrite(args)
    if args.torch_weights:
        return _explain_torch_weights(args)
    for flag, value in (("--arch", args.arch), ("--classes", args.classes), ("--image-size", args.image_size)):
        if value is not None:
            raise ValueError(f"{flag} goes with --torch-weights; a run (--workdir) has its own")
    if args.normalize not in (None, "lclsc"):
        raise ValueError(f"--normalize {args.normalize}: a run's images are normalised as in training (lclsc)")
    from lclsc_jax.protocols import runs

    run = runs.load_run(args.workdir, args.checkpoint)
    if run.model.spatial_ndim == 3:
        return _explain_volumes(args, run)
    if args.method == "perturbation_generator":
        raise ValueError("perturbation_generator explains 3D runs (lclsc relevance train); this run takes frames")
    images = runs.load_images(run.cfg, args.images)
    written = explain.write_explanations(run.model, run.variables, images, _output_names(args.images),
                                         args.out, args.method or "sc", args.stage, global_emb=run.global_emb,
                                         fov=not args.no_fov, class_names=run.class_names, tau=run.cfg.loss.tau,
                                         method_options={"sc": run.saliency_options("sc")})
    for path in written:
        print(path)
    return 0


def _explain_volumes(args: argparse.Namespace, run: Any) -> int:
    """``lclsc explain`` on volume files of a 3D run: NIfTI maps aligned with the inputs, and PNG figures."""
    from lclsc_jax.protocols import volume_explain

    method = args.method or "gradcam"
    methods = list(volume_explain.ALL_VOLUME_METHODS) if method == "all" else [method]
    existing = [] if args.overwrite else [p for p in volume_explain.output_paths(args.images, args.out, methods)
                                          if os.path.exists(p)]
    if existing:
        raise ValueError(f"{existing[0]} exists: pass --overwrite to replace, or another --out")
    options = {m: run.saliency_options(m) for m in methods}
    written = volume_explain.explain_volumes(run, args.images, args.out, methods, args.stage, options,
                                             log=lambda m: print(m, file=sys.stderr, flush=True))
    for path in written:
        print(path)
    return 0


def _explain_torch_weights(args: argparse.Namespace) -> int:
    """``lclsc explain --torch-weights FILE --arch ARCH``: explain an imported classifier's predictions."""
    import numpy as np

    from lclsc_jax import data, explain, interop

    if args.checkpoint != "best":
        raise ValueError("--checkpoint selects a run's checkpoint (--workdir); --torch-weights FILE is the weights")
    if not args.arch:
        raise ValueError("--torch-weights needs --arch (" + ARCH_HELP + ")")
    model, variables = interop.load_torch_model(args.torch_weights, args.arch)
    if model.head_type != "linear":
        raise ValueError(f"{args.torch_weights} has no fc.* classifier (a bare backbone or an LCL-SC embedding "
                         "model): --torch-weights explains a classifier's logits; explain an LCL-SC run with "
                         "--workdir")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else [str(k) for k in range(model.num_classes)]
    if len(classes) != model.num_classes or not all(classes):
        raise ValueError(f"--classes names {len(classes)} classes but {args.torch_weights}'s fc has "
                         f"{model.num_classes} outputs (give one non-empty name per output)")
    size = 224 if args.image_size is None else args.image_size
    if size < 1:
        raise ValueError(f"--image-size must be >= 1, got {size}")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    u8 = np.stack([data.load_image_file(p, size, model.in_channels) for p in args.images])  # (N, S, S, C)
    mode = args.normalize or "imagenet"
    if mode == "imagenet":
        if model.in_channels != 3:
            raise ValueError(f"--normalize imagenet needs an RGB model; {args.torch_weights} takes "
                             f"{model.in_channels} channel(s): pass --normalize lclsc or unit")
        x = interop.imagenet_normalize(u8)
    elif mode == "lclsc":
        x = data.normalize_images(u8)
    else:
        x = u8.astype(np.float32) / np.float32(255.0)
    written = explain.write_explanations(model, variables, x, _output_names(args.images), args.out,
                                         args.method or "gradcam", args.stage, class_names=classes, fov=not args.no_fov,
                                         display=u8.astype(np.float32) / np.float32(255.0))
    for path in written:
        print(path)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from lclsc_jax.protocols import cross_validation as cv
    from lclsc_jax.train import config as C

    overrides = C.parse_overrides(args.set)
    if args.data:
        overrides["data.source"] = args.data
    if "data.source" in overrides:
        overrides["data.source"] = _source(str(overrides["data.source"]))
    cfg = C.load(args.config, overrides)
    summary = cv.cross_validate(cfg, args.workdir, folds=None if args.lopo else args.folds, lopo=args.lopo,
                                       nested=args.nested, seed=args.seed, progress=not args.no_progress,
                                       figures=not args.no_figures)
    print(cv.format_cv_summary(summary))
    print(f"written: {os.path.join(args.workdir, cv.CV_SUMMARY)}")
    return 0


def _benchmark_cams(args: argparse.Namespace) -> int:
    from lclsc_jax.protocols import cam_benchmark

    out = args.out or os.path.join(args.workdir, "cam_benchmark")
    rows = cam_benchmark.benchmark_cams(args.workdir, args.methods, args.stages, args.split, args.max_images or None,
                                        args.thresholds, out, which=args.checkpoint, faithfulness=args.faithfulness,
                                        faithfulness_metrics=args.faithfulness_metrics,
                                        faithfulness_score=args.faithfulness_score,
                                        specificity=not args.no_specificity,
                                        fov=not args.no_fov, pointing_ties=args.pointing_ties)
    with open(os.path.join(out, "cam_benchmark.md")) as f:
        print(f.read())
    return 0 if rows and not all(r["error"] for r in rows) else 1


def _sanity(args: argparse.Namespace) -> int:
    """Saliency sanity checks of a run: print sanity.md; exit 1 when every method failed."""
    from lclsc_jax.protocols import sanity

    out = args.out or os.path.join(args.workdir, "sanity")
    summary = sanity.sanity_checks(args.workdir, args.methods, args.stage, args.split, args.max_images, out,
                                   which=args.checkpoint, seed=args.seed,
                                   label_randomization=args.label_randomization, progress=not args.no_progress)
    with open(os.path.join(out, "sanity.md")) as f:
        print(f.read())
    print(f"written: {os.path.join(out, 'sanity.json')}")
    return 0 if summary["methods"] else 1


def _robustness(args: argparse.Namespace) -> int:
    """Corruption robustness of a run: print robustness.md and where it was written."""
    from lclsc_jax.protocols import robustness

    out = args.out or os.path.join(args.workdir, "robustness")
    robustness.evaluate_robustness(args.workdir, args.reference, args.corruptions, args.severities, args.max_images,
                                   args.split, out, which=args.checkpoint, seed=args.seed)
    with open(os.path.join(out, "robustness.md")) as f:
        print(f.read())
    print(f"written: {os.path.join(out, 'robustness.json')}")
    return 0


def _sequences(args: argparse.Namespace) -> int:
    """Frame / window / sequence accuracy of a run (optionally behind a filter): print a table and the files."""
    from lclsc_jax.protocols import sequences

    summary = sequences.evaluate_sequences(
        args.workdir, args.filter, split=args.split, fps=args.fps, window_s=args.window, causal=not args.centred,
        threshold=args.threshold, n_boot=args.n_boot, temporal_steps=args.temporal_steps, out_dir=args.out,
        seed=args.seed, progress=not args.no_progress, which=args.checkpoint)
    print(sequences.summary_table(summary))
    out = summary["out_dir"]
    print(f"written: {os.path.join(out, 'sequences.json')}, {os.path.join(out, 'sequences.md')}")
    for path in summary.get("figures", []):
        print(f"written: {path}")
    return 0


def _audit_data(args: argparse.Namespace) -> int:
    """Shortcut audit of a dataset: print the Markdown report, exit 0."""
    from lclsc_jax.protocols import audit
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    cfg = C.load(args.config, C.parse_overrides(args.set))
    ds = loop.load_dataset(cfg, args.data)
    d = cfg.data
    audit.audit_dataset(ds, args.out, folds=args.folds, seed=args.seed, split=args.split,
                        max_map_images=args.max_map_images, val_fraction=d.val_fraction,
                        test_fraction=d.test_fraction, split_seed=d.split_seed, progress=not args.no_progress)
    with open(os.path.join(args.out, "audit.md")) as f:
        print(f.read())
    print(f"written: {os.path.join(args.out, 'audit.json')}")
    return 0


def _default(value: int | None, default: int) -> int:
    """``value`` unless the flag was not given."""
    return default if value is None else value


def _synth(args: argparse.Namespace) -> int:
    """Export the simulated benchmark (PNG frames, masks, manifest) with progress lines."""
    from lclsc_jax.data import export, synthetic

    t0 = time.time()
    if args.volumes:
        from lclsc_jax.data.settings import BrainConfig

        cfg = synthetic.config_from_options(args.option, BrainConfig, n_subjects=_default(args.patients, 60),
                                            volumes_per_subject=_default(args.frames, 1),
                                            size=_default(args.size, 64), seed=args.seed)
        manifest = export.export_volumes(
            cfg, args.out, progress=lambda d, n: print(f"[synth] subject {d}/{n} ({time.time() - t0:.0f} s)",
                                                       flush=True) if d % 10 == 0 or d == n else None)
        print(f"written: {manifest} ({cfg.num_volumes} volumes, {cfg.size}^3 voxels, {cfg.channels} channel(s), "
              f"classes {','.join(cfg.classes)}, {time.time() - t0:.0f} s)")
        return 0
    cfg = synthetic.config_from_options(args.option, num_patients=_default(args.patients, 24),
                                        images_per_patient=_default(args.frames, 40),
                                        image_size=_default(args.size, 128), seed=args.seed)

    def progress(done: int, total: int) -> None:
        print(f"[synth] patient {done}/{total} ({time.time() - t0:.0f} s)", flush=True)

    manifest = export.export_synthetic(cfg, args.out, progress=progress)
    print(f"written: {manifest} ({cfg.num_images} frames, {cfg.image_size} px, {time.time() - t0:.0f} s)")
    return 0


def _relevance(args: argparse.Namespace) -> int:
    """``lclsc relevance train``: the run's optimal perturbation generator."""
    from lclsc_jax.protocols import relevance

    try:
        baseline: float | str = float(args.baseline)
    except ValueError:
        baseline = args.baseline
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError("--steps and --batch-size must be >= 1")
    summary = relevance.train_generator(args.workdir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                        area_weight=args.area_weight, base_width=args.width, depth=args.depth,
                                        tv_weight=args.tv_weight, baseline=baseline, target=args.target,
                                        n_segments=args.supervoxels, which=args.checkpoint, seed=args.seed,
                                        log_every=args.log_every)
    extra = ", ".join(f"{k} {summary[k]:.4f}" for k in ("loss", "drop", "area") if k in summary)
    print(f"generator at step {summary['steps']} in {summary['out_dir']}" + (f" ({extra})" if extra else ""))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from lclsc_jax.protocols import ablation

    return ablation.ablation_command(args)


def _verify(args: argparse.Namespace) -> int:
    from lclsc_jax import interop

    size = args.image_size or (32 if args.arch.endswith("3d") else 224)
    report = interop.verify(args.torch_weights, args.arch, batch_size=args.batch_size, image_size=size,
                            in_channels=args.in_channels, tol=args.tol)
    print(report.format())
    return 0 if report.passed else 1


def _export(args: argparse.Namespace) -> int:
    from lclsc_jax.protocols import export

    res = export.export_run(args.workdir, args.out, args.format, which=args.checkpoint, batch_size=args.batch_size,
                            check=args.check)
    print(f"written: {res['path']} ({res['format']}; {res['meta']['arch']}, classes "
          f"{', '.join(res['meta']['class_names'])}, checkpoint step {res['meta']['checkpoint_step']})")
    if "check" in res:
        c = res["check"]
        print(f"ONNX Runtime vs JAX on {c['n_images']} test frames: max |probs difference| {c['max_abs_probs']:.2e}, "
              f"max |embedding difference| {c['max_abs_embedding']:.2e}, same predictions: {c['same_predictions']}")
        return 0 if c["max_abs_probs"] <= 1e-4 and c["same_predictions"] else 1
    return 0


def _config(args: argparse.Namespace) -> int:
    from lclsc_jax.train import config as C

    cfg = C.load(args.config, args.set)
    if args.list:
        for k, v in C.flatten(cfg).items():
            print(f"{k} = {v!r}")
    else:
        print(json.dumps(C.to_dict(cfg), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    """Write the HTML report of a run or a CV study; print its path."""
    from lclsc_jax.protocols import report

    path = report.build_report(args.workdir, args.out, checkpoint=args.checkpoint, gallery_per_class=args.gallery,
                               methods=args.methods, n_boot=args.n_boot, progress=not args.no_progress)
    print(f"written: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Train the demo preset, evaluate on held-out patients, write saliency figures."""
    from lclsc_jax import data
    from lclsc_jax.protocols import runs
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    t0 = time.time()
    cfg = loop.resolve_config(args.workdir, C.load("demo"), C.parse_overrides(args.set))
    print(f"[demo] training {cfg.model.arch} with loss {cfg.loss.name} on synthetic pCLE data "
          f"({cfg.data.image_size}x{cfg.data.image_size}) in {args.workdir}", flush=True)
    loop.train(cfg, args.workdir)
    t_train = time.time() - t0
    metrics = runs.evaluate_run(args.workdir, split="test")
    print(format_metrics(metrics))
    fig_dir = os.path.join(args.workdir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    run = runs.load_run(args.workdir)
    ds = loop.load_dataset(run.cfg)
    test_idx = runs.run_splits(args.workdir, run.cfg, ds)["test"]
    data.render_examples(ds, 12, os.path.join(fig_dir, "synthetic_examples.png"))
    data.render_panel(ds, os.path.join(fig_dir, "pcle_panel.png"))
    written = _demo_saliency(run, ds, test_idx, fig_dir)
    from lclsc_jax.protocols import report

    page = str(report.build_report(args.workdir))
    summary = {"accuracy": metrics["accuracy"], "f1": metrics["f1"], "auroc": metrics["auroc"],
               "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
               "figures": written, "report": page}
    loop.write_json(os.path.join(args.workdir, "demo_summary.json"), summary)
    print(f"[demo] test accuracy {metrics['accuracy']:.3f} on held-out patients; "
          f"{summary['total_seconds']:.0f} s in all; figures in {fig_dir}; report: {page}")
    return 0


def _demo_saliency(run, ds, test_idx, fig_dir: str) -> list[str]:
    """Saliency figures for one test image per class: SC maps, Grad-CAM, and a grid of every method."""
    import numpy as np

    from lclsc_jax import explain

    readable = test_idx if ds.diagnostic is None else test_idx[ds.diagnostic[test_idx]]
    with_mask = np.array([bool(ds.source[int(i)]["mask"].any()) for i in readable]) if ds.has_masks else None
    picks = []
    for c in range(len(run.class_names)):  # a diagnostic frame per class, with its lesion when it has one
        of_c = ds.labels[readable] == c
        best = of_c & with_mask if with_mask is not None and np.any(of_c & with_mask) else of_c
        if best.any():
            picks.append(int(readable[np.flatnonzero(best)[0]]))
    images = np.stack([ds.source[i]["image"] for i in picks])
    masks = np.stack([ds.source[i]["mask"] for i in picks]) if ds.has_masks else None  # outlined in the figures
    names = [f"test{i}_{run.class_names[ds.labels[i]]}" for i in picks]
    written = []
    for method, folder in (("sc", "sc"), ("gradcam", "gradcam"), ("all", "all_methods")):
        written += explain.write_explanations(run.model, run.variables, images, names,
                                              os.path.join(fig_dir, folder), method, "last",
                                              global_emb=run.global_emb, class_names=run.class_names,
                                              tau=run.cfg.loss.tau, masks=masks,
                                              method_options={"sc": run.saliency_options("sc")})
    return written


_COMMANDS = {"train": _train, "pretrain": _pretrain, "evaluate": _evaluate, "predict": _predict, "explain": _explain,
             "cv": _cv, "benchmark-cams": _benchmark_cams, "sanity": _sanity, "synth": _synth,
             "audit-data": _audit_data, "robustness": _robustness, "ablate": _ablate, "verify": _verify,
             "relevance": _relevance, "export": _export, "demo": _demo, "report": _report, "config": _config,
             "sequences": _sequences}


if __name__ == "__main__":
    sys.exit(main())
