"""PNG figures of a dataset: example grids with evidence masks outlined, and a pCLE panel (classes, non-diagnostic frames, a sequence)."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from lclsc_jax.data.builders import Dataset


def _figure(rows: int, cols: int, scale: float = 2.2):
    """A pyplot-free Figure with a (rows, cols) grid of blank axes."""
    fig = Figure(figsize=(scale * cols, (scale + 0.2) * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _show(ax, ds: Dataset, i: int, title: str) -> None:
    """Draw record ``i`` (gray) with its mask outlined in red and a title."""
    ex = ds.source[int(i)]
    img = ex["image"]
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
    if ds.has_masks and ex["mask"].any():
        ax.contour(ex["mask"], levels=[0.5], colors="red", linewidths=0.8)
    ax.set_title(title, fontsize=8)


def _save(fig, path: str | os.PathLike) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)


def render_examples(ds: Dataset, n: int, path: str | os.PathLike, seed: int = 0, cols: int = 6) -> str:
    """Write ``n`` diagnostic examples (balanced over classes) as a PNG grid with mask outlines; returns path."""
    rng = np.random.default_rng(seed)
    ok = np.ones(len(ds), bool) if ds.diagnostic is None else ds.diagnostic
    per_class = [rng.permutation(np.flatnonzero((ds.labels == c) & ok)) for c in range(ds.num_classes)]
    picks: list[int] = []
    for j in range(max(len(p) for p in per_class)):
        picks += [int(p[j]) for p in per_class if j < len(p)]
    picks = picks[:n]
    cols = max(1, min(cols, len(picks)))
    fig, axes = _figure(-(-len(picks) // cols), cols)
    for ax, i in zip(axes.flat, picks):
        _show(ax, ds, i, f"{ds.class_names[ds.labels[i]]} / {ds.patients[i]}")
    return _save(fig, path)


def render_panel(ds: Dataset, path: str | os.PathLike, per_class: int = 4, sequence_frames: int = 6,
                 seed: int = 0) -> str:
    """A pCLE panel: ``per_class`` frames of every class, the non-diagnostic frames, one sequence; returns path.

    Rows: one per class (diagnostic frames of different patients), one of non-diagnostic frames
    (when ``ds.diagnostic`` flags some), and ``sequence_frames`` consecutive frames of one pass of a
    lesion patient (when ``ds.sequence`` is known).
    """
    rng = np.random.default_rng(seed)
    ok = np.ones(len(ds), bool) if ds.diagnostic is None else ds.diagnostic
    rows: list[list[tuple[int, str]]] = []
    for c, name in enumerate(ds.class_names):
        idx = np.flatnonzero((ds.labels == c) & ok)
        by_patient = [rng.choice(idx[ds.patients[idx] == p]) for p in np.unique(ds.patients[idx])]
        picks = rng.permutation(np.asarray(by_patient, np.int64))[:per_class]
        rows.append([(int(i), f"{name} / {ds.patients[i]}") for i in picks])
    if ds.diagnostic is not None and (~ds.diagnostic).any():
        nd = rng.permutation(np.flatnonzero(~ds.diagnostic))[:per_class]
        rows.append([(int(i), f"non-diagnostic / {ds.patients[i]}") for i in nd])
    if ds.sequence is not None and ds.frame is not None:
        lesion = [i for i in np.flatnonzero(ok) if ds.source[int(i)]["mask"].any()] if ds.has_masks else []
        start = int(lesion[0]) if lesion else 0
        seq = np.flatnonzero(ds.sequence == ds.sequence[start])
        seq = seq[np.argsort(ds.frame[seq], kind="stable")][:sequence_frames]
        rows.append([(int(i), f"{ds.sequence[i]} frame {ds.frame[i]}") for i in seq])
    cols = max(len(r) for r in rows)
    fig, axes = _figure(len(rows), cols)
    for r, row in enumerate(rows):
        for c, (i, title) in enumerate(row):
            _show(axes[r, c], ds, i, title)
    return _save(fig, path)
