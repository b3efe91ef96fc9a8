"""3D volumes: NIfTI/.npy reading and writing vs nibabel, resampling vs scipy and closed forms (world coordinates
kept), per-channel normalisation vs NumPy, error messages naming files and rows, volume caches from a folder and a
CSV manifest, the volume augmentation."""

from __future__ import annotations

import csv
import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lclsc_jax.data import augment, builders, volumes
from lclsc_jax.data.io import DataError
from lclsc_jax.data.settings import AugmentConfig


def _rotation(a: float, b: float) -> np.ndarray:
    """A rotation (3, 3): about z by ``a`` then about x by ``b``."""
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def _affine(spacing, rot=(0.3, -0.2), origin=(-40.0, 12.5, 7.0)) -> np.ndarray:
    """Affine (4, 4) = [R diag(spacing) | origin]."""
    a = np.eye(4)
    a[:3, :3] = _rotation(*rot) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """World coordinates (..., 3) of voxel indices (..., 3)."""
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _index_grid(shape) -> np.ndarray:
    """Voxel indices (D, H, W, 3)."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)


# ------------------------------------------------------------------ read / write


def test_nifti_round_trip_matches_nibabel(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(9, 7, 5)).astype(np.float32)
    aff = _affine((1.2, 0.8, 2.5))
    p = volumes.write_nifti(tmp_path / "a.nii.gz", arr, aff)
    img = nib.load(p)  # the independent reader
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    v = volumes.read_volume(p)
    assert v.array.shape == (9, 7, 5, 1) and v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array[..., 0], arr)
    np.testing.assert_allclose(v.affine, aff, atol=1e-5)
    np.testing.assert_allclose(v.spacing, [1.2, 0.8, 2.5], atol=1e-5)


def test_4d_nifti_is_channels_last_and_nibabel_written_file_reads(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 1000, size=(6, 5, 4, 3)).astype(np.int16)
    aff = _affine((2.0, 2.0, 3.0))
    nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / "m.nii"))  # written by nibabel, not by us
    v = volumes.read_volume(tmp_path / "m.nii")
    assert v.array.shape == (6, 5, 4, 3)
    np.testing.assert_array_equal(v.array, arr.astype(np.float32))
    np.testing.assert_allclose(v.spacing, [2, 2, 3], atol=1e-6)


def test_npy_has_identity_geometry_and_channels_from_several_files(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.random((6, 6, 5)).astype(np.float32), rng.random((6, 6, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    volumes.write_nifti(tmp_path / "b.nii.gz", b, np.eye(4))
    v = volumes.read_volume(tmp_path / "a.npy")
    np.testing.assert_array_equal(v.affine, np.eye(4))
    np.testing.assert_array_equal(v.spacing, np.ones(3))
    two = volumes.read_volume(f"{tmp_path / 'a.npy'};{tmp_path / 'b.nii.gz'}")
    np.testing.assert_array_equal(two.array, np.stack([a, b], -1))


def test_bad_files_are_errors_naming_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file does not exist"):
        volumes.read_volume(tmp_path / "missing.nii.gz")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match=r"flat.npy: volume has shape \(8, 8\)"):
        volumes.read_volume(tmp_path / "flat.npy")
    with gzip.open(tmp_path / "broken.nii.gz", "wb") as f:
        f.write(b"not a nifti header at all")
    with pytest.raises(DataError, match="broken.nii.gz: unreadable"):
        volumes.read_volume(tmp_path / "broken.nii.gz")
    np.save(tmp_path / "a.npy", np.zeros((6, 6, 6), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((6, 6, 5), np.float32))
    with pytest.raises(DataError, match="b.npy: shape"):
        volumes.read_volume(f"{tmp_path / 'a.npy'};{tmp_path / 'b.npy'}")


# ------------------------------------------------------------------- resampling


def test_zoom_matches_scipy_and_keeps_world_coordinates():
    shape, out = (10, 12, 8), (15, 6, 8)
    aff = _affine((1.5, 1.0, 2.0))
    g, h = np.array([0.3, -0.7, 0.45]), 2.0
    x = (_world(aff, _index_grid(shape)) @ g + h).astype(np.float32)  # a linear ramp in world coordinates
    y, new_aff = volumes.resample(x, aff, out)
    assert y.shape == out
    ref = ndimage.zoom(x, np.array(out) / np.array(shape), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(y, ref, atol=1e-4)
    # the ramp evaluated at the new voxels' world coordinates (closed form), where no clamping happens
    idx = _index_grid(out)
    old_idx = (_world(new_aff, idx) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    inside = np.all((old_idx >= 0) & (old_idx <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(y[inside], (_world(new_aff, idx) @ g + h)[inside], atol=1e-4)
    # the whole volume covers the same world box: corners of the voxel grids (half a voxel out) agree
    for corner in ([-0.5] * 3, [s - 0.5 for s in shape]):
        o = (np.array(corner) + 0.5) * np.array(out) / np.array(shape) - 0.5
        np.testing.assert_allclose(_world(new_aff, o), _world(aff, np.array(corner)), atol=1e-9)


def test_spacing_then_crop_or_pad_keeps_world_coordinates():
    shape = (10, 14, 6)
    aff = _affine((2.0, 1.0, 3.0))
    g, h = np.array([0.2, 0.5, -0.3]), -1.0
    x = (_world(aff, _index_grid(shape)) @ g + h).astype(np.float32)
    y, new_aff = volumes.resample(x, aff, (16, 12, 16), spacing=1.5)
    assert y.shape == (16, 12, 16)
    np.testing.assert_allclose(np.linalg.norm(new_aff[:3, :3], axis=0), [1.5, 1.5, 1.5], atol=1e-9)
    # the direction cosines are unchanged
    np.testing.assert_allclose(new_aff[:3, :3] / 1.5, aff[:3, :3] / np.array([2.0, 1.0, 3.0]), atol=1e-9)
    idx = _index_grid(y.shape)
    old_idx = (_world(new_aff, idx) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    inside = np.all((old_idx >= 0) & (old_idx <= np.array(shape) - 1), axis=-1)
    assert inside.sum() > 100
    np.testing.assert_allclose(y[inside], (_world(new_aff, idx) @ g + h)[inside], atol=1e-4)
    # voxels of the new grid outside the old field of view (padding) are zero
    outside = np.all((old_idx < -1) | (old_idx > np.array(shape)), axis=-1)
    assert outside.any() and np.all(y[outside] == 0)
    # the centres of the two grids coincide (centred crop/pad, up to half a new voxel from the even/odd rounding)
    c_old = _world(aff, (np.array(shape) - 1) / 2)
    c_new = _world(new_aff, (np.array(y.shape) - 1) / 2)
    assert np.linalg.norm(c_old - c_new) <= 0.5 * 1.5 * np.sqrt(3) + 1e-9


def test_mask_resampling_is_nearest_and_a_voxel_lands_where_it_was():
    shape = (12, 12, 12)
    aff = _affine((1.0, 1.0, 1.0))
    m = np.zeros(shape, np.float32)
    m[4:8, 2:6, 6:10] = 1.0  # a 4-voxel cube; at half resolution it is a 2-voxel cube
    y, new_aff = volumes.resample(m, aff, (6, 6, 6), order=0)
    assert set(np.unique(y)) <= {0.0, 1.0}
    idx = np.argwhere(y > 0)
    assert len(idx) == 8
    old = (_world(new_aff, idx.astype(float)) - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    assert np.all(m[tuple(np.rint(old).astype(int).T)] == 1)


def test_crop_or_pad_against_slicing():
    x = np.arange(5 * 8 * 3, dtype=np.float32).reshape(5, 8, 3)
    y, start = volumes.crop_or_pad(x, (7, 4, 3))
    np.testing.assert_array_equal(start, [-1, 2, 0])
    ref = np.zeros((7, 4, 3), np.float32)
    ref[1:6] = x[:, 2:6]
    np.testing.assert_array_equal(y, ref)


def test_normalize_intensity_per_channel_percentiles():
    rng = np.random.default_rng(3)
    x = np.stack([rng.gamma(2.0, 3.0, (8, 9, 10)), 100 + 5 * rng.normal(size=(8, 9, 10))], -1).astype(np.float32)
    y = volumes.normalize_intensity(x)
    for c in range(2):
        lo, hi = np.percentile(x[..., c].ravel(), [1, 99])
        np.testing.assert_allclose(y[..., c], np.clip((x[..., c] - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert np.all(volumes.normalize_intensity(np.full((4, 4, 4), 7.0)) == 0)


# --------------------------------------------------------------- user volume data


def _write_folder(root, shape=(20, 18, 14)) -> dict:
    """ROOT/<class>/<patient>/scan.nii.gz for 2 classes x 2 patients; returns {patient: (class, array, affine)}."""
    rng = np.random.default_rng(4)
    truth = {}
    for k, (cls, pid) in enumerate([("glioma", "pa"), ("glioma", "pb"), ("meningioma", "pc"), ("meningioma", "pd")]):
        arr = rng.gamma(2.0, 50.0, shape).astype(np.float32)
        aff = _affine((1.0 + 0.1 * k, 1.2, 2.0), origin=(k, 0, 0))
        volumes.write_nifti(os.path.join(root, cls, pid, "scan.nii.gz"), arr, aff)
        truth[pid] = (cls, arr, aff)
    return truth


def _expected(arr: np.ndarray, aff: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference of the conversion: scipy zoom (grid mode), percentile scaling, uint8; its affine."""
    shape = np.array(arr.shape)
    z = ndimage.zoom(arr, size / shape, order=1, grid_mode=True, mode="nearest")
    lo, hi = np.percentile(z, [1, 99])
    u8 = np.rint(np.clip((z - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    r = shape / size
    t = np.eye(4)
    t[:3, :3] = np.diag(r)
    t[:3, 3] = (r - 1) / 2
    return u8, aff @ t


def test_folder_of_nifti_volumes_loads_with_labels_patients_and_affines(tmp_path):
    truth = _write_folder(tmp_path / "data")
    ds = builders.load(str(tmp_path / "data"), image_size=8, cache_dir=tmp_path / "cache")  # detected as volumes
    assert ds.class_names == ("glioma", "meningioma")
    assert ds.channels == 1 and ds.image_size == 8 and not ds.has_masks
    assert list(ds.patients) == ["pa", "pb", "pc", "pd"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1])
    for i, pid in enumerate(ds.patients):
        rec = ds.source[i]
        cls, arr, aff = truth[pid]
        assert rec["image"].shape == (8, 8, 8, 1) and rec["mask"].shape == (8, 8, 8)
        u8, new_aff = _expected(arr, aff, 8)
        assert np.abs(rec["image"][..., 0].astype(int) - u8.astype(int)).max() <= 1
        np.testing.assert_allclose(rec["affine"], new_aff, atol=1e-4)
        assert rec["source"].endswith(os.path.join(cls, pid, "scan.nii.gz"))
    again = builders.load(str(tmp_path / "data"), image_size=8, cache_dir=tmp_path / "cache")
    assert again.path == ds.path  # cached
    spaced = builders.load(str(tmp_path / "data"), image_size=8, cache_dir=tmp_path / "cache", spacing=3.0)
    assert spaced.path != ds.path
    for i, pid in enumerate(spaced.patients):
        _, arr, aff = truth[pid]
        new_aff = spaced.source[i]["affine"]
        np.testing.assert_allclose(np.linalg.norm(new_aff[:3, :3], axis=0), [3.0] * 3, atol=1e-6)
        centre_old = _world(aff, (np.array(arr.shape) - 1) / 2)  # the grids' centres within half a new voxel
        assert np.linalg.norm(_world(new_aff, np.full(3, 3.5)) - centre_old) <= 1.5 * np.sqrt(3) + 1e-6


def _manifest(path, rows, header=("path", "label", "patient", "mask")) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_manifest_with_masks_and_two_channel_rows(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    masks = {}
    for k in range(4):
        t1, fl = rng.random((10, 10, 10)).astype(np.float32), rng.random((10, 10, 10)).astype(np.float32)
        m = np.zeros((10, 10, 10), np.uint8)
        m[2 + k:6 + k, 3:7, 1:9] = 1
        masks[k] = m
        for name, a in (("t1", t1), ("flair", fl), ("mask", m)):
            volumes.write_nifti(tmp_path / f"s{k}" / f"{name}.nii.gz", a, np.eye(4))
        rows.append([f"s{k}/t1.nii.gz;s{k}/flair.nii.gz", "ring" if k % 2 else "diffuse", f"s{k}", f"s{k}/mask.nii.gz"])
    csv_path = _manifest(tmp_path / "manifest.csv", rows)
    ds = builders.load(csv_path, image_size=10, cache_dir=tmp_path / "cache")
    assert ds.channels == 2 and ds.has_masks and ds.class_names == ("diffuse", "ring")
    np.testing.assert_array_equal(ds.labels, [0, 1, 0, 1])
    for k in range(4):
        rec = ds.source[k]
        assert rec["image"].shape == (10, 10, 10, 2)
        np.testing.assert_array_equal(rec["mask"], masks[k])  # same grid: the mask is unchanged


def test_manifest_errors_name_the_row_and_the_file(tmp_path):
    volumes.write_nifti(tmp_path / "a.nii.gz", np.ones((6, 6, 6), np.float32), np.eye(4))
    np.save(tmp_path / "flat.npy", np.zeros((6, 6), np.float32))
    bad = _manifest(tmp_path / "m1.csv", [["a.nii.gz", "x", "p1", ""], ["gone.nii.gz", "y", "p2", ""]])
    with pytest.raises(DataError, match=r"m1.csv line 3: image path 'gone.nii.gz' does not exist"):
        builders.load(bad, image_size=8, cache_dir=tmp_path / "cache")
    mixed = _manifest(tmp_path / "m2.csv", [["a.nii.gz", "x", "p1", ""], ["a.png", "y", "p2", ""]])
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"m2.csv line 3: .*a.png' is not a volume file"):
        builders.load(mixed, image_size=8, cache_dir=tmp_path / "cache", volumes=True)
    flat = _manifest(tmp_path / "m3.csv", [["a.nii.gz", "x", "p1", ""], ["flat.npy", "y", "p2", ""]])
    with pytest.raises(DataError, match=r"m3.csv line 3: .*flat.npy: volume has shape \(6, 6\)"):
        builders.load(flat, image_size=8, cache_dir=tmp_path / "cache")
    assert not any("m3" in p.name for p in (tmp_path / "cache").iterdir())  # nothing half-built kept


def test_volume_data_through_the_training_and_eval_pipelines(tmp_path):
    from lclsc_jax.data import pipeline

    _write_folder(tmp_path / "data", shape=(9, 9, 9))
    ds = builders.load(str(tmp_path / "data"), image_size=8, cache_dir=tmp_path / "cache")
    it = pipeline.train_iterator(ds, np.arange(4), global_batch_size=2, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["image"].shape == (2, 8, 8, 8, 1) and b["mask"].shape == (2, 8, 8, 8)
    assert b["image"].dtype == np.float32 and -2.0 - 1e-6 <= b["image"].min() and b["image"].max() <= 2.0 + 1e-6
    e = next(pipeline.eval_batches(ds, np.arange(4), 4, process_index=0, process_count=1))
    assert e["image"].shape == (4, 8, 8, 8, 1)
    np.testing.assert_allclose(e["image"][0], ds.source[0]["image"] / 255.0 * 4.0 - 2.0, atol=1e-5)


# ----------------------------------------------------------------- augmentation


def test_volume_augmentation_is_a_flip_of_image_and_mask_alike():
    rng0 = np.random.default_rng(6)
    mask = (rng0.random((4, 6, 8)) > 0.5).astype(np.uint8)
    image = (mask * 200 + 20).astype(np.uint8)[..., None]
    flips = [tuple(a for a in range(3) if (f >> a) & 1) for f in range(8)]
    cfg = AugmentConfig(intensity=False)
    seen = set()
    for seed in range(24):
        x, m = augment.augment_record(image, mask, np.random.default_rng(seed), cfg)
        assert x.shape == (4, 6, 8, 1) and m.shape == (4, 6, 8)  # no quarter turn of a non-cubic volume
        match = [f for f in flips if np.array_equal(m, np.flip(mask, f) if f else mask)]
        assert match, "the mask is not a flip of the input"
        np.testing.assert_allclose(x[..., 0], (np.flip(image[..., 0], match[0]) if match[0] else image[..., 0]) / 255.0)
        seen.add(match[0])
    assert len(seen) >= 6  # every axis is flipped at random
    x, _ = augment.augment_record(image, mask, np.random.default_rng(0), AugmentConfig(flips=False, intensity=True))
    d = x[..., 0] - image[..., 0] / 255.0  # contrast about the mean + brightness: an affine map of intensities
    coef = np.polyfit(image[..., 0].ravel() / 255.0, x[..., 0].ravel(), 1)
    np.testing.assert_allclose(x[..., 0], np.polyval(coef, image[..., 0] / 255.0), atol=1e-5)
    assert np.abs(d).max() > 0


def test_volume_sources_are_told_from_image_sources(tmp_path):
    from lclsc_jax.data.volume_builders import looks_like_volumes

    (tmp_path / "vol" / "a" / "p1").mkdir(parents=True)
    (tmp_path / "vol" / "notes.txt").write_text("not data")
    np.save(tmp_path / "vol" / "a" / "p1" / "x.npy", np.zeros((4, 4, 4), np.float32))
    (tmp_path / "img" / "a" / "p1").mkdir(parents=True)
    (tmp_path / "img" / "a" / "p1" / "x.png").write_bytes(b"")
    _manifest(tmp_path / "v.csv", [["a/p1/x.nii.gz;a/p1/y.nii.gz", "a", "p1", ""]])
    _manifest(tmp_path / "i.csv", [["a/p1/x.png", "a", "p1", ""]])
    assert looks_like_volumes("brain3d") and looks_like_volumes(tmp_path / "vol") and looks_like_volumes(
        tmp_path / "v.csv")
    assert not any(looks_like_volumes(p) for p in ("synthetic", tmp_path / "img", tmp_path / "i.csv"))


def test_a_semicolon_cell_of_images_is_an_error_naming_the_row(tmp_path):
    from lclsc_jax.data.io import read_manifest

    for name in ("a.png", "b.png", "odd;name.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"m.csv line 2: image path 'a.png;b.png' does not exist; several files"):
        read_manifest(_manifest(tmp_path / "m.csv", [["a.png;b.png", "x", "p1", ""]]))
    _, recs = read_manifest(_manifest(tmp_path / "ok.csv", [["odd;name.png", "x", "p1", ""]]))  # a real file name
    assert recs[0].path == str(tmp_path / "odd;name.png")
