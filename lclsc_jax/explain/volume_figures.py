"""Figures and files of saliency maps on volumes: orthogonal slices + MIP, and NIfTI maps.

Axis convention (the project's): array axes are the NIfTI voxel axes ``(i, j, k)`` as nibabel
reads them. For the usual RAS-like orientation ``i`` runs left-right, ``j`` posterior-anterior
and ``k`` inferior-superior, so the panels are named sagittal (``i`` fixed), coronal (``j``
fixed) and axial (``k`` fixed); each panel shows its two remaining axes with the later axis
vertical (``origin="lower"``). A map written by :func:`write_map_nifti` with the input's affine
lines up with the input in 3D Slicer / ITK-SNAP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lclsc_jax.data.volumes import write_nifti

__all__ = ["PLANES", "orthogonal_figure", "orthogonal_grid", "orthogonal_slices", "write_map_nifti"]

#: Panel names, by the array axis held fixed (0, 1, 2).
PLANES: tuple[str, ...] = ("sagittal", "coronal", "axial")


def orthogonal_slices(heat: np.ndarray) -> tuple[int, int, int]:
    """Voxel ``(i, j, k)`` of the maximum of ``heat (D, H, W)`` (first in C order); the centre for a flat map."""
    h = np.asarray(heat, np.float64)
    if h.ndim != 3:
        raise ValueError(f"heat must be a volume (D, H, W), got {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("heat contains NaN or inf")
    if h.size == 0 or h.max() == h.min():
        return tuple(int(s // 2) for s in h.shape)  # type: ignore[return-value]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(h)), h.shape))  # type: ignore[return-value]


def _display(volume: np.ndarray) -> np.ndarray:
    """Grey-level ``(D, H, W)`` in [0, 1] of a volume ``(D, H, W)`` or ``(D, H, W, C)`` (channel mean, min-max)."""
    v = np.asarray(volume, np.float64)
    if v.ndim == 4:
        v = v.mean(axis=-1)
    if v.ndim != 3:
        raise ValueError(f"volume must have shape (D, H, W) or (D, H, W, C), got {np.asarray(volume).shape}")
    lo, hi = float(v.min()), float(v.max())
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def _panel(ax: Any, image: np.ndarray | None, heat: np.ndarray, mask: np.ndarray | None, title: str,
           alpha: float, vmax: float) -> Any:
    """Draw one 2D panel (arrays indexed (horizontal, vertical)); return the heat's image for the colour bar."""
    if image is not None:
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
    im = ax.imshow(heat.T, cmap="jet", origin="lower", alpha=alpha if image is not None else 1.0, vmin=0.0,
                   vmax=vmax)
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.T.astype(float), levels=[0.5], colors="white", linewidths=0.9, origin="lower")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _finish(fig: Figure, title: str, path: str | None, dpi: int) -> Figure | str:
    """Title and lay out ``fig``; write it as PNG at ``path`` (returned) or return the Figure."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if path is None:
        return fig
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def orthogonal_figure(volume: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None,
                      path: str | None = None, title: str = "", alpha: float = 0.5) -> Figure | str:
    """Three orthogonal slices through the map's maximum plus its maximum-intensity projection.

    ``volume (D, H, W)`` or ``(D, H, W, C)`` (shown in grey, min-max scaled), ``heat (D, H, W)``
    the map (jet, its own range ``[min(0, heat), max(heat)]`` clipped at 0), ``mask (D, H, W)``
    bool: its outline (white) on every panel (the projected mask on the MIP). Panels: sagittal
    (axis 0 fixed), coronal (axis 1), axial (axis 2) through ``orthogonal_slices(heat)``, then
    the map's MIP along axis 2; each with a colour bar. Writes a PNG and returns ``path`` if
    given, else returns the matplotlib ``Figure``.
    """
    img = _display(volume)
    h = np.asarray(heat, np.float64)
    if h.shape != img.shape:
        raise ValueError(f"heat must have the volume's shape {img.shape}, got {h.shape}")
    m = None
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != img.shape:
            raise ValueError(f"mask must have the volume's shape {img.shape}, got {m.shape}")
    peak = orthogonal_slices(h)
    h = np.maximum(h, 0.0)
    vmax = float(h.max()) if h.max() > 0 else 1.0
    fig = Figure(figsize=(13.0, 3.4))
    axes = fig.subplots(1, 4)
    for ax_i, (plane, idx) in enumerate(zip(PLANES, peak)):
        take = lambda a, i=idx, axis=ax_i: None if a is None else np.take(a, i, axis=axis)  # noqa: E731
        im = _panel(axes[ax_i], take(img), take(h), take(m), f"{plane} (axis {ax_i} = {idx})", alpha, vmax)
        fig.colorbar(im, ax=axes[ax_i], fraction=0.046, pad=0.04)
    im = _panel(axes[3], None, h.max(axis=2), None if m is None else m.any(axis=2), "map MIP (axis 2)", alpha, vmax)
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.04)
    return _finish(fig, title, path, dpi=100)


def orthogonal_grid(volume: np.ndarray, rows: Sequence[tuple[str, np.ndarray | None]], mask: np.ndarray | None = None,
                    path: str | None = None, title: str = "", alpha: float = 0.5) -> Figure | str:
    """One row per map: :func:`orthogonal_figure`'s four panels for each ``(label, heat (D, H, W) in [0, 1])``.

    Every row slices through its own map's maximum; a ``None`` map (a failed method) gets a
    "failed" row. Colour range [0, 1], one colour bar per row. PNG at ``path`` (returned), else the Figure.
    """
    img = _display(volume)
    m = None if mask is None else np.asarray(mask).astype(bool)
    if m is not None and m.shape != img.shape:
        raise ValueError(f"mask must have the volume's shape {img.shape}, got {m.shape}")
    if not rows:
        raise ValueError("orthogonal_grid needs at least one (label, map) row")
    fig = Figure(figsize=(10.0, 2.3 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for r, (label, heat) in enumerate(rows):
        if heat is None:
            for ax in axes[r]:
                ax.axis("off")
            axes[r, 0].text(0.5, 0.5, f"{label}: failed", ha="center", va="center", color="red",
                            transform=axes[r, 0].transAxes)
            continue
        h = np.clip(np.asarray(heat, np.float64), 0.0, 1.0)
        if h.shape != img.shape:
            raise ValueError(f"map {label!r} must have the volume's shape {img.shape}, got {h.shape}")
        peak = orthogonal_slices(h)
        for ax_i, idx in enumerate(peak):
            take = lambda a, i=idx, axis=ax_i: None if a is None else np.take(a, i, axis=axis)  # noqa: E731
            _panel(axes[r, ax_i], take(img), take(h), take(m), f"{PLANES[ax_i]} {idx}", alpha, 1.0)
        im = _panel(axes[r, 3], None, h.max(axis=2), None if m is None else m.any(axis=2), "MIP", alpha, 1.0)
        fig.colorbar(im, ax=axes[r, 3], fraction=0.046, pad=0.04)
        axes[r, 0].set_ylabel(label, fontsize=8)
    return _finish(fig, title, path, dpi=90)


def write_map_nifti(path: str, heat: np.ndarray, affine: np.ndarray | None = None) -> str:
    """Write a map ``(D, H, W)`` as float32 NIfTI with the input volume's ``affine`` (4, 4) (default identity)."""
    h = np.asarray(heat)
    if h.ndim != 3:
        raise ValueError(f"heat must be a volume (D, H, W), got {h.shape}")
    if affine is not None and np.asarray(affine).shape != (4, 4):
        raise ValueError(f"affine must have shape (4, 4), got {np.asarray(affine).shape}")
    return write_nifti(path, h.astype(np.float32), affine)
