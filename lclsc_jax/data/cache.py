"""The opened form of a built cache (``Dataset``, ``RecordSource``) and the helpers that build one atomically.

Shared by the 2D builders (``data.builders``) and the volume builders (``data.volume_builders``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

INDEX_FILE = "lclsc_index.json"


def default_cache_dir() -> str:
    """``$LCLSC_DATA_DIR`` or ``~/.cache/lclsc_jax``."""
    return os.environ.get("LCLSC_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lclsc_jax")


class RecordSource:
    """Random-access view of a built dataset: ``src[i]`` -> dict(image, label, patient, mask)."""

    def __init__(self, tfds_source, image_size: int, has_masks: bool):
        self._src = tfds_source
        self._zeros = np.zeros((image_size, image_size), np.uint8)
        self._has_masks = has_masks

    def __len__(self) -> int:
        return len(self._src)

    def _convert(self, ex: dict) -> dict:
        p = ex["patient"]
        return {
            "image": ex["image"],
            "label": int(ex["label"]),
            "patient": p.decode() if isinstance(p, bytes) else str(p),
            "mask": ex["mask"] if self._has_masks else self._zeros,
        }

    def __getitem__(self, i: int) -> dict:
        return self._convert(self._src[int(i)])

    def __getitems__(self, idx) -> list[dict]:
        """Batched read (array_record reads the records in one call)."""
        return [self._convert(ex) for ex in self._src.__getitems__([int(i) for i in idx])]

    def __repr__(self) -> str:
        return f"RecordSource(n={len(self)}, has_masks={self._has_masks})"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A built dataset: random-access ``source`` and per-record metadata arrays (N,)."""

    source: RecordSource
    class_names: tuple[str, ...]
    labels: np.ndarray  # int32 (N,)
    patients: np.ndarray  # str (N,)
    has_masks: bool
    image_size: int
    channels: int
    split_column: np.ndarray | None = None  # str (N,) from a manifest's `split` column
    path: str = ""  # cache directory of the built dataset
    sequence: np.ndarray | None = None  # str (N,): probe pass / video within the patient
    frame: np.ndarray | None = None  # int32 (N,): frame index within its sequence (-1 unknown)
    diagnostic: np.ndarray | None = None  # bool (N,): False for non-diagnostic frames
    strata: np.ndarray | None = None  # int (N,): what patient-wise splits stratify by, when not ``labels``

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


def _atomic_build(final_dir: Path, build: Callable[[Path], dict]) -> None:
    """Run ``build(tmp_dir) -> index`` in a temp dir, write the index, rename into place."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=final_dir.parent))
    try:
        index = build(tmp)
        (tmp / INDEX_FILE).write_text(json.dumps(index))
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not (final_dir / INDEX_FILE).exists():  # lost a race only if the winner finished
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_quietly(builder: tfds.core.DatasetBuilder, shards: int) -> None:
    """download_and_prepare in ``shards`` shards, without network access, progress bars or TFDS's
    "Downloading" lines; one notice on stderr."""
    dl = tfds.download.DownloadConfig(try_download_gcs=False, num_shards=max(1, int(shards)))
    was_active = tqdm_utils._active  # pylint: disable=protected-access
    tqdm_utils.display_progress_bar(False)
    print(f"[data] building the {builder.name} cache (once; later runs reuse it)",
          file=sys.stderr, flush=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading ..." though nothing downloads
            builder.download_and_prepare(download_config=dl)
    finally:
        tqdm_utils.display_progress_bar(was_active)
