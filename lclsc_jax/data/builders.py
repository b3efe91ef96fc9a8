"""TFDS builders (array_record, no TensorFlow) and the cached ``load`` entry point.

Cache layout: ``CACHE/<key>/`` holds one built TFDS dataset plus ``lclsc_index.json``
(class names, per-record labels/patients/splits). ``key`` is ``synthetic_pcle-<config name>``
for the synthetic data and ``<source name>-<content hash>`` for users' data, the hash
covering file paths, sizes, mtimes and the conversion settings. Builds go to a temporary
sibling directory that is renamed into place only when complete, so a failed preparation
leaves nothing behind.

The records are written in ``ceil(N / RECORDS_PER_SHARD)`` array_record shards (TFDS alone
writes one shard per 64 MiB-1 GiB, i.e. one file for any dataset of this size); record ``i`` is
the same whatever the count. The cache is always on local disk: in a multi-host run each host
builds and reads its own. A bucket source (``gs://``, ``s3://``: a folder or a CSV manifest) is
first copied to ``CACHE/mirror/`` (``storage.local_mirror``, fetched again only when an object
changes) and converted from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lclsc_jax.data import io as data_io
from lclsc_jax.data import storage
from lclsc_jax.data.cache import INDEX_FILE, Dataset, RecordSource, _atomic_build, default_cache_dir, prepare_quietly
from lclsc_jax.data.settings import SyntheticConfig
from lclsc_jax.data.synthetic import generate, pass_metadata, patient_ids, patient_label

_CODE_PATH = epath.Path(__file__)
USER_FORMAT_VERSION = "1.1.0"

#: Records per array_record shard of a built cache (at least one shard).
RECORDS_PER_SHARD = 1000


def num_shards(num_records: int) -> int:
    """The number of array_record shards of a cache of ``num_records`` records (``ceil(N / RECORDS_PER_SHARD)``)."""
    return max(1, -(-int(num_records) // RECORDS_PER_SHARD))


class _DropCustomConfigWarning(logging.Filter):
    """Our configs are built from parameters by design; TFDS warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_DropCustomConfigWarning())


def _features(image_size: int, channels: int, class_names, with_mask: bool,
              with_sequence: bool = False) -> tfds.features.FeaturesDict:
    """Feature spec: image Tensor uint8 (H, W, C), ClassLabel, patient Text, [mask (H, W)], [sequence, frame, diagnostic]."""
    f: dict[str, Any] = {
        "image": tfds.features.Tensor(shape=(image_size, image_size, channels), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "patient": tfds.features.Text(),
    }
    if with_mask:
        f["mask"] = tfds.features.Tensor(shape=(image_size, image_size), dtype=np.uint8)
    if with_sequence:
        f["sequence"] = tfds.features.Scalar(dtype=np.int32)
        f["frame"] = tfds.features.Scalar(dtype=np.int32)
        f["diagnostic"] = tfds.features.Scalar(dtype=np.bool_)
    return tfds.features.FeaturesDict(f)


@dataclasses.dataclass
class SyntheticPcleConfig(tfds.core.BuilderConfig):
    """BuilderConfig wrapping a SyntheticConfig; its name encodes every parameter."""

    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)


class SyntheticPcle(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``synthetic_pcle``: simulated pCLE frames with evidence masks, sequences and non-diagnostic flags."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "2.0.0": "pCLE simulator: fibre bundle, sequences, non-diagnostic frames, matched statistics."}
    # TFDS's lookup of the code path needs `importlib_resources` for editable installs.
    code_path = _CODE_PATH

    def __init__(self, *, synthetic: SyntheticConfig | None = None, config=None, **kwargs):
        # TFDS re-creates builders (e.g. when a data source is unpickled in a grain worker)
        # by passing the original `config` object back: accept it.
        if not isinstance(config, SyntheticPcleConfig):
            synthetic = synthetic or SyntheticConfig()
            config = SyntheticPcleConfig(name=synthetic.name(), synthetic=synthetic)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config.synthetic
        return tfds.core.DatasetInfo(
            builder=self,
            description="Simulated pCLE frames; class evidence is the arrangement of cells inside the masked lesion.",
            features=_features(cfg.image_size, 1, cfg.classes, True, with_sequence=True),
            disable_shuffling=True,  # record i is (patient i // n, frame i % n)
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield from generate(self.builder_config.synthetic)


def _metadata(records: list[dict], key: str, dtype: Any) -> list | None:
    """The per-record ``key`` values for the index, or None when no record has one."""
    vals = [r.get(key) for r in records]
    return None if all(v is None for v in vals) else [None if v is None else dtype(v) for v in vals]


@dataclasses.dataclass
class UserImagesConfig(tfds.core.BuilderConfig):
    """BuilderConfig for users' images: converted size/channels, classes, records."""

    image_size: int = 128
    channels: int = 1
    class_names: tuple[str, ...] = ()
    has_masks: bool = False
    records: tuple[data_io.RecordSpec, ...] = ()


class LclscUserImages(tfds.core.GeneratorBasedBuilder):
    """TFDS builder ``lclsc_user_images``: a folder or CSV manifest converted once."""

    VERSION = tfds.core.Version(USER_FORMAT_VERSION)
    RELEASE_NOTES = {USER_FORMAT_VERSION: "Initial release."}
    code_path = _CODE_PATH

    def __init__(self, *, user_config: UserImagesConfig | None = None, config=None, **kwargs):
        config = user_config if user_config is not None else config
        if not isinstance(config, UserImagesConfig):
            raise TypeError(f"LclscUserImages needs a UserImagesConfig, got {config!r}")
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="Users' pCLE frames converted by lclsc_jax.data.",
            features=_features(c.image_size, c.channels, c.class_names, c.has_masks),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config
        for i, r in enumerate(c.records):
            try:
                ex = {
                    "image": data_io.load_image_file(r.path, c.image_size, c.channels),
                    "label": r.label,
                    "patient": r.patient,
                }
                if c.has_masks:
                    ex["mask"] = data_io.load_mask_file(r.mask, c.image_size, data_io.image_hw(r.path))
            except data_io.DataError as e:
                if r.where and r.where != r.path:  # CSV: also name the row
                    raise data_io.DataError(f"{r.where}: {e}") from e
                raise
            yield i, ex


def _open(final_dir: Path, make_builder: Callable[[Path], tfds.core.DatasetBuilder]) -> Dataset:
    """Open a built cache directory as a Dataset."""
    index = json.loads((final_dir / INDEX_FILE).read_text())
    builder = make_builder(final_dir)
    src = builder.as_data_source(split="train")
    n = len(index["labels"])
    if len(src) != n:
        raise RuntimeError(f"{final_dir}: corrupt cache ({len(src)} records, index says {n}); delete it")
    split = index.get("split")
    seq, frame, diag = index.get("sequence"), index.get("frame"), index.get("diagnostic")
    return Dataset(
        source=RecordSource(src, index["image_size"], index["has_masks"]),
        class_names=tuple(index["class_names"]),
        labels=np.asarray(index["labels"], np.int32),
        patients=np.asarray(index["patients"], dtype=str),
        has_masks=bool(index["has_masks"]),
        image_size=int(index["image_size"]),
        channels=int(index["channels"]),
        split_column=None if split is None else np.asarray(split, dtype=str),
        path=str(final_dir),
        sequence=None if seq is None else np.asarray(["" if v is None else str(v) for v in seq], dtype=str),
        frame=None if frame is None else np.asarray([-1 if v is None else v for v in frame], np.int32),
        diagnostic=None if diag is None else np.asarray([True if v is None else v for v in diag], bool),
    )


def _quiet_prepare(builder: tfds.core.DatasetBuilder, num_records: int) -> None:
    """download_and_prepare in :func:`num_shards` shards, quietly (``cache.prepare_quietly``)."""
    prepare_quietly(builder, num_shards(num_records))


def load_synthetic(config: SyntheticConfig, cache_dir: str | os.PathLike) -> Dataset:
    """Build (once) and open the ``synthetic_pcle`` dataset for ``config``."""
    final = Path(cache_dir) / f"synthetic_pcle-{config.name()}"

    def make(data_dir: Path):
        return SyntheticPcle(synthetic=config, data_dir=str(data_dir))

    def build(tmp: Path) -> dict:
        _quiet_prepare(make(tmp), config.num_patients * config.images_per_patient)
        pids = patient_ids(config)
        n = config.images_per_patient
        meta = [(r["sequence"], r["frame"], r["diagnostic"]) for p in range(config.num_patients)
                for r in pass_metadata(config, p)]
        return {
            "class_names": list(config.classes),
            "labels": [patient_label(config, p) for p in range(config.num_patients) for _ in range(n)],
            "patients": [pids[p] for p in range(config.num_patients) for _ in range(n)],
            "has_masks": True,
            "image_size": config.image_size,
            "channels": 1,
            "split": None,
            "sequence": [f"{pids[i // n]}-s{m[0]}" for i, m in enumerate(meta)],
            "frame": [m[1] for m in meta],
            "diagnostic": [m[2] for m in meta],
            "source": "synthetic",
            "config": dataclasses.asdict(config),
        }

    if not (final / INDEX_FILE).exists():
        _atomic_build(final, build)
    return _open(final, make)


def _content_hash(records, class_names, image_size: int, channels: int, source: str) -> str:
    """Hash of paths, sizes, mtimes, labels, patients, masks, splits and conversion settings."""
    h = hashlib.sha256()
    h.update(json.dumps([USER_FORMAT_VERSION, source, list(class_names), image_size, channels]).encode())
    for r in records:
        for p in (r.path, r.mask):
            if p is None:
                h.update(b"\0none")
                continue
            st = os.stat(p)
            h.update(json.dumps([os.path.abspath(p), st.st_size, st.st_mtime_ns]).encode())
        h.update(json.dumps([r.label, r.patient, r.split, r.sequence, r.frame, r.diagnostic]).encode())
    return h.hexdigest()[:16]


def load_user(
    source: str | os.PathLike, image_size: int, channels: int, cache_dir: str | os.PathLike,
    allow_outside_root: bool = False, labelled: bool = True,
) -> Dataset:
    """Build (once per content) and open a dataset from a folder or CSV manifest.

    A manifest naming files outside its folder is refused unless ``allow_outside_root``.
    ``labelled=False``: a folder ``ROOT/<patient>/<frame>`` or a manifest without labels, one
    class ``unlabelled`` (``data.io.scan_folder``, ``data.io.read_manifest``).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    src = Path(source)
    if src.is_dir():
        class_names, records = data_io.scan_folder(src, labelled=labelled)
    elif src.suffix.lower() == ".csv":
        class_names, records = data_io.read_manifest(src, labelled=labelled)
        if not allow_outside_root:
            data_io.check_inside_root(src, records)
    else:
        raise data_io.DataError(f"{src}: not a folder or a .csv manifest (or 'synthetic')")
    has_masks = any(r.mask is not None for r in records)
    if has_masks:
        missing = next((r for r in records if r.mask is None), None)
        if missing is not None:
            raise data_io.DataError(f"{missing.where}: no mask although other rows have masks")
    has_split = any(r.split is not None for r in records)
    key = _content_hash(records, class_names, image_size, channels, str(src.resolve()))
    final = Path(cache_dir) / f"{src.stem or 'data'}-{key}"
    ucfg = UserImagesConfig(
        name=key,
        image_size=image_size,
        channels=channels,
        class_names=tuple(class_names),
        has_masks=has_masks,
        records=tuple(records),
    )

    def make(data_dir: Path):
        return LclscUserImages(user_config=ucfg, data_dir=str(data_dir))

    def build(tmp: Path) -> dict:
        _quiet_prepare(make(tmp), len(records))
        return {
            "class_names": list(class_names),
            "labels": [r.label for r in records],
            "patients": [r.patient for r in records],
            "has_masks": has_masks,
            "image_size": image_size,
            "channels": channels,
            "split": [r.split for r in records] if has_split else None,
            "sequence": _metadata([dataclasses.asdict(r) for r in records], "sequence", str),
            "frame": _metadata([dataclasses.asdict(r) for r in records], "frame", int),
            "diagnostic": _metadata([dataclasses.asdict(r) for r in records], "diagnostic", bool),
            "source": str(src.resolve()),
            "files": [r.path for r in records],
        }

    if not (final / INDEX_FILE).exists():
        _atomic_build(final, build)
    return _open(final, make)


def load(
    source: str = "synthetic",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    synthetic: SyntheticConfig | None = None,
    allow_outside_root: bool = False,
    labelled: bool = True,
    volumes: bool | None = None,
    brain: Any = None,
    spacing: float | tuple[float, float, float] | None = None,
) -> Dataset:
    """Build once (cached array_record TFDS dataset) and open ``source`` as a Dataset.

    ``source``: ``"synthetic"``, a folder ``ROOT/<class>/<patient>/<frame>.<ext>`` or a CSV
    manifest. ``image_size`` defaults to 128 (or to ``synthetic.image_size``); giving both
    with different values is an error. Synthetic images are grayscale (channels=1 only).
    A CSV manifest's files must lie in its folder unless ``allow_outside_root`` (``../``, absolute paths).
    ``labelled=False`` reads a folder or manifest without labels as one class ``unlabelled``
    (the synthetic data keeps its labels: pretraining hides them by itself).
    A ``gs://`` or ``s3://`` folder or manifest is mirrored to ``CACHE/mirror/`` first; a bucket
    manifest's paths are relative to its bucket folder, and errors name the URLs.
    ``channels`` None: 1 for images, the data's own count for volumes.
    Volumes (``data.volume_builders.load_volumes``): ``source="brain3d"`` (``brain``: a
    ``BrainConfig``), or ``volumes=True`` / None (detected: a CSV or folder of ``.nii[.gz]``/``.npy``
    files); ``spacing`` (mm) resamples them to that voxel spacing before the crop/pad to ``image_size``.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    if volumes is None:
        from lclsc_jax.data.volume_builders import looks_like_volumes

        volumes = brain is not None or (not storage.is_url(source) and looks_like_volumes(source))
    if volumes:
        from lclsc_jax.data.volume_builders import load_volumes

        return load_volumes(source, image_size=image_size, channels=channels, cache_dir=cache_dir, brain=brain,
                            spacing=spacing, allow_outside_root=allow_outside_root, labelled=labelled)
    if spacing is not None:
        raise ValueError("`spacing` applies to volumes only")
    channels = 1 if channels is None else channels
    if source == "synthetic":
        if channels != 1:
            raise ValueError("the synthetic dataset is grayscale: use channels=1")
        cfg = synthetic or SyntheticConfig(image_size=image_size or 128)
        if image_size is not None and image_size != cfg.image_size:
            raise ValueError(
                f"image_size={image_size} contradicts synthetic.image_size={cfg.image_size}"
            )
        return load_synthetic(cfg, cache_dir)
    if synthetic is not None:
        raise ValueError("`synthetic` config given but source is not 'synthetic'")
    if storage.is_url(source):
        return _load_url(source, image_size, channels, cache_dir, labelled)
    return load_user(source, image_size or 128, channels, cache_dir, allow_outside_root, labelled)


def _load_url(url: str, image_size: int | None, channels: int, cache_dir: Path, labelled: bool) -> Dataset:
    """:func:`load_user` on the local mirror of a bucket folder or manifest; errors name the URLs, not the mirror."""
    local = storage.local_mirror(url, str(cache_dir))
    manifest = str(url).lower().endswith(".csv")
    local_root = os.path.dirname(local) if manifest else local
    url_root = storage.parent(str(url).rstrip("/")) if manifest else str(url).rstrip("/")
    try:
        return load_user(local, image_size or 128, channels, cache_dir, False, labelled)
    except data_io.DataError as e:
        raise data_io.DataError(str(e).replace(local_root, url_root)) from None
