"""Data: synthetic pCLE and users' datasets (TFDS array_record), patient-wise splits, grain pipelines.

    ds = data.load("synthetic")                       # or a folder / CSV manifest
    splits = data.splits_for(ds)                      # {"train", "val", "test"} record indices
    it = data.train_iterator(ds, splits["train"], global_batch_size=64, seed=0)
    batch = next(it)                                  # image (B_local, H, W, C) float32, ...

Names load on first use (PEP 562): ``lclsc_jax.data.settings`` (the plain dataclasses that
``train.config`` nests) imports no TFDS, grain or JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lclsc_jax.data.augment import augment_record, denormalize_images, normalize_images
    from lclsc_jax.data.batching import array_batches, pad_rows
    from lclsc_jax.data.builders import Dataset, LclscUserImages, RecordSource, SyntheticPcle, default_cache_dir, load
    from lclsc_jax.data.corruptions import CORRUPTION_NAMES, CORRUPTIONS, SEVERITY_SCHEDULE, corrupt
    from lclsc_jax.data.device_augment import augment_batch, augment_view, make_views, resolve_sizes
    from lclsc_jax.data.export import export_synthetic, export_volumes
    from lclsc_jax.data.io import DataError, load_image_file, load_mask_file, read_manifest, scan_folder, source_path
    from lclsc_jax.data.pipeline import GlobalOrder, eval_batches, num_eval_batches, train_dataset, train_iterator
    from lclsc_jax.data.settings import EVIDENCE, EVIDENCE_3D, AugmentConfig, BrainConfig, SyntheticConfig, ViewsConfig
    from lclsc_jax.data.splits import (
        check_disjoint,
        leave_one_patient_out,
        patient_kfold,
        patient_split,
        split_report,
        splits_for,
    )
    from lclsc_jax.data.synthetic import config_from_options as synthetic_config
    from lclsc_jax.data.synthetic import generate_arrays, generate_patient
    from lclsc_jax.data.targets import FILTER_CLASSES, TARGETS, with_target
    from lclsc_jax.data.viz import render_examples, render_panel
    from lclsc_jax.data.volume_builders import load_volumes
    from lclsc_jax.data.volumes import Volume, read_volume, resample, write_nifti

_WHERE = {
    "augment_record": "augment", "denormalize_images": "augment", "normalize_images": "augment",
    "array_batches": "batching", "pad_rows": "batching",
    "Dataset": "builders", "LclscUserImages": "builders", "RecordSource": "builders", "SyntheticPcle": "builders",
    "default_cache_dir": "builders", "load": "builders",
    "export_synthetic": "export", "export_volumes": "export",
    "CORRUPTIONS": "corruptions", "CORRUPTION_NAMES": "corruptions", "SEVERITY_SCHEDULE": "corruptions",
    "corrupt": "corruptions",
    "augment_batch": "device_augment", "augment_view": "device_augment", "make_views": "device_augment",
    "resolve_sizes": "device_augment",
    "DataError": "io", "load_image_file": "io", "load_mask_file": "io", "read_manifest": "io", "scan_folder": "io",
    "source_path": "io",
    "GlobalOrder": "pipeline", "eval_batches": "pipeline", "num_eval_batches": "pipeline",
    "train_dataset": "pipeline", "train_iterator": "pipeline",
    "EVIDENCE": "settings", "EVIDENCE_3D": "settings", "BrainConfig": "settings",
    "AugmentConfig": "settings", "SyntheticConfig": "settings", "ViewsConfig": "settings",
    "check_disjoint": "splits", "leave_one_patient_out": "splits", "patient_kfold": "splits",
    "patient_split": "splits", "split_report": "splits", "splits_for": "splits",
    "generate_arrays": "synthetic", "generate_patient": "synthetic",
    "FILTER_CLASSES": "targets", "TARGETS": "targets", "with_target": "targets",
    "render_examples": "viz", "render_panel": "viz",
    "load_volumes": "volume_builders",
    "Volume": "volumes", "read_volume": "volumes", "resample": "volumes", "write_nifti": "volumes",
}
_ALIASES = {"synthetic_config": ("synthetic", "config_from_options")}
_SUBMODULES = ("augment", "batching", "brain3d", "builders", "cache", "corruptions", "device_augment", "export",
               "fibre_bundle", "io", "pipeline", "probe", "settings", "splits", "synthetic", "targets", "tissue",
               "video", "viz", "volume_builders", "volumes")

__all__ = sorted([*_WHERE, *_ALIASES])


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name in _WHERE:
        module, attr = _WHERE[name], name
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
    elif name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
