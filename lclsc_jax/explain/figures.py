"""Writing explanations to disk: ``.npy`` maps, PNG overlays, and a grid of every method."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from lclsc_jax import models
from lclsc_jax.data import denormalize_images, normalize_images, pad_rows
from lclsc_jax.evaluate import shortcuts
from lclsc_jax.explain import core
from lclsc_jax.explain.api import METHODS, saliency


def _display_and_inputs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(display in [0, 1], model inputs)`` from uint8 pixels or already-normalised float inputs."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0, normalize_images(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 pixels or float model inputs, got {images.dtype}")
    x = images.astype(np.float32)
    return denormalize_images(x), x


def field_of_view(display: np.ndarray) -> np.ndarray | None:
    """The circular field of view ``(H, W)`` bool of frames ``display (N, H, W, C)`` in [0, 1], or None.

    None when the frames have no dark corners (not a fibre-bundle image) or are too small to tell.
    """
    return shortcuts.fov_or_none(np.clip(display * 255.0, 0, 255).astype(np.uint8))


def restrict_to_fov(maps: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``maps (N, H, W)`` in [0, 1] set to 0 outside ``valid (H, W)`` and rescaled to max 1 inside."""
    if valid is None:
        return maps
    inside = maps * valid
    peak = inside.reshape(len(inside), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, inside / np.maximum(peak, 1e-12), inside).astype(np.float32)


def overlay(ax: Any, image: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.5,
            valid: np.ndarray | None = None, mask: np.ndarray | None = None, colorbar: bool = False) -> None:
    """Draw ``heat (H, W)`` in [0, 1] (jet) over ``image (H, W, C)`` in [0, 1] on a matplotlib axis.

    ``valid (H, W)`` bool: the field of view; the map is drawn only inside it, so the black corners
    of a fibre-bundle frame stay black. ``mask (H, W)``: the evidence mask, outlined in white.
    ``colorbar``: a colour bar of the map's scale beside the axis.
    """
    img = image[..., 0] if image.shape[-1] == 1 else image[..., :3]
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
    shown = heat if valid is None else np.ma.masked_where(~np.asarray(valid, bool), heat)
    im = ax.imshow(shown, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
    if mask is not None and np.any(mask) and not np.all(mask):
        ax.contour(np.asarray(mask, np.float32), levels=[0.5], colors="white", linewidths=1.0)
    if colorbar:
        cax = ax.inset_axes([1.03, 0.0, 0.06, 1.0])  # beside the axis, which keeps its size
        cb = ax.figure.colorbar(im, cax=cax, ticks=[0.0, 0.5, 1.0])
        cb.solids.set_alpha(1.0)  # the scale in full colour, whatever the overlay's transparency
        cb.ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def _stem(name: str) -> str:
    base = os.path.basename(str(name))
    stem, _ = os.path.splitext(base)
    return stem or base or "image"


def _predict(model, variables, x, global_emb, tau, score, batch_size: int) -> np.ndarray:
    """Class probabilities ``(N, K)`` of the scorer's outputs (softmax), in padded batches of one shape."""
    scorer = core.make_scorer(model, batch_size, score=score, global_emb=global_emb, tau=tau)
    out = []
    for i in range(0, len(x), batch_size):
        xb, valid = pad_rows(x[i:i + batch_size], batch_size)
        out.append(np.asarray(core.probabilities(model, variables, jnp.asarray(xb), scorer))[valid])
    return np.concatenate(out)


def write_explanations(
    model: Any,
    variables: Any,
    images: np.ndarray,
    image_names: Sequence[str],
    out_dir: str,
    method: str,
    stage: str | Sequence[str] = "last",
    global_emb: jax.Array | None = None,
    class_names: Sequence[str] | None = None,
    tau: float = 0.1,
    targets: Sequence[int] | None = None,
    batch_size: int = 8,
    score: str = "auto",
    display: np.ndarray | None = None,
    progress: bool = True,
    fov: bool = True,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    masks: np.ndarray | None = None,
    **options: Any,
) -> list[str]:
    """Write per image ``<stem>_<method>.npy`` (the (H, W) map) and ``<stem>_<method>.png`` overlay.

    ``images (N, H, W, C)``: uint8 pixels (normalised with ``lclsc_jax.data.normalize_images``) or
    float model inputs. ``display (N, H, W, C')`` in [0, 1] is what the overlays show (default:
    the pixels, or float inputs de-normalised as ``lclsc_jax.data``; pass it for inputs normalised
    otherwise, e.g. ``interop.imagenet_normalize``). ``method="all"`` computes every method (those
    that cannot run on this model, e.g. ``sc`` without ``global_emb`` or on a plain classifier,
    are skipped) and writes ``<stem>_all.png``, a grid. The overlay title names the predicted
    class and its probability. Variables of a ``models.Model`` are checked first
    (``models.check_variables``). ``progress``: with several methods, one line per method on
    stderr. ``fov``: for frames with a circular field of view (dark corners), the maps written and
    shown are restricted to it (0 outside, rescaled inside; a pCLE frame has no tissue there) and
    the figures say so; ``False`` keeps the raw maps. ``method_options``: per method name, options
    of its own (e.g. ``{"sc": {"maps": "decomposed"}}``, a run's ``saliency_options``), also with
    ``method="all"``; ``options`` go to the single ``method``. ``masks (N, H, W)``: evidence masks,
    outlined on every panel. Every map has a colour bar; outside the field of view the frame is
    shown as it is (black corners). Returns the written paths.
    """
    if method != "all" and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected 'all' or one of {METHODS}")
    if isinstance(model, models.Model):
        models.check_variables(model, variables)
    default_display, x = _display_and_inputs(images)
    if display is None:
        display = default_display
    else:
        display = np.asarray(display, np.float32)
        if display.ndim != 4 or display.shape[:3] != x.shape[:3]:
            raise ValueError(f"display must have shape ({x.shape[0]}, {x.shape[1]}, {x.shape[2]}, C), "
                             f"got {display.shape}")
    names = [str(n) for n in image_names]
    if len(names) != len(x):
        raise ValueError(f"got {len(x)} images but {len(names)} names")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != x.shape[:3]:
            raise ValueError(f"masks must have shape {x.shape[:3]}, got {masks.shape}")
    os.makedirs(out_dir, exist_ok=True)
    probs = _predict(model, variables, x, global_emb, tau, score, batch_size)
    pred = probs.argmax(axis=-1)
    labels = list(class_names) if class_names is not None else [str(c) for c in range(probs.shape[-1])]
    tgt = None if targets is None else np.asarray(targets, np.int32)

    valid = field_of_view(display) if fov else None
    fov_note = " [maps inside the field of view]" if valid is not None else ""
    methods = list(METHODS) if method == "all" else [method]
    maps: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for k, m in enumerate(methods):
        st = "last" if m == "sc" else stage
        if progress and len(methods) > 1:
            print(f"[explain] {k + 1}/{len(methods)} {m} ({len(x)} image(s))", file=sys.stderr, flush=True)
        try:
            chunks = []
            for i in range(0, len(x), batch_size):
                t = None if tgt is None else tgt[i:i + batch_size]
                chunks.append(np.asarray(saliency(m, model, variables, x[i:i + batch_size], t, st,
                                                  global_emb=global_emb, tau=tau, score=score,
                                                  **dict((method_options or {}).get(m, {})),
                                                  **(options if method != "all" else {}))))
            maps[m] = restrict_to_fov(np.concatenate(chunks), valid)
        except ValueError as e:
            if method != "all":
                raise
            skipped[m] = str(e).split(";")[0]

    written: list[str] = []
    for i, name in enumerate(names):
        stem = _stem(name)
        shown = pred[i] if tgt is None else tgt[i]
        head = f"{stem}: pred {labels[pred[i]]} (p={probs[i, pred[i]]:.2f})"
        if tgt is not None:
            head += f", explaining {labels[shown]}"
        for m, mp in maps.items():
            path = os.path.join(out_dir, f"{stem}_{m}.npy")
            np.save(path, mp[i].astype(np.float32))
            written.append(path)
        mk = None if masks is None else masks[i]
        if method != "all":
            fig = Figure(figsize=(6.4, 3.2))
            ax = fig.subplots(1, 2)
            overlay(ax[0], display[i], np.zeros_like(maps[method][i]), "image", alpha=0.0, mask=mk)
            overlay(ax[1], display[i], maps[method][i], method, valid=valid, mask=mk, colorbar=True)
            fig.suptitle(head + fov_note, fontsize=9)
            path = os.path.join(out_dir, f"{stem}_{method}.png")
        else:
            cells = ["image"] + list(maps)
            cols = min(6, len(cells))
            rows = -(-len(cells) // cols)
            fig = Figure(figsize=(2.5 * cols, 2.3 * rows))
            axes = fig.subplots(rows, cols, squeeze=False)
            for ax in axes.ravel():
                ax.axis("off")
            for ax, m in zip(axes.ravel(), cells):
                if m == "image":
                    overlay(ax, display[i], np.zeros(display[i].shape[:2]), "image", alpha=0.0, mask=mk)
                else:
                    overlay(ax, display[i], maps[m][i], m, valid=valid, mask=mk, colorbar=True)
            note = f" (skipped: {', '.join(sorted(skipped))})" if skipped else ""
            fig.suptitle(head + fov_note + note, fontsize=9)
            path = os.path.join(out_dir, f"{stem}_all.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
