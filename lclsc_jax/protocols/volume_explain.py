"""``lclsc explain`` for a run trained on volumes: NIfTI maps aligned with the input, and orthogonal-slice figures.

A volume file is prepared exactly as the run's training data were (``data.volumes.prepare_volume``:
resampled to ``data.image_size``^3 — after ``data.spacing`` if set — normalised and quantised),
so the map lives on the model's voxel grid. It is written with that grid's affine, which maps
the same voxels to the same world coordinates as the input's affine: 3D Slicer and ITK-SNAP
overlay it on the original scan without any registration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lclsc_jax import data, explain
from lclsc_jax.data import volumes as vol
from lclsc_jax.explain import volume_figures

#: What ``--method all`` computes on volumes (the registry's volume methods minus the slow/extra ones).
ALL_VOLUME_METHODS = ("gradcam", "gradcam++", "layercam", "sc", "occlusion")


def volume_stem(path: str) -> str:
    """File name without ``.nii.gz`` / ``.nii`` / ``.npy``, e.g. ``v0`` for ``images/S000/v0.nii.gz``."""
    name = os.path.basename(path.split(vol.PATH_SEPARATOR)[0].strip())
    for ext in vol.VOLUME_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def load_volume_files(cfg: Any, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Volumes as the run's data were prepared: ``(N, S, S, S, C)`` uint8 and their affines ``(N, 4, 4)``."""
    missing = [p for p in paths if not all(os.path.isfile(q.strip()) for q in p.split(vol.PATH_SEPARATOR))]
    if missing:
        raise FileNotFoundError(f"no such volume file(s): {', '.join(missing)}")
    spacing = cfg.data.spacing or None
    pairs = [vol.prepare_volume(p, cfg.data.image_size, cfg.data.channels, spacing) for p in paths]
    return np.stack([u8 for u8, _ in pairs]), np.stack([a for _, a in pairs])


def output_names(paths: Sequence[str]) -> list[str]:
    """One unique stem per input: the file stem, prefixed by its folder when two inputs share a stem."""
    stems = [volume_stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{os.path.basename(os.path.dirname(p.split(vol.PATH_SEPARATOR)[0])) or 'vol'}_{s}"
            for p, s in zip(paths, stems)]


def output_paths(paths: Sequence[str], out_dir: str, methods: Sequence[str]) -> list[str]:
    """Every file :func:`explain_volumes` writes: per volume and method ``<stem>_<method>.nii.gz`` and ``.png``."""
    return [os.path.join(out_dir, f"{s}_{m}.{ext}") for s in output_names(paths) for m in methods
            for ext in ("nii.gz", "png")]


def explain_volumes(run: Any, paths: Sequence[str], out_dir: str, methods: Sequence[str], stage: str = "last",
                    method_options: Mapping[str, Mapping[str, Any]] | None = None, batch_size: int = 2,
                    log: Callable[[str], None] | None = None) -> list[str]:
    """Maps of the run's predicted class for each volume file and method: NIfTI (input-aligned) and a PNG figure.

    ``run``: a ``protocols.runs.TrainedRun`` with a 3D arch. Each map ``(S, S, S)`` in ``[0, 1]``
    is written as ``<stem>_<method>.nii.gz`` with the resampled grid's affine and drawn by
    ``explain.volume_figures.orthogonal_figure`` (three slices through its maximum and its
    maximum-intensity projection). Returns the written paths.
    """
    from lclsc_jax.protocols import runs

    u8, affines = load_volume_files(run.cfg, paths)
    x = data.normalize_images(u8)
    probs = runs.predict(run, u8)["probs"]
    pred = probs.argmax(axis=-1).astype(np.int32)
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    names = output_names(paths)
    display = u8.astype(np.float32) / 255.0
    for method in methods:
        opts = dict((method_options or {}).get(method, {}))
        if log:
            log(f"[explain] {method} on {len(paths)} volume(s) of {u8.shape[1]}^3 voxels")
        maps = explain.saliency_batched(method, run.model, run.variables, x, pred, batch_size=batch_size,
                                        stage=stage, global_emb=run.global_emb, tau=run.cfg.loss.tau, **opts)
        for i, name in enumerate(names):
            base = os.path.join(out_dir, f"{name}_{method}")
            written.append(volume_figures.write_map_nifti(base + ".nii.gz", maps[i], affines[i]))
            title = (f"{name}: {method} for '{run.class_names[pred[i]]}' (p = {probs[i, pred[i]]:.2f}); "
                     "slices through the map's maximum")
            written.append(volume_figures.orthogonal_figure(display[i], maps[i], path=base + ".png", title=title))
    return written
