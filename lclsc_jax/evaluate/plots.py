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
    "make_per_patient_figure",
    "make_roc_figure",
    "per_patient_bars",
    "roc_curves",
]

PathLike = str | os.PathLike


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
            ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC={auc:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
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


def make_confidence_figure(probs: Any, y_true: Any, n_bins: int = ECE_BINS) -> Figure:
    """Two panels: histogram of max-probability confidence (correct vs wrong) and a reliability diagram."""
    y, p = _check_labels_probs(y_true, probs)
    cal = calibration_bins(p.max(axis=1), p.argmax(axis=1) == y, n_bins)
    edges = np.asarray(cal["bin_edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = Figure(figsize=(9, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(centres, cal["correct"], width=width, color="tab:green", label="correct", edgecolor="white")
    ax1.bar(centres, cal["incorrect"], width=width, bottom=cal["correct"], color="tab:red", label="wrong",
            edgecolor="white")
    ax1.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="frames", title="confidence histogram")
    ax1.legend(fontsize=8)
    acc = np.array([np.nan if a is None else a for a in cal["accuracy"]])
    ax2.bar(centres, np.nan_to_num(acc), width=width, color="tab:blue", edgecolor="white", label="accuracy")
    ax2.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    ax2.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax2.set_title(f"reliability diagram (ECE={cal['ece']:.3f})")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def confidence_histogram(probs: Any, y_true: Any, path: PathLike, n_bins: int = ECE_BINS) -> Path:
    """Write ``make_confidence_figure`` of ``probs (N, C)``, ``y_true (N,)`` to the PNG ``path``; return it."""
    return _save(make_confidence_figure(probs, y_true, n_bins), path)
