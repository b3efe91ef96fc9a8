"""Robustness of a trained run to graded pCLE corruptions, in the manner of ImageNet-C (``lclsc robustness``).

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019. The run's test frames (its own patient-wise split, ``runs.run_splits``)
are degraded by every corruption of ``data.corruptions`` at severities 1..5; for each
corruption x severity (and the clean frames, severity 0) this protocol records

* accuracy and balanced accuracy, from ``runs.predict`` on the corrupted uint8 frames (the one
  prediction path of every protocol);
* saliency localisation on at most ``max_images`` frames with a ground-truth mask: Dice at the
  mask's area (``dice@area``) and ``pr_auc`` of ``evaluate.localisation_metrics`` inside the field
  of view, for Grad-CAM at the last stage and, for contrastive runs, the SC maps, explained for
  the true label: do the maps stay on the lesion when the image degrades?
* the PSNR of the corrupted frames against the clean ones, inside the field of view;
* with a reference run (``reference``, e.g. a ``ce`` run), the reference's errors on the *same*
  corrupted frames and the corruption errors ``CE_c = sum_s E_c,s / sum_s E^ref_c,s``,
  ``mCE = mean_c CE_c`` (and the relative ones; ``data.corruptions.mean_corruption_error``).

Writes ``robustness.json``, ``robustness.csv``, ``robustness.md`` (tables: rows corruption,
columns severity 0..5), ``robustness.png`` (accuracy and dice@area against severity, one line
per corruption) and ``examples.png`` (one frame at every severity of every corruption) into
``WORKDIR/robustness``. See docs/robustness.md.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lclsc_jax import evaluate, explain
from lclsc_jax.data import corruptions as K
from lclsc_jax.data import normalize_images
from lclsc_jax.protocols import runs
from lclsc_jax.protocols.cam_benchmark import select_images
from lclsc_jax.train import loop
from lclsc_jax.train.reporting import log

__all__ = ["DEFAULT_SEVERITIES", "ROBUSTNESS_COLUMNS", "check_severities", "evaluate_robustness", "robustness_table"]

DEFAULT_SEVERITIES: tuple[int, ...] = tuple(range(1, K.MAX_SEVERITY + 1))
#: Saliency maps scored: Grad-CAM for every run, SC for contrastive runs (both at the last stage).
SALIENCY_METHODS: tuple[str, ...] = ("gradcam", "sc")
_SALIENCY_SCORES: tuple[str, ...] = ("dice@area", "pr_auc")
ROBUSTNESS_COLUMNS: tuple[str, ...] = (
    "corruption", "severity", "n_images", "accuracy", "balanced_accuracy", "error", "reference_error", "psnr",
    "n_saliency", *(f"{m}_{s}" for m in SALIENCY_METHODS for s in _SALIENCY_SCORES), "seconds")
#: The tables of robustness.md: (row key, title).
_TABLES: tuple[tuple[str, str], ...] = (
    ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
    ("gradcam_dice@area", "Grad-CAM Dice at the mask's area (last stage)"), ("gradcam_pr_auc", "Grad-CAM PR-AUC"),
    ("sc_dice@area", "SC Dice at the mask's area"), ("sc_pr_auc", "SC PR-AUC"),
    ("psnr", "PSNR of the corrupted frames (dB, inside the field of view)"))


def check_severities(severities: Sequence[int] | None) -> list[int]:
    """Sorted distinct severities in 1..5 (None: all); anything else is a ``ValueError``."""
    if severities is None:
        return list(DEFAULT_SEVERITIES)
    sev = sorted({int(s) for s in severities})
    if not sev or sev[0] < 1 or sev[-1] > K.MAX_SEVERITY:
        raise ValueError(f"severities must be in 1..{K.MAX_SEVERITY} (severity 0, the clean frames, is always "
                         f"scored), got {list(severities)}")
    return sev


def _check_reference(run: runs.TrainedRun, ref: runs.TrainedRun, ds: Any, indices: np.ndarray, split: str) -> list[str]:
    """Refuse a reference that cannot score the run's frames (other classes or image shape) or trained on them.

    The frames are the same records when both runs read the same source (and, for the simulator, the
    same ``synthetic`` settings); then the reference's train and validation records must not meet
    ``indices``. Otherwise the reference is scored on the run's frames with a note (returned).
    """
    if tuple(ref.class_names) != tuple(run.class_names):
        raise ValueError(f"the reference run {ref.workdir} has classes {list(ref.class_names)}, the run "
                         f"{list(run.class_names)}; mCE needs the same classes")
    shape = (run.cfg.data.image_size, run.cfg.data.channels)
    ref_shape = (ref.cfg.data.image_size, ref.cfg.data.channels)
    if shape != ref_shape:
        raise ValueError(f"the reference run {ref.workdir} takes {ref_shape[0]} px x {ref_shape[1]} channel(s), the "
                         f"run {shape[0]} px x {shape[1]}; mCE needs both to read the same frames")
    same = runs.same_source(run.cfg.data.source, ref.cfg.data.source) and (
        run.cfg.data.source != "synthetic" or run.cfg.synthetic == ref.cfg.synthetic)
    if not same:
        return [f"the reference run {ref.workdir} was trained on other data; it is scored on this run's frames "
                "all the same"]
    seen = [np.asarray(v, np.int64) for k, v in runs.run_splits(ref.workdir, ref.cfg, ds).items() if k != "test"]
    leaked = np.intersect1d(np.concatenate(seen) if seen else np.zeros(0, np.int64), indices)
    if len(leaked):
        raise ValueError(f"the reference run {ref.workdir} trained or validated on {len(leaked)} of the {split} "
                         "frames of the run; use a reference with the same patient-wise split")
    return []


def _maps(run: runs.TrainedRun, method: str, x: np.ndarray, targets: np.ndarray, batch_size: int) -> np.ndarray:
    """Saliency maps ``(N, H, W)`` in [0, 1] of normalised ``x (N, H, W, C)`` at the last stage, fixed-size batches."""
    maps = explain.saliency_batched(method, run.model, run.variables, x, targets, batch_size=batch_size,
                                    stage="last", global_emb=run.global_emb, tau=run.cfg.loss.tau,
                                    **run.saliency_options(method))
    return np.clip(maps, 0.0, 1.0)


def _classify(run: runs.TrainedRun, images: np.ndarray, labels: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy and balanced accuracy of ``run`` on uint8 ``images (N, H, W, C)`` with ``labels (N,)``, and
    each frame's correctness ``(N,)``."""
    probs = runs.predict(run, images)["probs"]
    correct = np.argmax(probs, axis=1) == labels
    recalls = [float(np.mean(correct[labels == c])) for c in np.unique(labels)]
    return {"accuracy": float(np.mean(correct)), "balanced_accuracy": float(np.mean(recalls))}, correct


def _write_frames(path: str, correct: dict[tuple[str, int], np.ndarray], ref_correct: dict[tuple[str, int], np.ndarray],
                  names: Sequence[str], sev: Sequence[int], patients: np.ndarray, labels: np.ndarray,
                  indices: np.ndarray) -> None:
    """Each frame's correctness per condition, for intervals over patients (``frames_correct``).

    ``correct (1 + C*S, N)``: row 0 the clean frames, then corruption-major rows in ``names`` x ``sev``
    order (``conditions`` names them ``"clean/0"``, ``"noise/1"``, ...); ``reference_correct`` the
    same for the reference run (absent without one); ``patients``, ``labels`` and the dataset
    ``indices`` of the N frames.
    """
    keys = [("clean", 0)] + [(c, s) for c in names for s in sev]
    arrays = {"correct": np.stack([correct[k] for k in keys]), "conditions": np.array([f"{c}/{s}" for c, s in keys]),
              "patients": np.asarray(patients).astype(str), "labels": labels, "indices": np.asarray(indices)}
    if ref_correct:
        arrays["reference_correct"] = np.stack([ref_correct[k] for k in keys])
    np.savez_compressed(path, **arrays)


def _fmt(v: Any, digits: int = 3) -> str:
    """A table cell: a float with ``digits`` decimals, None as ``–``."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.{digits}f}"
    return str(v)


def robustness_table(rows: Sequence[dict[str, Any]], key: str, corruptions: Sequence[str], severities: Sequence[int],
                     ce: dict[str, Any] | None = None, digits: int = 3) -> list[str]:
    """Markdown lines: rows corruption, columns severity 0 (clean) and ``severities``, the mean over them (and CE)."""
    by = {(r["corruption"], r["severity"]): r.get(key) for r in rows}
    cols = [0, *severities]
    contiguous = list(severities) == list(range(severities[0], severities[-1] + 1))
    span = f"{severities[0]}-{severities[-1]}" if contiguous and len(severities) > 1 else ",".join(map(str, severities))
    head = ["corruption", *(f"{s}" for s in cols), f"mean {span}"] + (["CE", "rel. CE"] if ce else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in corruptions:
        vals = [by.get((c, s)) for s in cols]
        sev_vals = [v for v in vals[1:] if v is not None and np.isfinite(v)]
        cells = [c, *(_fmt(v, digits) for v in vals), _fmt(float(np.mean(sev_vals)) if sev_vals else None, digits)]
        if ce:
            cells += [_fmt(ce["ce"].get(c)), _fmt((ce["relative_ce"] or {}).get(c))]
        lines.append("| " + " | ".join(cells) + " |")
    if ce:
        lines.append("| **mean (mCE)** | " + " | ".join("" for _ in cols) + " | | "
                     f"**{_fmt(ce['mce'])}** | **{_fmt(ce['relative_mce'])}** |")
    return lines


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]], names: Sequence[str], sev: Sequence[int]) -> str:
    """robustness.md: the settings, then one table per score (rows corruption, columns severity)."""
    ref = meta.get("reference")
    lines = [f"# Robustness of `{meta['workdir']}` (checkpoint {meta['checkpoint_step']})", "",
             f"{meta['n_images']} `{meta['split']}` frames; saliency on {meta['n_saliency']} frames with a mask "
             f"(true-label maps, inside the field of view: {meta['fov']}); seed {meta['seed']}. "
             "Severity 0 = the clean frames. Corruptions: docs/robustness.md.", ""]
    if ref:
        lines += [f"Reference for the corruption error: `{ref}` (checkpoint {meta['reference_step']}, clean accuracy "
                  f"{_fmt(meta['reference_clean_accuracy'])}). CE = sum_s err / sum_s err_ref; rel. CE = "
                  "sum_s (err - err_clean) / sum_s (err_ref - err_ref_clean) (Hendrycks & Dietterich 2019).", ""]
    for key, title in _TABLES:
        if not any(r.get(key) is not None for r in rows):
            continue
        lines += [f"## {title}", ""]
        lines += robustness_table(rows, key, names, sev, meta["corruption_error"] if key == "accuracy" and ref
                                  else None, digits=1 if key == "psnr" else 3)
        lines.append("")
    for note in meta["notes"]:
        lines.append(f"Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """All rows, every column of ``ROBUSTNESS_COLUMNS`` (empty cells for None)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROBUSTNESS_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in ROBUSTNESS_COLUMNS})


def _curves_figure(rows: Sequence[dict[str, Any]], names: Sequence[str], sev: Sequence[int], path: str) -> str:
    """Accuracy (and each saliency dice@area) against severity: one panel per score, one line per corruption."""
    keys = [("accuracy", "accuracy")] + [(f"{m}_dice@area", f"{m} Dice@area") for m in SALIENCY_METHODS
                                          if any(r.get(f"{m}_dice@area") is not None for r in rows)]
    fig = Figure(figsize=(4.2 * len(keys) + 1.8, 3.6))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    by = {(r["corruption"], r["severity"]): r for r in rows}
    xs = [0, *sev]
    colours = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(names))]
    for ax, (key, title) in zip(axes, keys):
        for i, c in enumerate(names):
            ys = [by[(c, s)].get(key) for s in xs]
            ys = [np.nan if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=c, color=colours[i],
                    ls="-" if i < 10 else "--")
        ax.set_xticks(xs)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")
    return path


def _examples_figure(strip: dict[str, list[np.ndarray]], mask: np.ndarray | None, sev: Sequence[int],
                     path: str) -> str:
    """One frame at each severity (columns) of each corruption (rows), the mask's contour in white."""
    names = list(strip)
    ncol = 1 + len(sev)
    fig = Figure(figsize=(1.25 * ncol + 0.9, 1.25 * len(names) + 0.3))
    axes = fig.subplots(len(names), ncol, squeeze=False)
    for i, c in enumerate(names):
        for j, img in enumerate(strip[c]):
            ax = axes[i, j]
            show = img[..., 0] if img.shape[-1] == 1 else img[..., :3]
            ax.imshow(show, cmap="gray" if show.ndim == 2 else None, vmin=0, vmax=255)
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if j == 0 else f"severity {sev[j - 1]}", fontsize=7)
            if j == 0:
                ax.set_ylabel(c, fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")
    return path


def evaluate_robustness(workdir: str, reference: str | None = None, corruptions: Sequence[str] | None = None,
                        severities: Sequence[int] | None = None, max_images: int = 32, split: str = "test",
                        out_dir: str | None = None, *, which: str = "best", seed: int = 0, batch_size: int = 16,
                        figures: bool = True, progress: bool = True) -> dict[str, Any]:
    """Accuracy, balanced accuracy and saliency localisation of a run per corruption x severity; returns the summary.

    ``corruptions``: names of ``data.corruptions.CORRUPTIONS`` (default all); ``severities``:
    some of 1..5 (default all; severity 0, the clean frames, is always scored). Every frame of
    ``split`` is classified; saliency is scored on at most ``max_images`` of them that have a
    ground-truth mask inside the field of view (evenly spaced). ``reference``: a second run
    scored on the same corrupted frames for the corruption error (``CE_c``, ``mCE``); it must
    have the same classes and image shape and must not have trained on these frames. Corruption
    ``c`` at severity ``s`` draws from ``corruptions.corruption_rng(seed, c, s)``. Writes into
    ``out_dir`` (default ``WORKDIR/robustness``). Returns ``{rows, corruption_error, ...}`` as
    written to ``robustness.json``.
    """
    names = K.check_names(corruptions)
    sev = check_severities(severities)
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    run = runs.load_run(workdir, which)
    ds = loop.load_dataset(run.cfg)
    indices = runs.split_indices(split, runs.run_splits(workdir, run.cfg, ds), len(ds.labels))
    notes: list[str] = []
    ref = runs.load_run(reference, "best") if reference else None
    if ref is not None:
        notes += _check_reference(run, ref, ds, indices, split)
    recs = [ds.source[int(i)] for i in indices]
    images = np.stack([np.asarray(r["image"], np.uint8) for r in recs])
    labels = runs.label_map(ds.class_names, run.class_names)[np.asarray(ds.labels)[indices]].astype(np.int64)
    fov = K.field_of_view(images)
    circular = not bool(fov.all())
    loc = np.zeros(0, np.int64)
    masks = None
    if ds.has_masks and max_images > 0:
        masks = np.stack([np.asarray(r["mask"]) > 0 for r in recs])
        with_mask = np.flatnonzero((masks & fov[None]).any(axis=(1, 2)))
        loc = select_images(with_mask, max_images) if len(with_mask) else loc
    if not ds.has_masks:
        notes.append(f"the data ({run.cfg.data.source}) has no ground-truth masks: no saliency scores")
    elif max_images > 0 and not len(loc):
        notes.append(f"no {split} frame has a lesion mask inside the field of view: no saliency scores")
    methods = [m for m in SALIENCY_METHODS if m != "sc" or run.global_emb is not None] if len(loc) else []
    if len(loc) and run.global_emb is None:
        notes.append("a linear-head (ce) run has no global class embeddings: no SC maps")
    bsize = max(1, min(batch_size, len(loc))) if len(loc) else 1
    targets = labels[loc].astype(np.int32)
    strip_pos = int(loc[0]) if len(loc) else 0
    rows: list[dict[str, Any]] = []
    ref_acc: dict[tuple[str, int], float] = {}
    correct: dict[tuple[str, int], np.ndarray] = {}
    ref_correct: dict[tuple[str, int], np.ndarray] = {}

    def score(corruption: str, severity: int, corrupted: np.ndarray) -> dict[str, Any]:
        """The row of one corruption x severity (classification, PSNR, saliency; the reference's error)."""
        t0 = time.time()
        row: dict[str, Any] = {"corruption": corruption, "severity": severity, "n_images": int(len(images)),
                               "n_saliency": int(len(loc)), "psnr": K.psnr(images, corrupted, fov)}
        if not np.isfinite(row["psnr"]):  # the clean frames: no noise to measure (JSON has no inf)
            row["psnr"] = None
        scores, correct[(corruption, severity)] = _classify(run, corrupted, labels)
        row.update(scores)
        row["error"] = 1.0 - row["accuracy"]
        if ref is not None:
            scores, ref_correct[(corruption, severity)] = _classify(ref, corrupted, labels)
            ref_acc[(corruption, severity)] = scores["accuracy"]
            row["reference_error"] = 1.0 - ref_acc[(corruption, severity)]
        x = normalize_images(corrupted[loc])
        for m in SALIENCY_METHODS:
            if m not in methods:
                row[f"{m}_dice@area"] = row[f"{m}_pr_auc"] = None
                continue
            maps = _maps(run, m, x, targets, bsize)
            lm = evaluate.localisation_metrics(maps, masks[loc], thresholds=(), otsu=False, valid=fov, area=True)
            row[f"{m}_dice@area"] = lm["thresholds"]["area"]["dice"]
            row[f"{m}_pr_auc"] = lm["pr_auc"]
        row["seconds"] = round(time.time() - t0, 2)
        return row

    clean = score("clean", 0, images)
    strip: dict[str, list[np.ndarray]] = {}
    for c in names:
        t0 = time.time()
        rows.append({**clean, "corruption": c})
        strip[c] = [images[strip_pos]]
        for s in sev:
            corrupted = K.corrupt(c, images, s, K.corruption_rng(seed, c, s), fov=fov)
            rows.append(score(c, s, corrupted))
            strip[c].append(corrupted[strip_pos])
        if progress:
            mine = [r for r in rows if r["corruption"] == c]
            sal = (" gradcam dice@area " + " ".join(_fmt(r["gradcam_dice@area"], 2) for r in mine)
                   if "gradcam" in methods else "")
            log(f"[robustness] {c:<14} accuracy " + " ".join(_fmt(r["accuracy"], 2) for r in mine) + sal +
                f" ({time.time() - t0:.1f} s)")
    ce = None
    if ref is not None:
        run_err = {c: [r["error"] for r in rows if r["corruption"] == c and r["severity"] > 0] for c in names}
        ref_err = {c: [1.0 - ref_acc[(c, s)] for s in sev] for c in names}
        ce = K.mean_corruption_error(run_err, ref_err, clean["error"], 1.0 - ref_acc[("clean", 0)])
        if progress:
            log(f"[robustness] mCE {_fmt(ce['mce'])} (relative {_fmt(ce['relative_mce'])}) against {reference}")
    out_dir = out_dir or os.path.join(workdir, "robustness")
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"robustness.{k}") for k in ("json", "csv", "md")}
    meta: dict[str, Any] = {
        "workdir": workdir, "checkpoint_step": run.step, "reference": reference,
        "reference_step": ref.step if ref is not None else None,
        "reference_clean_accuracy": ref_acc.get(("clean", 0)), "split": split, "n_images": int(len(images)),
        "n_saliency": int(len(loc)), "saliency_indices": indices[loc].tolist(), "saliency_methods": methods,
        "corruptions": names, "severities": sev, "schedule": {c: K.SEVERITY_SCHEDULE[c] for c in names},
        "seed": seed, "fov": "inscribed disc" if circular else "whole frame", "clean": clean,
        "corruption_error": ce, "rows": rows, "notes": notes, "files": {}}
    _write_csv(paths["csv"], rows)
    _write_frames(os.path.join(out_dir, "frames.npz"), correct, ref_correct, names, sev,
                  np.asarray(ds.patients)[indices], labels, indices)
    with open(paths["md"], "w") as f:
        f.write(_markdown(meta, rows, names, sev))
    if figures:
        meta["files"]["figure"] = os.path.basename(_curves_figure(rows, names, sev,
                                                                  os.path.join(out_dir, "robustness.png")))
        meta["files"]["examples"] = os.path.basename(_examples_figure(
            strip, masks[strip_pos] if masks is not None else None, sev, os.path.join(out_dir, "examples.png")))
    meta["files"].update({k: os.path.basename(p) for k, p in paths.items()}, frames="frames.npz")
    loop.write_json(paths["json"], meta)
    return meta
