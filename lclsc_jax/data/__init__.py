"""Data: synthetic pCLE and users' datasets (TFDS array_record), patient-wise splits, grain pipelines.

    ds = data.load("synthetic")                       # or a folder / CSV manifest
    splits = data.splits_for(ds)                      # {"train", "val", "test"} record indices
    it = data.train_iterator(ds, splits["train"], global_batch_size=64, seed=0)
    batch = next(it)                                  # image (B_local, H, W, C) float32, ...
"""

from lclsc_jax.data.augment import AugmentConfig, augment_record, denormalize_images, normalize_images
from lclsc_jax.data.batching import array_batches, pad_rows
from lclsc_jax.data.builders import (
    Dataset,
    LclscUserImages,
    RecordSource,
    SyntheticPcle,
    default_cache_dir,
    load,
)
from lclsc_jax.data.io import DataError, load_image_file, load_mask_file, read_manifest, scan_folder
from lclsc_jax.data.pipeline import (
    GlobalOrder,
    eval_batches,
    num_eval_batches,
    train_dataset,
    train_iterator,
)
from lclsc_jax.data.splits import (
    check_disjoint,
    leave_one_patient_out,
    patient_kfold,
    patient_split,
    split_report,
    splits_for,
)
from lclsc_jax.data.export import export_synthetic
from lclsc_jax.data.synthetic import EVIDENCE, SyntheticConfig, generate_arrays, generate_patient
from lclsc_jax.data.synthetic import config_from_options as synthetic_config
from lclsc_jax.data.viz import render_examples, render_panel

__all__ = [
    "EVIDENCE",
    "AugmentConfig",
    "DataError",
    "Dataset",
    "GlobalOrder",
    "LclscUserImages",
    "RecordSource",
    "SyntheticConfig",
    "SyntheticPcle",
    "array_batches",
    "augment_record",
    "check_disjoint",
    "default_cache_dir",
    "denormalize_images",
    "eval_batches",
    "export_synthetic",
    "generate_arrays",
    "generate_patient",
    "leave_one_patient_out",
    "load",
    "load_image_file",
    "load_mask_file",
    "normalize_images",
    "num_eval_batches",
    "pad_rows",
    "patient_kfold",
    "patient_split",
    "read_manifest",
    "render_examples",
    "render_panel",
    "scan_folder",
    "split_report",
    "splits_for",
    "synthetic_config",
    "train_dataset",
    "train_iterator",
]
