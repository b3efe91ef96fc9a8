"""Reading users' images, masks, folders and CSV manifests into validated record lists.

Conversion (shared by dataset preparation and ``lclsc predict``):
  * bit depth: integer images are scaled by their dtype's maximum (8-bit: /255,
    16-bit: /65535), float images are assumed to be in [0, 1]; then rounded to uint8.
  * channels: RGB -> gray by ITU-R 601 luminance (0.299 R + 0.587 G + 0.114 B) when
    ``channels == 1``; gray -> RGB by repetition when ``channels == 3``; alpha dropped.
  * size: resized to (image_size, image_size) with Pillow, bilinear for images,
    nearest for masks (aspect ratio is not preserved: pCLE frames are square).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".npy")  # data.volumes; a manifest cell `a;b` of these = one file per channel
MANIFEST_COLUMNS = ("path", "label", "patient")
OPTIONAL_COLUMNS = ("mask", "split", "sequence", "frame", "diagnostic")
SPLIT_NAMES = ("train", "val", "test")
MIN_IMAGE_SIZE = 4  # pixels per side; smaller files are icons or export mistakes, not frames
_TRUE, _FALSE = ("1", "true", "yes", "y"), ("0", "false", "no", "n")


class DataError(ValueError):
    """Bad input data; the message names the file (and CSV row) at fault."""


class DataWarning(UserWarning):
    """Input data that was read, but not all of it or not as a user might expect."""


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """One image to convert: its file, class index, patient, optional mask and split."""

    path: str
    label: int
    patient: str
    mask: str | None = None
    split: str | None = None
    where: str = ""  # human-readable origin ("manifest.csv line 7") for error messages
    sequence: str | None = None  # probe pass / video the frame belongs to (within its patient)
    frame: int | None = None  # index of the frame in its sequence
    diagnostic: bool | None = None  # False: a non-diagnostic frame (out of contact, saturated, smeared)


def _read_raw(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an array (H, W) or (H, W, C) in its native dtype."""
    p = str(path)
    if not os.path.exists(p):
        raise DataError(f"{p}: file does not exist")
    try:
        if p.lower().endswith((".tif", ".tiff")):
            arr = np.asarray(tifffile.imread(p))
        else:
            with Image.open(p) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # PIL/tifffile raise many types for broken files
        raise DataError(f"{p}: unreadable or truncated image ({type(e).__name__}: {e})") from e
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar TIFF (C, H, W)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
        raise DataError(f"{p}: unsupported image shape {arr.shape} (expected (H, W) or (H, W, C<=4))")
    if arr.size == 0:
        raise DataError(f"{p}: empty image")
    return arr


def _to_unit_float(arr: np.ndarray, path: str) -> np.ndarray:
    """Scale by the dtype's maximum to float32 in [0, 1] (H, W[, C])."""
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0)
    raise DataError(f"{path}: unsupported pixel type {arr.dtype}")


def _to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """(H, W[, C]) float -> (H, W, channels): luminance for gray, repetition for RGB."""
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] in (2, 4):  # drop alpha
        x = x[..., :-1]
    if channels == 1:
        if x.shape[-1] == 3:
            x = x @ np.array([0.299, 0.587, 0.114], np.float32)
            x = x[..., None]
        return x
    if channels == 3:
        return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def _resize(x: np.ndarray, size: int, resample: int) -> np.ndarray:
    """Resize a float (H, W) plane to (size, size) with Pillow."""
    if x.shape == (size, size):
        return x
    return np.asarray(Image.fromarray(x, mode="F").resize((size, size), resample=resample))


def _check_min_size(arr: np.ndarray, path: str) -> np.ndarray:
    """``arr`` itself, or a ``DataError`` when a side is below :data:`MIN_IMAGE_SIZE` pixels."""
    h, w = arr.shape[:2]
    if min(h, w) < MIN_IMAGE_SIZE:
        raise DataError(f"{path}: image is {w}x{h} px, below the minimum of {MIN_IMAGE_SIZE} px per side "
                        "(a thumbnail or an export mistake? remove it from the data)")
    return arr


def load_image_file(path: str | os.PathLike, image_size: int, channels: int = 1) -> np.ndarray:
    """Read and convert one image file to uint8 (image_size, image_size, channels)."""
    p = str(path)
    x = _to_channels(_to_unit_float(_check_min_size(_read_raw(p), p), p), channels)
    planes = [_resize(x[..., c], image_size, Image.Resampling.BILINEAR) for c in range(x.shape[-1])]
    y = np.stack(planes, axis=-1)
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def load_mask_file(
    path: str | os.PathLike, image_size: int, expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a binary mask (nonzero = evidence) to uint8 {0, 1} (image_size, image_size)."""
    p = str(path)
    raw = _read_raw(p)
    if expected_hw is not None and raw.shape[:2] != tuple(expected_hw):
        raise DataError(
            f"{p}: mask shape {raw.shape[:2]} differs from its image's shape {tuple(expected_hw)}"
        )
    m = (raw.max(axis=-1) if raw.ndim == 3 else raw) > 0
    img = Image.fromarray(m.astype(np.uint8) * 255).resize(
        (image_size, image_size), resample=Image.Resampling.NEAREST
    )
    return (np.asarray(img) > 127).astype(np.uint8)


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """Height and width of an image file without converting it."""
    return tuple(_read_raw(path).shape[:2])  # type: ignore[return-value]


def _visible(folder: Path, hidden: list[Path]) -> list[Path]:
    """The sorted entries of ``folder`` whose names do not start with a dot; the others go to ``hidden``."""
    entries = sorted(folder.iterdir())
    hidden.extend(e for e in entries if e.name.startswith("."))
    return [e for e in entries if not e.name.startswith(".")]


def _warn_hidden(root: Path, hidden: list[Path]) -> None:
    """A ``DataWarning`` listing the hidden files and folders (``._x.png``, ``.DS_Store``) that were skipped."""
    if hidden:
        shown = ", ".join(str(h.relative_to(root)) for h in hidden[:5]) + (" ..." if len(hidden) > 5 else "")
        warnings.warn(f"{root}: skipped {len(hidden)} hidden file(s)/folder(s) (names starting with '.', "
                      f"e.g. macOS '._*' and '.DS_Store'): {shown}", DataWarning, stacklevel=3)


def _check_patient_once(patient_dirs: dict[str, Path], pdir: Path) -> None:
    """Raise ``DataError`` when patient ``pdir.name`` already has a folder under another class."""
    first = patient_dirs.setdefault(pdir.name, pdir)
    if first != pdir:
        raise DataError(f"patient '{pdir.name}' has folders under two classes: {first} and {pdir}; a patient "
                        "id must be unique across classes (rename one folder if they are different patients)")


#: The one class of data without labels (``labelled=False``): pretraining reads it, nothing else needs a label.
UNLABELLED = "unlabelled"


def _scan_patients(root: Path, hidden: list[Path], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[RecordSpec]:
    """``ROOT/<patient>/<frame>`` files as records of the one class :data:`UNLABELLED`."""
    records = [RecordSpec(str(f), 0, pdir.name, where=str(f))
               for pdir in (d for d in _visible(root, hidden) if d.is_dir())
               for f in _visible(pdir, hidden) if f.is_file() and f.name.lower().endswith(extensions)]
    if not records:
        raise DataError(f"{root}: no images (expected ROOT/<patient>/<frame>{{{','.join(extensions)}}} "
                        "for unlabelled frames)")
    return records


def scan_folder(root: str | os.PathLike, labelled: bool = True,
                extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[tuple[str, ...], list[RecordSpec]]:
    """List ROOT/<class>/<patient>/<frame>.<ext> files; returns (class_names, records).

    Hidden entries (names starting with '.') are skipped with a ``DataWarning``; a patient
    folder name found under two classes is a ``DataError`` naming both folders. With
    ``labelled=False`` the folder is ``ROOT/<patient>/<frame>.<ext>`` (no class level) and every
    frame is of the one class :data:`UNLABELLED` (never guessed from the layout: the caller says so).
    ``extensions``: the file name endings read (volumes: ``data.volumes.VOLUME_EXTENSIONS``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    hidden: list[Path] = []
    if not labelled:
        records = _scan_patients(root, hidden, extensions)
        _warn_hidden(root, hidden)
        return (UNLABELLED,), records
    class_dirs = [d for d in _visible(root, hidden) if d.is_dir()]
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected ROOT/<class>/<patient>/<frame>.png)")
    class_names = tuple(d.name for d in class_dirs)
    records: list[RecordSpec] = []
    patient_dirs: dict[str, Path] = {}
    for label, cdir in enumerate(class_dirs):
        n_before = len(records)
        for pdir in (d for d in _visible(cdir, hidden) if d.is_dir()):
            _check_patient_once(patient_dirs, pdir)
            for f in _visible(pdir, hidden):
                if f.is_file() and f.name.lower().endswith(extensions):
                    records.append(RecordSpec(str(f), label, pdir.name, where=str(f)))
        if len(records) == n_before:
            raise DataError(
                f"{cdir}: class '{cdir.name}' has no images "
                f"(expected {cdir}/<patient>/<frame>{{{','.join(extensions)}}})"
            )
    _warn_hidden(root, hidden)
    return class_names, records


def _frame_index(value: str | None, where: str) -> int | None:
    """A manifest's ``frame`` cell: a non-negative integer, or None when empty."""
    if not value:
        return None
    try:
        f = int(value)
    except ValueError:
        f = -1
    if f < 0:
        raise DataError(f"{where}: frame '{value}' must be a non-negative integer")
    return f


def _flag(value: str | None, where: str) -> bool | None:
    """A manifest's ``diagnostic`` cell: True/False, or None when empty."""
    if not value:
        return None
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise DataError(f"{where}: diagnostic '{value}' must be one of 1/0/true/false/yes/no")


def _check_one_label(first_row: dict[str, tuple[str, str]], patient: str, label: str, where: str) -> None:
    """Raise ``DataError`` when manifest row ``where`` gives ``patient`` another label than its first row."""
    first_where, first_label = first_row.setdefault(patient, (where, label))
    if first_label != label:
        raise DataError(f"{where}: patient '{patient}' has label '{label}' here but '{first_label}' at {first_where}; "
                        "a patient is one subject with one diagnosis, so all its rows need one label "
                        "(give them different patient ids if they are different patients)")


def source_path(value: str) -> str:
    """A data source as a run's config saves it: ``synthetic``, ``brain3d`` and URLs as given, a local path absolute.

    An absolute path keeps the run usable (evaluate, resume, cv, an ablation's child runs) from
    any working directory. (A local folder named ``brain3d`` is ``./brain3d``.)
    """
    if value in ("synthetic", "brain3d") or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def read_manifest(
    csv_path: str | os.PathLike, class_names: tuple[str, ...] | None = None, labelled: bool = True
) -> tuple[tuple[str, ...], list[RecordSpec]]:
    """Parse a CSV manifest (path,label,patient[,mask][,split][,sequence][,frame][,diagnostic]); returns (class_names, records).

    Paths are relative to the CSV's folder. Without ``class_names`` the classes are the
    sorted distinct labels; with them, any other label is an error naming its row.
    ``frame`` is a non-negative integer, ``diagnostic`` one of 1/0/true/false/yes/no.
    A patient is one subject with one diagnosis: a patient id given two labels is a
    ``DataError`` naming both rows (as a folder source refuses a patient under two classes).
    With ``labelled=False`` the ``label`` column is not needed (any given is ignored): every row is
    of the one class :data:`UNLABELLED`.
    """
    csv_path = Path(csv_path)
    required = MANIFEST_COLUMNS if labelled else tuple(c for c in MANIFEST_COLUMNS if c != "label")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: manifest does not exist")
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            hint = " (frames without labels: --unlabelled / data.labelled=false)" if missing == ["label"] else ""
            raise DataError(
                f"{csv_path} line 1: missing column(s) {missing}; header is {header} "
                f"(required: {list(required)}, optional: {list(OPTIONAL_COLUMNS)}){hint}"
            )
        reader.fieldnames = header
        rows = []
        for row in reader:
            line = reader.line_num
            cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
            rows.append((line, cells if labelled else {**cells, "label": UNLABELLED}))
    if not rows:
        raise DataError(f"{csv_path}: manifest has no rows")
    labels_seen = sorted({r["label"] for _, r in rows})
    if class_names is None:
        class_names = tuple(labels_seen)
    index = {c: i for i, c in enumerate(class_names)}
    records = []
    first_row: dict[str, tuple[str, str]] = {}  # patient -> (where, label) of its first row
    for line, r in rows:
        where = f"{csv_path} line {line}"
        for col in MANIFEST_COLUMNS:
            if not r.get(col):
                raise DataError(f"{where}: empty '{col}'")
        if r["label"] not in index:
            raise DataError(f"{where}: unknown label '{r['label']}' (known: {list(class_names)})")
        _check_one_label(first_row, r["patient"], r["label"], where)
        rels = [r["path"]]
        if ";" in r["path"] and not (base / r["path"]).is_file():
            rels = [p.strip() for p in r["path"].split(";")]
            if not all(p.lower().endswith(VOLUME_EXTENSIONS) for p in rels):
                raise DataError(f"{where}: image path '{r['path']}' does not exist; several files in one cell "
                                f"('a;b', the channels of one volume) must all be volumes {list(VOLUME_EXTENSIONS)}")
        for rel in rels:
            if not (base / rel).is_file():
                raise DataError(f"{where}: image path '{rel}' does not exist ({base / rel})")
        path = ";".join(str(base / rel) for rel in rels)
        mask = None
        if r.get("mask"):
            mpath = base / r["mask"]
            if not mpath.is_file():
                raise DataError(f"{where}: mask path '{r['mask']}' does not exist ({mpath})")
            mask = str(mpath)
        split = None
        if "split" in header:
            split = r.get("split", "")
            if split not in SPLIT_NAMES:
                raise DataError(f"{where}: split '{split}' must be one of {list(SPLIT_NAMES)}")
        records.append(
            RecordSpec(str(path), index[r["label"]], r["patient"], mask, split, where,
                       sequence=r.get("sequence") or None, frame=_frame_index(r.get("frame"), where),
                       diagnostic=_flag(r.get("diagnostic"), where))
        )
    counts = np.bincount([r.label for r in records], minlength=len(class_names))
    empty = [c for c, n in zip(class_names, counts) if n == 0]
    if empty:
        raise DataError(f"{csv_path}: class(es) {empty} have no images")
    return class_names, records


def _inside(path: str, base: Path) -> bool:
    """Whether ``path`` (made absolute and normalised, links not followed) lies in folder ``base``."""
    b = os.path.normpath(os.path.abspath(base))
    return os.path.commonpath([b, os.path.normpath(os.path.abspath(path))]) == b


def check_inside_root(csv_path: str | os.PathLike, records: list[RecordSpec]) -> None:
    """Raise ``DataError`` at the first record whose image or mask leaves the manifest's folder (``../``, absolute)."""
    base = Path(csv_path).parent
    for r in records:
        paths = r.path.split(";") if ";" in r.path and not os.path.isfile(r.path) else [r.path]
        bad = next((p for p in (*paths, r.mask) if p is not None and not _inside(p, base)), None)
        if bad is not None:
            raise DataError(f"{r.where}: '{bad}' is outside the manifest's folder {os.path.abspath(base)}; "
                            "paths in a manifest are read relative to its folder. To read files elsewhere "
                            "on purpose, set data.allow_outside_root=true (--set data.allow_outside_root=true)")
