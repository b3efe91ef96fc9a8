"""Frames without labels (``labelled=False``): folder ROOT/<patient>/<frame>, CSV without `label`: one class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from lclsc_jax import data
from lclsc_jax.data.io import DataError

S = 16  # converted size

#: Real images (scikit-image's), cut to small sizes: (name, array); the last one is RGB.
IMAGES = [
    ("camera", skdata.camera()[100:164, 200:248]),
    ("coins", skdata.coins()[:40, :56]),
    ("moon", skdata.moon()[300:348, 100:148]),
    ("text", skdata.text()[:48, :64]),
    ("page", skdata.page()[50:98, 100:148]),
    ("chelsea", skdata.chelsea()[60:108, 150:198]),
]
PATIENTS = ["p1", "p1", "p2", "p3", "p4", "p5"]  # of the frames above


def _reference(a: np.ndarray) -> np.ndarray:
    """Independent conversion to ``(S, S, 1)`` uint8: [0, 1], luminance of RGB, Pillow bilinear on floats, rint."""
    x = a.astype(np.float64) / 255.0
    if x.ndim == 3:
        x = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    r = np.asarray(Image.fromarray(x.astype(np.float32), "F").resize((S, S), Image.BILINEAR))
    return np.clip(np.rint(r * 255), 0, 255).astype(np.uint8)[..., None]


def _write_frames(root: Path) -> list[tuple[str, str, np.ndarray]]:
    """``root/<patient>/<name>.png`` for every image; returns ``(relative path, patient, array)`` in path order."""
    out = []
    for (name, a), patient in zip(IMAGES, PATIENTS):
        (root / patient).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / patient / f"{name}.png")
        out.append((f"{patient}/{name}.png", patient, a))
    return sorted(out, key=lambda t: t[0])


def _check(ds: data.Dataset, frames: list[tuple[str, str, np.ndarray]]) -> None:
    """One class ``unlabelled``, the patients of ``frames`` in order, the pixels of the reference conversion."""
    assert ds.class_names == ("unlabelled",) and ds.num_classes == 1
    assert ds.labels.tolist() == [0] * len(frames)
    assert ds.patients.tolist() == [p for _, p, _ in frames]
    for i, (_, _, a) in enumerate(frames):
        ex = ds.source[i]
        assert ex["image"].shape == (S, S, 1) and ex["label"] == 0
        np.testing.assert_allclose(ex["image"].astype(int), _reference(a).astype(int), atol=1)


@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    return root, _write_frames(root)


def test_unlabelled_folder_is_one_class_with_patients_and_pixels(frames_root, tmp_path):
    root, frames = frames_root
    ds = data.load(str(root), image_size=S, channels=1, cache_dir=tmp_path, labelled=False)
    _check(ds, frames)
    splits = data.splits_for(ds, val_fraction=0.2, test_fraction=0.2, seed=0)  # patient-wise, as for labelled data
    parts = [set(ds.patients[splits[k]]) for k in ("train", "val", "test")]
    assert sorted(np.concatenate([splits[k] for k in ("train", "val", "test")]).tolist()) == list(range(len(ds)))
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    again = data.load(str(root), image_size=S, channels=1, cache_dir=tmp_path, labelled=False)
    assert again.path == ds.path  # cached once per content


def test_the_layout_is_never_guessed(frames_root, tmp_path):
    root, _ = frames_root
    with pytest.raises(DataError, match="class 'p1' has no images"):  # labelled (default): p1 read as a class
        data.load(str(root), image_size=S, cache_dir=tmp_path)
    labelled_root = tmp_path / "labelled"
    _write_frames(labelled_root / "glioma")  # ROOT/<class>/<patient>/<frame> read as unlabelled: no frames
    with pytest.raises(DataError, match=r"no images \(expected ROOT/<patient>/<frame>"):
        data.load(str(labelled_root), image_size=S, cache_dir=tmp_path, labelled=False)


def test_unlabelled_manifest_without_a_label_column(frames_root, tmp_path):
    root, frames = frames_root
    csv = root / "frames.csv"
    csv.write_text("path,patient,frame\n" + "".join(f"{p},{pat},{i}\n" for i, (p, pat, _) in enumerate(frames)))
    ds = data.load(str(csv), image_size=S, cache_dir=tmp_path, labelled=False)
    _check(ds, frames)
    assert ds.frame.tolist() == list(range(len(frames)))
    with pytest.raises(DataError, match=r"frames\.csv line 1: missing column\(s\) \['label'\].*data\.labelled=false"):
        data.load(str(csv), image_size=S, cache_dir=tmp_path)  # labelled by default: the label is required


def test_a_label_column_is_ignored_when_unlabelled(frames_root, tmp_path):
    root, frames = frames_root
    csv = root / "labelled.csv"
    csv.write_text("path,label,patient\n" + "".join(f"{p},{'ab'[i % 2]},{pat}\n"
                                                    for i, (p, pat, _) in enumerate(frames)))
    ds = data.load(str(csv), image_size=S, cache_dir=tmp_path, labelled=False)
    _check(ds, frames)  # p1's two rows have two labels: no error, the labels are not read
    with pytest.raises(DataError, match="patient 'p1' has label"):
        data.load(str(csv), image_size=S, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("path,patient\np1/camera.png,p1\nnope.png,p2\n", r"bad\.csv line 3: image path 'nope\.png' does not exist"),
        ("path,patient\np1/camera.png,\n", r"bad\.csv line 2: empty 'patient'"),
        ("path\np1/camera.png\n", r"bad\.csv line 1: missing column\(s\) \['patient'\]"),
        ("path,patient,frame\np1/camera.png,p1,-3\n", r"bad\.csv line 2: frame '-3'"),
    ],
)
def test_a_bad_row_of_an_unlabelled_manifest_names_the_file_and_line(frames_root, tmp_path, text, pattern):
    root, _ = frames_root
    csv = root / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=pattern):
        data.load(str(csv), image_size=S, cache_dir=tmp_path, labelled=False)
