"""Users' data: folder and CSV inputs (8-bit PNG, 16-bit TIFF, RGB JPEG), errors, caching."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lclsc_jax import data
from lclsc_jax.data import io as data_io

S = 16  # converted size


def _gray8(rng, h=24, w=20):
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def _write_folder(root: Path, rng) -> dict[str, np.ndarray]:
    """ROOT/<class>/<patient>/<frame>: 8-bit PNG, 16-bit TIFF and RGB JPEG; returns raw arrays."""
    raw = {}
    specs = [
        ("benign", "p1", "a.png", "png8"),
        ("benign", "p1", "b.tif", "tif16"),
        ("benign", "p2", "c.jpg", "jpg_rgb"),
        ("malign", "p3", "d.png", "png8"),
        ("malign", "p4", "e.tiff", "tif16"),
        ("malign", "p4", "f.jpeg", "jpg_rgb"),
    ]
    for cls, pat, name, kind in specs:
        d = root / cls / pat
        d.mkdir(parents=True, exist_ok=True)
        f = d / name
        if kind == "png8":
            a = _gray8(rng)
            Image.fromarray(a).save(f)
        elif kind == "tif16":
            a = rng.integers(0, 65536, (24, 20), dtype=np.uint16)
            tifffile.imwrite(f, a)
        else:
            a = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(a).save(f, quality=95)
            with Image.open(f) as im:  # JPEG is lossy: the reference is what decodes
                a = np.asarray(im)
        raw[str(f)] = a
    return raw


def _reference(a: np.ndarray, channels: int) -> np.ndarray:
    """Independent conversion: scale by dtype max, luminance/repeat, Pillow bilinear per plane."""
    x = a.astype(np.float64) / np.iinfo(a.dtype).max
    if x.ndim == 2:
        x = x[..., None]
    if channels == 1 and x.shape[-1] == 3:
        x = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    if channels == 3 and x.shape[-1] == 1:
        x = np.concatenate([x] * 3, axis=-1)
    planes = [
        np.asarray(Image.fromarray(x[..., c].astype(np.float32), "F").resize((S, S), Image.BILINEAR))
        for c in range(x.shape[-1])
    ]
    return np.clip(np.rint(np.stack(planes, -1) * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    raw = _write_folder(root, np.random.default_rng(0))
    return root, raw


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_conversion_matches_reference(folder, tmp_path, channels):
    root, raw = folder
    ds = data.load(str(root), image_size=S, channels=channels, cache_dir=tmp_path)
    assert ds.class_names == ("benign", "malign")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.patients.tolist() == ["p1", "p1", "p2", "p3", "p4", "p4"]
    assert not ds.has_masks and ds.split_column is None
    for i, (path, a) in enumerate(sorted(raw.items())):
        ex = ds.source[i]
        assert ex["image"].shape == (S, S, channels) and ex["image"].dtype == np.uint8
        np.testing.assert_allclose(ex["image"].astype(int), _reference(a, channels).astype(int), atol=1)
        assert (ex["mask"] == 0).all() and ex["mask"].shape == (S, S)
        # `lclsc predict` uses the very same conversion
        np.testing.assert_array_equal(data.load_image_file(path, S, channels), ex["image"])


def test_16bit_scaled_by_dtype_max(tmp_path):
    f = tmp_path / "x.tif"
    tifffile.imwrite(f, np.full((8, 8), 65535 // 5, np.uint16))
    out = data.load_image_file(f, 8, 1)
    assert (out == round(255 * (65535 // 5) / 65535)).all()


def _write_manifest(tmp: Path, rng, with_masks=True, split=True) -> tuple[Path, list]:
    imgs = tmp / "imgs"
    imgs.mkdir()
    rows, refs = [], []
    for i in range(6):
        a = _gray8(rng, 20, 20)
        Image.fromarray(a).save(imgs / f"{i}.png")
        m = np.zeros((20, 20), np.uint8)
        m[2 + i : 9 + i, 3:12] = 255
        Image.fromarray(m).save(imgs / f"{i}_m.png")
        label = ["b", "a", "c"][i % 3]
        patient = f"pt{i}"  # one label per patient (read_manifest refuses a patient with two)
        sp = ["train", "train", "val", "val", "test", "test"][i]
        row = [f"imgs/{i}.png", label, patient]
        row += [f"imgs/{i}_m.png"] if with_masks else []
        row += [sp] if split else []
        rows.append(",".join(row))
        refs.append((a, m, label, patient, sp))
    header = "path,label,patient" + (",mask" if with_masks else "") + (",split" if split else "")
    csv = tmp / "manifest.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv, refs


def test_csv_manifest_with_masks_and_split(tmp_path):
    csv, refs = _write_manifest(tmp_path, np.random.default_rng(1))
    ds = data.load(str(csv), image_size=S, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("a", "b", "c") and ds.has_masks
    assert ds.split_column.tolist() == [r[4] for r in refs]
    for i, (a, m, label, patient, _) in enumerate(refs):
        ex = ds.source[i]
        assert ds.class_names[ex["label"]] == label and ex["patient"] == patient
        np.testing.assert_allclose(ex["image"].astype(int), _reference(a, 1).astype(int), atol=1)
        ref_m = (np.asarray(Image.fromarray(m).resize((S, S), Image.NEAREST)) > 0).astype(np.uint8)
        np.testing.assert_array_equal(ex["mask"], ref_m)
    splits = data.splits_for(ds)
    assert {k: v.tolist() for k, v in splits.items()} == {"train": [0, 1], "val": [2, 3], "test": [4, 5]}


def test_cache_is_reused_without_rereading(tmp_path, monkeypatch):
    csv, _ = _write_manifest(tmp_path, np.random.default_rng(2), with_masks=False, split=False)
    cache = tmp_path / "cache"
    first = data.load(str(csv), image_size=S, cache_dir=cache)

    def boom(*a, **k):
        raise AssertionError("image re-read although cached")

    monkeypatch.setattr(data_io, "load_image_file", boom)
    second = data.load(str(csv), image_size=S, cache_dir=cache)
    assert second.path == first.path
    np.testing.assert_array_equal(second.source[3]["image"], first.source[3]["image"])
    monkeypatch.undo()
    # Other conversion settings -> another cache entry.
    third = data.load(str(csv), image_size=S + 2, cache_dir=cache)
    assert third.path != first.path and third.source[0]["image"].shape == (S + 2, S + 2, 1)
    # Touching a file changes the content hash.
    f = tmp_path / "imgs" / "0.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert data.load(str(csv), image_size=S, cache_dir=cache).path != first.path


def _entries(cache: Path) -> list[str]:
    return sorted(os.listdir(cache)) if cache.exists() else []


def test_truncated_image_names_file_and_leaves_no_cache(folder, tmp_path):
    root, _ = folder
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    victim = bad_root / "malign" / "p4" / "f.jpeg"
    victim.write_bytes(victim.read_bytes()[:200])  # truncated halfway through preparation
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match=r"f\.jpeg: unreadable or truncated"):
        data.load(str(bad_root), image_size=S, cache_dir=cache)
    assert _entries(cache) == []


def test_unreadable_file_in_manifest(tmp_path):
    csv, _ = _write_manifest(tmp_path, np.random.default_rng(3), with_masks=False, split=False)
    (tmp_path / "imgs" / "2.png").write_bytes(b"not an image at all")
    with pytest.raises(data.DataError, match=r"manifest\.csv line 4: .*2\.png: unreadable or truncated"):
        data.load(str(csv), image_size=S, cache_dir=tmp_path / "cache")
    assert _entries(tmp_path / "cache") == []


def _csv(tmp_path: Path, text: str) -> Path:
    (tmp_path / "x.png").parent.mkdir(exist_ok=True, parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "m_bad.png")
    f = tmp_path / "m.csv"
    f.write_text(text)
    return f


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("path,label\nx.png,a\n", r"m\.csv line 1: missing column\(s\) \['patient'\]"),
        ("path,label,patient\nx.png,a,p1\nnope.png,a,p2\n", r"m\.csv line 3: image path 'nope\.png' does not exist"),
        ("path,label,patient,mask\nx.png,a,p1,m_bad.png\n", r"m\.csv line 2: .*m_bad\.png: mask shape \(5, 4\) differs .* \(4, 4\)"),
        ("path,label,patient,mask\nx.png,a,p1,gone.png\n", r"m\.csv line 2: mask path 'gone\.png' does not exist"),
        ("path,label,patient\nx.png,a,\n", r"m\.csv line 2: empty 'patient'"),
        ("path,label,patient,split\nx.png,a,p1,training\n", r"m\.csv line 2: split 'training'"),
    ],
)
def test_manifest_errors_name_the_row(tmp_path, text, pattern):
    csv = _csv(tmp_path, text)
    with pytest.raises(data.DataError, match=pattern):
        data.load(str(csv), image_size=S, cache_dir=tmp_path / "cache")
    assert _entries(tmp_path / "cache") == []


def test_unknown_label_against_declared_classes(tmp_path):
    csv = _csv(tmp_path, "path,label,patient\nx.png,a,p1\nx.png,zebra,p2\n")
    with pytest.raises(data.DataError, match=r"m\.csv line 3: unknown label 'zebra'"):
        data.read_manifest(csv, class_names=("a", "b"))


def test_declared_class_without_images(tmp_path):
    csv = _csv(tmp_path, "path,label,patient\nx.png,a,p1\n")
    with pytest.raises(data.DataError, match=r"class\(es\) \['b'\] have no images"):
        data.read_manifest(csv, class_names=("a", "b"))


def test_folder_class_without_images(folder, tmp_path):
    root, _ = folder
    r = tmp_path / "r"
    shutil.copytree(root, r)
    (r / "empty_class" / "p9").mkdir(parents=True)
    (r / "empty_class" / "p9" / "notes.txt").write_text("no images here")
    with pytest.raises(data.DataError, match=r"empty_class: class 'empty_class' has no images"):
        data.load(str(r), image_size=S, cache_dir=tmp_path / "cache")


def test_missing_source(tmp_path):
    with pytest.raises(data.DataError, match=r"nowhere\.csv: manifest does not exist"):
        data.load(str(tmp_path / "nowhere.csv"), cache_dir=tmp_path / "cache")
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_image_file(tmp_path / "nothing.png", 8)
