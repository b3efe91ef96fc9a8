"""grain pipelines: globally deterministic, process-sharded training batches; padded eval batches.

Global order. Training is an infinite stream of *global positions* g = 0, 1, 2, ...; epoch
``e = g // n`` visits ``indices`` in the permutation drawn from (seed, e), so position g reads
record ``indices[perm_e[g % n]]``. Global batch s holds positions [s*B, (s+1)*B); process p
reads only rows [p*B_local, (p+1)*B_local) of it; the augmentation of a row is seeded by
(seed, g). Hence the global batch at step s is the same for any process count, worker count
or restart point, and a resumed iterator continues exactly where it stopped.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import grain
import jax
import numpy as np
from absl import flags

from lclsc_jax.data.augment import augment_record, normalize_images
from lclsc_jax.data.batching import pad_rows
from lclsc_jax.data.builders import Dataset
from lclsc_jax.data.settings import AugmentConfig

_SHUFFLE_SALT = 0x5EED
_AUGMENT_SALT = 0xA06


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Default to jax.process_index()/process_count(); validate the pair."""
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def _check_indices(ds: Dataset, indices) -> np.ndarray:
    """Validate record indices (M,) against the dataset; returns int64 array."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("indices is empty")
    if idx.min() < 0 or idx.max() >= len(ds.labels):
        raise ValueError(f"indices out of range [0, {len(ds.labels)}): min {idx.min()}, max {idx.max()}")
    return idx


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``app.run`` mark defaults as parsed."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GlobalOrder:
    """Global position g -> record index; epoch g // n is a seeded permutation of ``indices``."""

    def __init__(self, indices: np.ndarray, seed: int, shuffle: bool = True):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._cache: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices (n,) in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return self.indices
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            rng = np.random.default_rng([self.seed, _SHUFFLE_SALT, epoch])
            self._cache[epoch] = self.indices[rng.permutation(len(self.indices))]
        return self._cache[epoch]

    def __call__(self, position: int) -> int:
        epoch, j = divmod(int(position), len(self.indices))
        return int(self.epoch_order(epoch)[j])


class _TrainRecord:
    """Local row i of this process -> augmented record dict (a picklable grain map fn)."""

    def __init__(self, source, order, seed, global_batch, local_batch, process_index, augment):
        self.source, self.order, self.seed = source, order, int(seed)
        self.global_batch, self.local_batch = global_batch, local_batch
        self.process_index, self.augment = process_index, augment

    def global_position(self, i: int) -> int:
        """Local row i -> global position (step s, row p*B_local + r)."""
        s, r = divmod(int(i), self.local_batch)
        return s * self.global_batch + self.process_index * self.local_batch + r

    def __call__(self, i: int) -> dict:
        g = self.global_position(i)
        rec = self.order(g)
        ex = self.source[rec]
        rng = np.random.default_rng([self.seed, _AUGMENT_SALT, g])
        x01, mask = augment_record(ex["image"], ex["mask"], rng, self.augment)
        image = (x01 - np.float32(0.5)) * np.float32(4.0)  # == normalize_images on [0,1] input
        return {
            "image": image,
            "label": np.int32(ex["label"]),
            "mask": np.ascontiguousarray(mask, dtype=np.uint8),
            "index": np.int64(rec),
        }


def train_dataset(
    ds: Dataset,
    indices,
    *,
    global_batch_size: int,
    seed: int,
    augment: AugmentConfig = AugmentConfig(),
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """The grain IterDataset behind ``train_iterator`` (infinite local batches)."""
    p, n_proc = _process(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % n_proc:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={n_proc}"
        )
    local = global_batch_size // n_proc
    idx = _check_indices(ds, indices)
    fn = _TrainRecord(ds.source, GlobalOrder(idx, seed), seed, global_batch_size, local, p, augment)
    threads = num_threads if num_threads is not None else max(1, min(4, os.cpu_count() or 1))
    mds = grain.MapDataset.range(sys.maxsize).map(fn).batch(local, drop_remainder=True)
    it_ds = mds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, prefetch_batches))
    )
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def train_iterator(
    ds: Dataset,
    indices,
    *,
    global_batch_size: int,
    seed: int,
    augment: AugmentConfig = AugmentConfig(),
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator over this process's batches.

    Each batch: image float32 (B_local, H, W, C) normalised, label int32 (B_local,), mask uint8
    (B_local, H, W), index int64 (B_local,) record indices; volumes give (B_local, D, H, W, C) and
    (B_local, D, H, W) (augmented by random flips along each axis and the intensity ops). There is no
    second (transformed) view: the LCL-SC train step draws its dihedral transform on the device.
    State: ``it.get_state()`` / ``it.set_state(state)``, or orbax with
    ``grain.checkpoint.CheckpointSave(it)`` / ``grain.checkpoint.CheckpointRestore(it)``.
    """
    return iter(
        train_dataset(
            ds,
            indices,
            global_batch_size=global_batch_size,
            seed=seed,
            augment=augment,
            num_workers=num_workers,
            process_index=process_index,
            process_count=process_count,
        )
    )


def num_eval_batches(num_indices: int, batch_size: int) -> int:
    """Number of (padded) global eval batches for ``num_indices`` records."""
    return -(-int(num_indices) // int(batch_size))


def eval_batches(
    ds: Dataset,
    indices,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """Finite, deterministic, unaugmented batches of this process's rows (``batch_size`` is global).

    Each: image float32 (B_local, H, W, C), label int32, mask uint8 (B_local, H, W), index int64,
    patient str, valid bool (B_local,). The last global batch is padded to ``batch_size`` with
    rows repeating the first record of ``indices`` and ``valid=False``; every process gets the
    same number of batches.
    """
    p, n_proc = _process(process_index, process_count)
    if batch_size <= 0 or batch_size % n_proc:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={n_proc}")
    idx = _check_indices(ds, indices)
    local = batch_size // n_proc
    return _eval_gen(ds, idx, batch_size, local, p)


def _eval_gen(ds: Dataset, idx: np.ndarray, batch_size: int, local: int, p: int) -> Iterator[dict]:
    """Generator behind eval_batches."""
    for b in range(num_eval_batches(len(idx), batch_size)):
        start = b * batch_size + p * local
        rec, valid = pad_rows(idx[start:start + local], local, fill=idx[0])
        exs = ds.source.__getitems__(rec.tolist())
        yield {
            "image": normalize_images(np.stack([e["image"] for e in exs])),
            "label": np.asarray([e["label"] for e in exs], np.int32),
            "mask": np.stack([e["mask"] for e in exs]).astype(np.uint8),
            "index": rec.astype(np.int64),
            "patient": np.asarray([e["patient"] for e in exs], dtype=str),
            "valid": valid,
        }
