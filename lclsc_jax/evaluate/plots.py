"""Report figures (matplotlib): ROC curves, confusion matrix, per-patient bars, calibration.

Each ``make_*`` function builds and returns a ``Figure`` (for notebooks and tests);
the matching writer saves it as a PNG and returns the path. Figures are created with
``matplotlib.figure.Figure`` directly, never through ``pyplot``: no global figure
state, nothing to close, and importing this module does not change the user's
backend (PNGs are rendered by the Agg canvas, so it works headless). The numbers
plotted come from ``lclsc_jax.evaluate.metrics`` so figures and reports agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lclsc_jax.evaluate.metrics import (
    ECE_BINS,
    _check_labels_probs,
    binary_auroc,
    calibration_bins,
    roc_curve_points,
)

__all__ = [
    "confidence_histogram",
    "confusion_matrix_plot",
    "make_confidence_figure",
    "make_confusion_figure",
    "make_patient_distribution_figure",
    "make_per_patient_figure",
    "make_reliability_figure",
    "make_roc_figure",
    "make_threshold_figure",
    "patient_distribution",
    "per_patient_bars",
    "reliability_diagram",
    "roc_curves",
    "threshold_curves",
    "threshold_table",
]

PathLike = str | os.PathLike

#: ROC axes limits: a margin around [0, 1] so a curve on the border (AUC = 1) stays visible.
ROC_LIMITS = (-0.02, 1.02)
#: Colours of correct and wrong frames (Okabe-Ito blue and vermillion: distinct also for colour-blind readers).
CORRECT_COLOR, WRONG_COLOR = "#0072B2", "#D55E00"


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) with the Agg canvas; return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(p, dpi=120, bbox_inches="tight", format="png")
    return p


def _as_folds(y_true: Any, probs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Accept one (N,)/(N, C) pair or lists of them (one per fold); validate each."""
    if isinstance(probs, np.ndarray) or (hasattr(probs, "ndim") and probs.ndim == 2):
        y_true, probs = [y_true], [probs]
    if len(y_true) != len(probs) or len(probs) == 0:
        raise ValueError(f"need as many y_true as probs arrays (>= 1), got {len(y_true)} and {len(probs)}")
    folds = [_check_labels_probs(y, p) for y, p in zip(y_true, probs)]
    if len({p.shape[1] for _, p in folds}) != 1:
        raise ValueError("every fold's probs must have the same number of classes")
    return folds


def _names(class_names: Sequence[str] | None, c: int) -> list[str]:
    """Class names, defaulting to "0".."C-1"; length checked."""
    names = [str(i) for i in range(c)] if class_names is None else [str(n) for n in class_names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries, expected {c}")
    return names


# ------------------------------------------------------------------------------- ROC


def make_roc_figure(
    y_true: Any, probs: Any, class_names: Sequence[str] | None = None, positive_class: int | None = None
) -> Figure:
    """ROC curves: one line per fold; one panel (positive class) for C=2, one panel per class (OvR) else.

    ``y_true``/``probs`` are one fold's ``(N,)``/``(N, C)`` arrays or lists of them.
    Legends give each curve's AUROC (Mann-Whitney, same as ``classification_metrics``).
    """
    folds = _as_folds(y_true, probs)
    c = folds[0][1].shape[1]
    names = _names(class_names, c)
    if c == 2:
        panels = [1 if positive_class is None else int(positive_class)]
    else:
        panels = list(range(c)) if positive_class is None else [int(positive_class)]
    if any(not 0 <= k < c for k in panels):
        raise ValueError(f"positive_class must be in 0..{c - 1}")
    fig = Figure(figsize=(4.2 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, k in zip(axes[0], panels):
        for f, (y, p) in enumerate(folds):
            auc = binary_auroc(y == k, p[:, k])
            if auc is None:  # class absent (or alone) in this fold: no curve
                continue
            fpr, tpr, _ = roc_curve_points(y == k, p[:, k])
            label = f"fold {f}" if len(folds) > 1 else "ROC"
            # Above the frame and unclipped: a perfect curve (AUC = 1) runs along the axes' edges.
            ax.plot(fpr, tpr, lw=2.0, label=f"{label} (AUC={auc:.3f})", clip_on=False, zorder=3)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, zorder=1)
        ax.set(xlim=ROC_LIMITS, ylim=ROC_LIMITS, xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
        ax.set_title(f"{names[k]} vs rest" if c > 2 else f"positive class: {names[k]}")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def roc_curves(
    y_true: Any,
    probs: Any,
    path: PathLike,
    class_names: Sequence[str] | None = None,
    positive_class: int | None = None,
) -> Path:
    """Write ``make_roc_figure`` for per-fold ``y_true``/``probs`` to the PNG ``path``; return it."""
    return _save(make_roc_figure(y_true, probs, class_names, positive_class), path)


# -------------------------------------------------------------------- confusion matrix


def make_confusion_figure(cm: Any, class_names: Sequence[str] | None = None, normalize: bool = False) -> Figure:
    """Heat map of a confusion matrix ``cm (C, C)`` (rows true, columns predicted), counts annotated."""
    m = np.asarray(cm, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"cm must be a square (C, C) matrix, got {m.shape}")
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("cm must hold finite non-negative counts")
    names = _names(class_names, m.shape[0])
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1) if normalize else m
    size = 1.2 + 0.7 * len(names)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    hi = shown.max() if shown.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            text = f"{shown[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
            ax.text(j, i, text, ha="center", va="center", color="white" if shown[i, j] > hi / 2 else "black")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    fig.tight_layout()
    return fig


def confusion_matrix_plot(
    cm: Any, class_names: Sequence[str] | None, path: PathLike, normalize: bool = False
) -> Path:
    """Write ``make_confusion_figure`` of ``cm (C, C)`` to the PNG ``path``; return it."""
    return _save(make_confusion_figure(cm, class_names, normalize), path)


# ---------------------------------------------------------------------- per patient


def make_per_patient_figure(per_patient: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Bar per patient of frame accuracy (``classification_metrics(...)["per_patient"]``), n on top."""
    if not per_patient:
        raise ValueError("per_patient is empty")
    keys = list(per_patient)
    missing = [k for k in keys if "accuracy" not in per_patient[k]]
    if missing:
        raise ValueError(f"per_patient entries need an 'accuracy' key; missing for {missing[:3]}")
    acc = [float(per_patient[k]["accuracy"]) for k in keys]
    colors = ["tab:green" if per_patient[k].get("correct", True) else "tab:red" for k in keys]
    fig = Figure(figsize=(max(4.0, 0.45 * len(keys) + 1.5), 3.6))
    ax = fig.subplots()
    bars = ax.bar(range(len(keys)), acc, color=colors)
    for bar, k in zip(bars, keys):
        n = per_patient[k].get("n")
        if n is not None:
            x = bar.get_x() + bar.get_width() / 2
            ax.text(x, bar.get_height() + 0.01, f"n={n}", ha="center", fontsize=7)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.12), ylabel="frame accuracy", xlabel="patient")
    ax.set_title("per-patient accuracy (red: majority vote wrong)")
    fig.tight_layout()
    return fig


def per_patient_bars(per_patient: Mapping[str, Mapping[str, Any]], path: PathLike) -> Path:
    """Write ``make_per_patient_figure`` to the PNG ``path``; return it."""
    return _save(make_per_patient_figure(per_patient), path)


# ---------------------------------------------------------------------- calibration


def _confidence_correct(probs: Any, y_true: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """``(confidence (N,), correct (N,) bool, C)``: max probability and whether its argmax is the label."""
    y, p = _check_labels_probs(y_true, probs)
    return p.max(axis=1), p.argmax(axis=1) == y, p.shape[1]


def _draw_reliability(ax: Any, cal: Mapping[str, Any]) -> None:
    """Reliability diagram of ``calibration_bins`` output on ``ax``: accuracy per bin, its frame count above it."""
    edges = np.asarray(cal["bin_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    acc = np.array([np.nan if a is None else a for a in cal["accuracy"]])
    ax.bar(centres, np.nan_to_num(acc), width=width, color="tab:blue", edgecolor="white", label="accuracy")
    conf = np.array([np.nan if c is None else c for c in cal["confidence"]])
    shown = np.isfinite(conf)
    ax.plot(conf[shown], acc[shown], "o", c="black", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    for x, a, n in zip(centres, acc, cal["count"]):
        if n:
            ax.text(x, min(np.nan_to_num(a), 1.0) + 0.02, f"{n}", ha="center", va="bottom", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.12), xlabel="confidence (max probability)", ylabel="accuracy")
    ax.set_title(f"reliability diagram (ECE={cal['ece']:.3f}); frames per bin on top", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def make_confidence_figure(probs: Any, y_true: Any, n_bins: int = ECE_BINS) -> Figure:
    """Two panels: confidence histogram of correct vs wrong frames (side by side) and a reliability diagram.

    ``probs (N, C)``, ``y_true (N,)``. The histogram's bars are the frame counts per
    ``calibration_bins`` bin, correct and wrong side by side in contrasting colours, each count
    written above its bar, on a symmetric-log axis so a handful of wrong frames stays visible
    beside hundreds of correct ones.
    """
    conf, correct, c = _confidence_correct(probs, y_true)
    cal = calibration_bins(conf, correct, n_bins)
    edges = np.asarray(cal["bin_edges"])
    left, width = edges[:-1], np.diff(edges)
    fig = Figure(figsize=(10, 3.9))
    ax1, ax2 = fig.subplots(1, 2)
    for k, (key, color, name) in enumerate((("correct", CORRECT_COLOR, "correct"),
                                            ("incorrect", WRONG_COLOR, "wrong"))):
        counts = np.asarray(cal[key])
        x = left + width * (0.05 + 0.45 * k)
        ax1.bar(x, counts, width=width * 0.45, align="edge", color=color, edgecolor="black", lw=0.4,
                label=f"{name} ({int(counts.sum())})")
        for xi, n in zip(x, counts):
            if n:
                ax1.text(xi + width[0] * 0.225, n, f"{int(n)}", ha="center", va="bottom", fontsize=6, color=color)
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_ylim(bottom=0)
    lo = edges[max(0, int(np.searchsorted(edges, 1.0 / c, side="right")) - 1)]
    ax1.set(xlim=(lo, 1), xlabel="confidence (max probability)", ylabel="frames (symlog scale)")
    ax1.set_title("confidence of correct and wrong frames", fontsize=9)
    ax1.legend(fontsize=8, loc="best")
    _draw_reliability(ax2, cal)
    fig.tight_layout()
    return fig


def confidence_histogram(probs: Any, y_true: Any, path: PathLike, n_bins: int = ECE_BINS) -> Path:
    """Write ``make_confidence_figure`` of ``probs (N, C)``, ``y_true (N,)`` to the PNG ``path``; return it."""
    return _save(make_confidence_figure(probs, y_true, n_bins), path)


def make_reliability_figure(probs: Any, y_true: Any, n_bins: int = ECE_BINS) -> Figure:
    """Reliability diagram of ``probs (N, C)`` vs ``y_true (N,)``: accuracy per confidence bin, counts, ECE.

    Top: accuracy per equal-width bin (``calibration_bins``) against the diagonal, the number of
    frames of each bin written above its bar; bottom: those counts as bars (how much each bin weighs
    in the ECE).
    """
    conf, correct, _ = _confidence_correct(probs, y_true)
    cal = calibration_bins(conf, correct, n_bins)
    edges = np.asarray(cal["bin_edges"])
    fig = Figure(figsize=(4.8, 5.2))
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _draw_reliability(ax1, cal)
    ax1.set_xlabel("")
    ax2.bar((edges[:-1] + edges[1:]) / 2, cal["count"], width=np.diff(edges), color="grey", edgecolor="white")
    ax2.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="frames")
    fig.tight_layout()
    return fig


def reliability_diagram(probs: Any, y_true: Any, path: PathLike, n_bins: int = ECE_BINS) -> Path:
    """Write ``make_reliability_figure`` of ``probs (N, C)``, ``y_true (N,)`` to the PNG ``path``; return it."""
    return _save(make_reliability_figure(probs, y_true, n_bins), path)


def threshold_table(probs: Any, y_true: Any, thresholds: Any = None) -> dict[str, np.ndarray]:
    """Accuracy of the frames kept and coverage (fraction kept) when keeping confidence >= each threshold.

    ``probs (N, C)``, ``y_true (N,)``; ``thresholds (T,)`` default ``0, 0.01, ..., 1``. Returns
    ``{threshold, coverage, accuracy, kept}`` ``(T,)``; accuracy is NaN where no frame is kept.
    """
    conf, correct, _ = _confidence_correct(probs, y_true)
    t = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds, np.float64).ravel()
    keep = conf[None, :] >= t[:, None]
    kept = keep.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(kept > 0, (keep & correct[None, :]).sum(axis=1) / np.maximum(kept, 1), np.nan)
    return {"threshold": t, "coverage": kept / conf.size, "accuracy": acc, "kept": kept}


def make_threshold_figure(probs: Any, y_true: Any) -> Figure:
    """Accuracy of the kept frames and coverage vs a confidence threshold (``threshold_table``), one panel."""
    tab = threshold_table(probs, y_true)
    fig = Figure(figsize=(4.8, 3.6))
    ax = fig.subplots()
    ax.plot(tab["threshold"], tab["accuracy"], c=CORRECT_COLOR, lw=2, label="accuracy of kept frames",
            clip_on=False)
    ax.plot(tab["threshold"], tab["coverage"], c=WRONG_COLOR, lw=2, ls="--", label="coverage (fraction kept)",
            clip_on=False)
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="confidence threshold", ylabel="rate")
    ax.set_title("accuracy and coverage vs confidence threshold", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def threshold_curves(probs: Any, y_true: Any, path: PathLike) -> Path:
    """Write ``make_threshold_figure`` of ``probs (N, C)``, ``y_true (N,)`` to the PNG ``path``; return it."""
    return _save(make_threshold_figure(probs, y_true), path)


def make_patient_distribution_figure(accuracies: Mapping[str, float], high: float = 0.9,
                                     low: float = 0.7) -> Figure:
    """Per-patient accuracy ``{patient: accuracy}``: histogram and strip plot, ``high``/``low`` marked."""
    if not accuracies:
        raise ValueError("accuracies is empty")
    acc = np.asarray([float(v) for v in accuracies.values()])
    n_hi, n_lo = int((acc > high).sum()), int((acc < low).sum())
    fig = Figure(figsize=(8, 3.4))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ax1.hist(acc, bins=np.linspace(0, 1, 11), color=CORRECT_COLOR, edgecolor="white")
    ax1.set(xlim=(0, 1), xlabel="patient accuracy (held-out frames)", ylabel="patients")
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, acc.size)
    colors = [WRONG_COLOR if a < low else ("tab:green" if a > high else "grey") for a in acc]
    ax2.scatter(acc, jitter, c=colors, s=18, edgecolors="black", linewidths=0.3, clip_on=False)
    ax2.set(xlim=(-0.02, 1.02), ylim=(-0.5, 0.5), yticks=[], xlabel="patient accuracy")
    for ax in (ax1, ax2):
        ax.axvline(high, c="tab:green", ls="--", lw=1)
        ax.axvline(low, c=WRONG_COLOR, ls="--", lw=1)
    fig.suptitle(f"{acc.size} patients: {n_hi} above {high:.0%}, {n_lo} below {low:.0%}", fontsize=10)
    fig.tight_layout()
    return fig


def patient_distribution(accuracies: Mapping[str, float], path: PathLike, high: float = 0.9,
                         low: float = 0.7) -> Path:
    """Write ``make_patient_distribution_figure`` to the PNG ``path``; return it."""
    return _save(make_patient_distribution_figure(accuracies, high, low), path)
