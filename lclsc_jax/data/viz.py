"""A PNG grid of dataset examples with their evidence masks outlined."""

from __future__ import annotations

import os

import numpy as np

from lclsc_jax.data.builders import Dataset


def render_examples(ds: Dataset, n: int, path: str | os.PathLike, seed: int = 0, cols: int = 6) -> str:
    """Write ``n`` examples (balanced over classes) as a PNG grid with mask outlines; returns path."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(ds.labels == c)) for c in range(ds.num_classes)]
    picks: list[int] = []
    for j in range(max(len(p) for p in per_class)):
        picks += [int(p[j]) for p in per_class if j < len(p)]
    picks = picks[:n]
    cols = max(1, min(cols, len(picks)))
    rows = -(-len(picks) // cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        ex = ds.source[i]
        img = ex["image"]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        if ds.has_masks and ex["mask"].any():
            ax.contour(ex["mask"], levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{ds.class_names[ex['label']]} / {ex['patient']}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)
