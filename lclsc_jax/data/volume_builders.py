"""TFDS builders (array_record, no TensorFlow) for 3D volumes: the synthetic brain benchmark and users' volumes.

Sources:
  * ``"brain3d"``: ``data.brain3d`` with a ``BrainConfig`` (cache key ``synthetic_brain3d-<config name>``);
  * a folder ``ROOT/<class>/<patient>/<file>.nii.gz`` (or ``.nii``, ``.npy``; one record per file;
    ``labelled=False``: ``ROOT/<patient>/<file>``), or a CSV manifest with the 2D columns
    ``path,label,patient[,mask][,split]``; a ``path`` cell ``t1c.nii.gz;flair.nii.gz`` makes one
    multi-channel volume of its files (``data.volumes``). Cache key ``<name>-<content hash>``.

Every record holds ``image`` uint8 ``(S, S, S, C)`` (the volume resampled to ``S^3`` by
``volumes.resample``, normalised per channel to [0, 1] by its 1st/99th percentiles and quantised
as the 2D frames are), ``mask`` uint8 ``(S, S, S)``, ``label``, ``patient``, ``affine`` float64
``(4, 4)`` (of the resampled grid: a map at ``S^3`` written with it lies on the input) and
``source`` (the input file(s)). They open as the same :class:`data.builders.Dataset` as the 2D data,
so splits, cross-validation and the grain pipelines work unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lclsc_jax.data import brain3d
from lclsc_jax.data import io as data_io
from lclsc_jax.data import volumes as vol
from lclsc_jax.data.cache import INDEX_FILE, Dataset, RecordSource, _atomic_build, default_cache_dir, prepare_quietly
from lclsc_jax.data.settings import BrainConfig

VOLUME_FORMAT_VERSION = "1.0.0"
BRAIN_SOURCE = "brain3d"
_CODE_PATH = epath.Path(__file__)
#: Volumes per array_record shard of a built cache (a 64^3 uint8 volume is 256 KiB).
VOLUMES_PER_SHARD = 256


def _quiet_prepare(builder: tfds.core.DatasetBuilder, num_records: int) -> None:
    """Build ``builder`` quietly in ``ceil(num_records / VOLUMES_PER_SHARD)`` shards."""
    prepare_quietly(builder, max(1, -(-int(num_records) // VOLUMES_PER_SHARD)))


def _features(size: int, channels: int, class_names, with_mask: bool) -> tfds.features.FeaturesDict:
    """Feature spec: image uint8 (S, S, S, C), label, patient, affine float64 (4, 4), source, [mask uint8 (S, S, S)]."""
    f: dict[str, Any] = {
        "image": tfds.features.Tensor(shape=(size, size, size, channels), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "patient": tfds.features.Text(),
        "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
        "source": tfds.features.Text(),
    }
    if with_mask:
        f["mask"] = tfds.features.Tensor(shape=(size, size, size), dtype=np.uint8)
    return tfds.features.FeaturesDict(f)


def brain_record(config: BrainConfig, rec: dict) -> dict:
    """A generated brain volume as a cache record (image normalised and quantised like a user's volume)."""
    return {"image": vol.to_uint8(vol.normalize_intensity(rec["image"])), "mask": rec["mask"].astype(np.uint8),
            "label": rec["label"], "patient": rec["patient"], "affine": brain3d.affine(config),
            "source": f"{BRAIN_SOURCE}:{rec['patient']}:v{rec['volume']}"}


@dataclasses.dataclass
class SyntheticBrainConfig(tfds.core.BuilderConfig):
    """BuilderConfig wrapping a BrainConfig; its name encodes every parameter."""

    brain: BrainConfig = dataclasses.field(default_factory=BrainConfig)


class SyntheticBrain3d(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``synthetic_brain3d``: MRI-like volumes with tumour masks (``data.brain3d``)."""

    VERSION = tfds.core.Version(VOLUME_FORMAT_VERSION)
    RELEASE_NOTES = {VOLUME_FORMAT_VERSION: "Initial release."}
    code_path = _CODE_PATH

    def __init__(self, *, brain: BrainConfig | None = None, config=None, **kwargs):
        if not isinstance(config, SyntheticBrainConfig):
            brain = brain or BrainConfig()
            config = SyntheticBrainConfig(name=brain.name(), brain=brain)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config.brain
        return tfds.core.DatasetInfo(builder=self, description="Synthetic MRI-like brain tumour volumes.",
                                     features=_features(c.size, c.channels, c.classes, True),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config.brain
        for key, rec in brain3d.generate(c):
            yield key, brain_record(c, rec)


@dataclasses.dataclass
class UserVolumesConfig(tfds.core.BuilderConfig):
    """BuilderConfig for users' volumes: target size, channels, spacing, classes, records."""

    image_size: int = 64
    channels: int = 1
    spacing: tuple[float, float, float] | None = None
    class_names: tuple[str, ...] = ()
    has_masks: bool = False
    records: tuple[data_io.RecordSpec, ...] = ()


class LclscUserVolumes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``lclsc_user_volumes``: a folder or CSV manifest of NIfTI/.npy volumes converted once."""

    VERSION = tfds.core.Version(VOLUME_FORMAT_VERSION)
    RELEASE_NOTES = {VOLUME_FORMAT_VERSION: "Initial release."}
    code_path = _CODE_PATH

    def __init__(self, *, user_config: UserVolumesConfig | None = None, config=None, **kwargs):
        config = user_config if user_config is not None else config
        if not isinstance(config, UserVolumesConfig):
            raise TypeError(f"LclscUserVolumes needs a UserVolumesConfig, got {config!r}")
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(builder=self, description="Users' volumes converted by lclsc_jax.data.",
                                     features=_features(c.image_size, c.channels, c.class_names, c.has_masks),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        for i, r in enumerate(c.records):
            try:
                image, affine = vol.prepare_volume(r.path, c.image_size, c.channels, c.spacing)
                ex = {"image": image, "label": r.label, "patient": r.patient, "affine": affine, "source": r.path}
                if c.has_masks:
                    ex["mask"] = vol.prepare_mask(r.mask, c.image_size, vol.volume_shape(r.path), c.spacing)
            except data_io.DataError as e:
                if r.where and r.where != r.path:  # CSV: also name the row
                    raise data_io.DataError(f"{r.where}: {e}") from e
                raise
            yield i, ex


class VolumeRecordSource(RecordSource):
    """Random-access view of a built volume dataset: ``src[i]`` -> dict(image, label, patient, mask, affine, source)."""

    def __init__(self, tfds_source, image_size: int, has_masks: bool):
        super().__init__(tfds_source, image_size, has_masks)
        self._zeros = np.zeros((image_size,) * 3, np.uint8)

    def _convert(self, ex: dict) -> dict:
        out = super()._convert(ex)
        s = ex["source"]
        out["affine"] = np.asarray(ex["affine"], np.float64)
        out["source"] = s.decode() if isinstance(s, bytes) else str(s)
        return out

    def __repr__(self) -> str:
        return f"VolumeRecordSource(n={len(self)}, has_masks={self._has_masks})"


def _open(final_dir: Path, make_builder) -> Dataset:
    """Open a built volume cache directory as a Dataset (``source`` yields volumes)."""
    index = json.loads((final_dir / INDEX_FILE).read_text())
    src = make_builder(final_dir).as_data_source(split="train")
    n = len(index["labels"])
    if len(src) != n:
        raise RuntimeError(f"{final_dir}: corrupt cache ({len(src)} records, index says {n}); delete it")
    split = index.get("split")
    return Dataset(
        source=VolumeRecordSource(src, index["image_size"], index["has_masks"]),
        class_names=tuple(index["class_names"]),
        labels=np.asarray(index["labels"], np.int32),
        patients=np.asarray(index["patients"], dtype=str),
        has_masks=bool(index["has_masks"]),
        image_size=int(index["image_size"]),
        channels=int(index["channels"]),
        split_column=None if split is None else np.asarray(split, dtype=str),
        path=str(final_dir),
    )


def load_brain(config: BrainConfig, cache_dir: str | os.PathLike) -> Dataset:
    """Build (once) and open the ``synthetic_brain3d`` dataset of ``config``."""
    final = Path(cache_dir) / f"synthetic_brain3d-{config.name()}"

    def make(data_dir: Path):
        return SyntheticBrain3d(brain=config, data_dir=str(data_dir))

    def build(tmp: Path) -> dict:
        _quiet_prepare(make(tmp), config.num_volumes)
        ids = brain3d.subject_ids(config)
        v = config.volumes_per_subject
        return {"class_names": list(config.classes),
                "labels": [brain3d.subject_label(config, s) for s in range(config.n_subjects) for _ in range(v)],
                "patients": [ids[s] for s in range(config.n_subjects) for _ in range(v)],
                "has_masks": True, "image_size": config.size, "channels": config.channels, "split": None,
                "volumes": True, "source": BRAIN_SOURCE, "config": dataclasses.asdict(config)}

    if not (final / INDEX_FILE).exists():
        _atomic_build(final, build)
    return _open(final, make)


def _content_hash(records, class_names, image_size: int, channels: int, spacing, source: str) -> str:
    """Hash of every file's path, size and mtime, the labels/patients/splits and the conversion settings."""
    h = hashlib.sha256()
    h.update(json.dumps([VOLUME_FORMAT_VERSION, source, list(class_names), image_size, channels,
                         None if spacing is None else list(spacing)]).encode())
    for r in records:
        for p in [*r.path.split(vol.PATH_SEPARATOR), r.mask]:
            if p is None:
                h.update(b"\0none")
                continue
            st = os.stat(p)
            h.update(json.dumps([os.path.abspath(p), st.st_size, st.st_mtime_ns]).encode())
        h.update(json.dumps([r.label, r.patient, r.split]).encode())
    return h.hexdigest()[:16]


def _records(src: Path, labelled: bool, allow_outside_root: bool) -> tuple[tuple[str, ...], list]:
    """Class names and records of a folder or CSV manifest of volumes."""
    if src.is_dir():
        return data_io.scan_folder(src, labelled=labelled, extensions=vol.VOLUME_EXTENSIONS)
    if src.suffix.lower() == ".csv":
        class_names, records = data_io.read_manifest(src, labelled=labelled)
        bad = next((r for r in records if not vol.is_volume_path(r.path)), None)
        if bad is not None:
            raise data_io.DataError(f"{bad.where}: '{bad.path}' is not a volume file "
                                    f"(expected {list(vol.VOLUME_EXTENSIONS)}; several channels as 'a;b')")
        if not allow_outside_root:
            data_io.check_inside_root(src, records)
        return class_names, records
    raise data_io.DataError(f"{src}: not a folder or a .csv manifest (or '{BRAIN_SOURCE}')")


def load_user_volumes(source: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike, *,
                      channels: int | None = None, spacing: float | tuple[float, float, float] | None = None,
                      allow_outside_root: bool = False, labelled: bool = True) -> Dataset:
    """Build (once per content) and open a dataset of volumes from a folder or CSV manifest.

    ``channels``: None takes the first volume's; a volume with another count is a ``DataError``
    naming it. ``spacing`` (mm): resample to that spacing then centre crop/pad to ``image_size``^3;
    None: zoom each volume to ``image_size``^3.
    """
    src = Path(source)
    class_names, records = _records(src, labelled, allow_outside_root)
    if channels is None:
        channels = int(vol.read_volume(records[0].path).array.shape[-1])
    sp = None if spacing is None else tuple(float(v) for v in np.broadcast_to(np.asarray(spacing, float), (3,)))
    has_masks = any(r.mask is not None for r in records)
    if has_masks:
        missing = next((r for r in records if r.mask is None), None)
        if missing is not None:
            raise data_io.DataError(f"{missing.where}: no mask although other rows have masks")
    has_split = any(r.split is not None for r in records)
    key = _content_hash(records, class_names, image_size, channels, sp, str(src.resolve()))
    final = Path(cache_dir) / f"{src.stem or 'volumes'}-vol-{key}"
    ucfg = UserVolumesConfig(name=key, image_size=image_size, channels=channels, spacing=sp,
                             class_names=tuple(class_names), has_masks=has_masks, records=tuple(records))

    def make(data_dir: Path):
        return LclscUserVolumes(user_config=ucfg, data_dir=str(data_dir))

    def build(tmp: Path) -> dict:
        _quiet_prepare(make(tmp), len(records))
        return {"class_names": list(class_names), "labels": [r.label for r in records],
                "patients": [r.patient for r in records], "has_masks": has_masks, "image_size": image_size,
                "channels": channels, "split": [r.split for r in records] if has_split else None,
                "volumes": True, "spacing": None if sp is None else list(sp), "source": str(src.resolve()),
                "files": [r.path for r in records]}

    if not (final / INDEX_FILE).exists():
        _atomic_build(final, build)
    return _open(final, make)


def looks_like_volumes(source: str | os.PathLike) -> bool:
    """Whether ``source`` is ``"brain3d"``, a CSV whose first ``path`` is a volume, or a folder whose first
    volume-or-image file is a volume."""
    if str(source) == BRAIN_SOURCE:
        return True
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8-sig") as fh:
            row = next(csv.DictReader(fh), None)
        return bool(row) and vol.is_volume_path((row.get("path") or "").strip() or "x")
    if src.is_dir():  # the first volume or image file met (other files are skipped) decides
        for _, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(f.lower() for f in files if not f.startswith(".")):
                if f.endswith(vol.VOLUME_EXTENSIONS):
                    return True
                if f.endswith(data_io.IMAGE_EXTENSIONS):
                    return False
    return False


def load_volumes(source: str = BRAIN_SOURCE, *, image_size: int | None = None, channels: int | None = None,
                 cache_dir: str | os.PathLike | None = None, brain: BrainConfig | None = None,
                 spacing: float | tuple[float, float, float] | None = None, allow_outside_root: bool = False,
                 labelled: bool = True) -> Dataset:
    """Build once (cached array_record TFDS dataset) and open a volume ``source`` as a Dataset.

    ``source``: ``"brain3d"`` (``brain`` config, default ``BrainConfig(size=image_size or 32)``), a
    folder ``ROOT/<class>/<patient>/<file>.nii.gz`` or a CSV manifest (``image_size`` default 64).
    Records: image uint8 (S, S, S, C), mask uint8 (S, S, S), label, patient, affine (4, 4), source.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    if source == BRAIN_SOURCE:
        cfg = brain or BrainConfig(size=image_size or 32, channels=channels or 1)
        if image_size is not None and image_size != cfg.size:
            raise ValueError(f"image_size={image_size} contradicts brain.size={cfg.size}")
        if channels is not None and channels != cfg.channels:
            raise ValueError(f"channels={channels} contradicts brain.channels={cfg.channels}")
        return load_brain(cfg, cache_dir)
    if brain is not None:
        raise ValueError(f"`brain` config given but source is not '{BRAIN_SOURCE}'")
    return load_user_volumes(source, image_size or 64, cache_dir, channels=channels, spacing=spacing,
                             allow_outside_root=allow_outside_root, labelled=labelled)
