"""The synthetic 3D brain benchmark: reproducible, balanced, lesions inside the brain, classes that global statistics
cannot tell apart but a structure statistic can; its cache; its NIfTI export read back through the user-data path."""

from __future__ import annotations

import csv
import dataclasses

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from lclsc_jax.data import brain3d, builders, export, volume_builders
from lclsc_jax.data.settings import BrainConfig
from lclsc_jax.protocols import audit

SMALL = BrainConfig(n_subjects=6, size=16, channels=2, seed=3)


@pytest.fixture(scope="module")
def small():
    return brain3d.generate_arrays(SMALL)


AUDIT = BrainConfig(n_subjects=120, size=32)  # 40 subjects per class: chance-level noise of a CV score ~0.05


@pytest.fixture(scope="module")
def cohort():
    """The audit's sample: 120 subjects of 32^3."""
    return brain3d.generate_arrays(AUDIT)


def _rim_minus_core(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean intensity of the outer half of the lesion (by distance to its edge) minus that of the inner half."""
    edt = ndimage.distance_transform_edt(mask)
    rim = mask & (edt <= np.median(edt[mask]))
    return float(image[rim].mean() - image[mask & ~rim].mean())


def test_seeded_and_reproducible(small):
    again = brain3d.generate_arrays(SMALL)
    for k in ("image", "mask", "label", "patient"):
        np.testing.assert_array_equal(small[k], again[k])
    other = brain3d.generate_arrays(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(small["image"], other["image"])
    assert small["image"].shape == (6, 16, 16, 16, 2) and small["image"].dtype == np.float32
    assert small["mask"].shape == (6, 16, 16, 16)


def test_classes_are_balanced_and_subjects_unique():
    a = brain3d.generate_arrays(BrainConfig(n_subjects=9, size=16, classes=("ring", "solid", "diffuse")))
    np.testing.assert_array_equal(np.bincount(a["label"]), [3, 3, 3])
    assert len(set(a["patient"])) == 9
    cfg = BrainConfig(n_subjects=4, size=16, volumes_per_subject=2, classes=("ring", "diffuse"))
    two = brain3d.generate_arrays(cfg)
    assert list(two["patient"]) == ["S000", "S000", "S001", "S001", "S002", "S002", "S003", "S003"]
    np.testing.assert_array_equal(two["mask"][0], two["mask"][1])  # one lesion per subject, two acquisitions
    assert not np.array_equal(two["image"][0], two["image"][1])


def test_lesions_lie_inside_the_head_away_from_its_surface():
    cfg = BrainConfig(n_subjects=12, size=32, noise=0.0, bias_strength=0.0, offset=(0.0, 0.0))
    a = brain3d.generate_arrays(cfg)
    for img, m in zip(a["image"][..., 0], a["mask"].astype(bool)):
        assert m.sum() > 20
        head = img > 0  # noise-free: the background is exactly 0
        # every voxel within 2 voxels of the lesion is inside the head (not background, not the volume's border)
        near = ndimage.binary_dilation(m, iterations=2)
        assert head[near].all()
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any()
                    or m[:, :, -1].any())
        # the skull shell (outermost 10 % of the head) does not touch the lesion
        outer = head & ~ndimage.binary_erosion(head, iterations=max(2, int(0.1 * cfg.size / 2)))
        assert not (outer & m).any()


def test_flair_oedema_halo_is_bright(small):
    for img, m, oed, brain in zip(small["image"], small["mask"], small["oedema"], small["brain"]):
        flair = img[..., 1]
        rest = brain.astype(bool) & ~m.astype(bool) & ~oed.astype(bool)
        assert oed.any() and flair[oed.astype(bool)].mean() > flair[rest].mean() + 0.2
        assert not (oed.astype(bool) & m.astype(bool)).any()


def test_global_statistics_do_not_give_the_class_away_but_structure_does(cohort):
    x, m, y = cohort["image"][..., 0], cohort["mask"].astype(bool), cohort["label"]
    n = len(y)
    flat = x.reshape(n, -1)
    edges = np.linspace(0.0, np.percentile(flat, 99.9), 17)
    hist = np.stack([np.histogram(v, edges)[0] for v in flat]) / flat.shape[1]
    feats = np.column_stack([flat.mean(1), flat.std(1), np.percentile(flat, [1, 5, 25, 50, 75, 95, 99], axis=1).T,
                             hist, (flat > np.percentile(flat, 98)).sum(1), m.reshape(n, -1).sum(1)])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)  # one volume per subject: patient-wise
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    ba_global = balanced_accuracy_score(y, cross_val_predict(clf, feats, y, cv=cv))
    print("balanced accuracy: global statistics", ba_global)
    assert ba_global <= 0.45, ba_global
    # the lesion volume alone and the mean lesion intensity alone are at chance too
    for f in (m.reshape(n, -1).sum(1), np.array([img[mm].mean() for img, mm in zip(x, m)])):
        ba = balanced_accuracy_score(y, cross_val_predict(DecisionTreeClassifier(max_depth=2), f[:, None], y, cv=cv))
        print("balanced accuracy: one statistic", ba)
        assert ba <= 0.5, ba
    # the rim-minus-core contrast inside the mask: ring > 0 > solid, diffuse in between
    rc = np.array([_rim_minus_core(img, mm) for img, mm in zip(x, m)])
    ba_struct = balanced_accuracy_score(y, cross_val_predict(DecisionTreeClassifier(max_depth=2), rc[:, None], y,
                                                             cv=cv))
    print("balanced accuracy: rim minus core", ba_struct)
    assert ba_struct >= 0.9, ba_struct
    assert rc[y == 0].min() > 0 > rc[y == 1].max()


def test_volume_statistics_against_numpy_references():
    rng = np.random.default_rng(0)
    v = rng.random((3, 8, 10, 6)).astype(np.float64)
    f, names = audit.volume_statistics(v)
    col = {nm: f[:, i] for i, nm in enumerate(names)}
    np.testing.assert_allclose(col["histogram.mean"], v.reshape(3, -1).mean(1))
    np.testing.assert_allclose(col["histogram.std"], v.reshape(3, -1).std(1))
    np.testing.assert_allclose(col["histogram.p75"], np.percentile(v.reshape(3, -1), 75, axis=1))
    bands = np.column_stack([col[f"spectrum.band{b + 1}"] for b in range(8)])
    np.testing.assert_allclose(bands.sum(1), 1.0)
    np.testing.assert_allclose(col["spectrum.log_energy"], np.log(v.reshape(3, -1).var(1) + 1e-12), rtol=1e-9)
    # a ramp along one axis: one gradient orientation (coherence 1), constant magnitude
    ramp = np.broadcast_to(np.arange(8.0)[:, None, None] / 10, (8, 6, 6))[None]
    f, _ = audit.volume_statistics(ramp)
    assert f[0, names.index("gradient.coherence")] == pytest.approx(1.0)
    assert f[0, names.index("gradient.magnitude_mean")] == pytest.approx(0.1)


def test_audit_of_the_brain_benchmark_finds_no_shortcut(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    ds = volume_builders.load_volumes("brain3d", brain=AUDIT, cache_dir=tmp / "cache")
    rep = audit.audit_dataset(ds, str(tmp / "out"), folds=5, n_boot=200, progress=False)
    assert rep["image_size"] == [32, 32, 32]
    assert rep["verdict"]["level"] == "none", rep["verdict"]["text"]
    cv = rep["cv"]["classifiers"]
    scores = {(c, g): s["balanced_accuracy"] for c, by_g in cv.items() for g, s in by_g.items()}
    assert max(scores.values()) <= 0.5, scores  # chance is 1/3; the best of 12 combinations
    assert max(s for (c, g), s in scores.items() if g == "histogram") <= 0.45, scores
    assert any("blind maps" in n for n in rep["notes"])
    assert (tmp / "out" / "audit.md").read_text().count("32x32x32 voxels") == 1


def _expected_record(config: BrainConfig, img: np.ndarray) -> np.ndarray:
    """Independent conversion: per-channel 1st/99th percentile scaling to [0, 1], then uint8."""
    out = np.empty(img.shape, np.uint8)
    for c in range(img.shape[-1]):
        lo, hi = np.percentile(img[..., c], [1, 99])
        out[..., c] = np.rint(np.clip((img[..., c] - lo) / (hi - lo), 0, 1) * 255)
    return out


def test_brain_cache_builds_and_reads_back(tmp_path, small):
    ds = builders.load("brain3d", brain=SMALL, cache_dir=tmp_path)  # builders.load dispatches to the volumes
    assert ds.class_names == SMALL.classes and ds.channels == 2 and ds.image_size == 16 and ds.has_masks
    np.testing.assert_array_equal(ds.labels, small["label"])
    np.testing.assert_array_equal(ds.patients, small["patient"])
    sp = 200.0 / 16
    for i in range(len(ds)):
        rec = ds.source[i]
        assert np.abs(rec["image"].astype(int) - _expected_record(SMALL, small["image"][i]).astype(int)).max() <= 1
        np.testing.assert_array_equal(rec["mask"], small["mask"][i])
        np.testing.assert_allclose(np.diag(rec["affine"])[:3], [sp] * 3)
        np.testing.assert_allclose(rec["affine"][:3, 3], [-sp * 7.5] * 3)  # centred on the origin
    assert builders.load("brain3d", brain=SMALL, cache_dir=tmp_path).path == ds.path


def test_export_reads_back_through_the_user_data_path(tmp_path, small):
    manifest = export.export_volumes(SMALL, tmp_path / "out")
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == list(small["patient"])
    assert [r["label"] for r in rows] == [SMALL.classes[k] for k in small["label"]]
    img = nib.load(tmp_path / "out" / rows[1]["path"])  # nibabel reads the files directly
    np.testing.assert_array_equal(np.asarray(img.dataobj), small["image"][1])
    np.testing.assert_allclose(img.affine, brain3d.affine(SMALL))
    with pytest.raises(FileExistsError):
        export.export_volumes(SMALL, tmp_path / "out")
    user = builders.load(manifest, image_size=16, cache_dir=tmp_path / "cache")
    synth = builders.load("brain3d", brain=SMALL, cache_dir=tmp_path / "cache")
    assert user.path != synth.path and user.class_names == tuple(sorted(SMALL.classes))
    names = np.asarray(user.class_names)[user.labels]
    np.testing.assert_array_equal(names, np.asarray(SMALL.classes)[synth.labels])
    for i in range(len(user)):
        u, s = user.source[i], synth.source[i]
        np.testing.assert_array_equal(u["image"], s["image"])
        np.testing.assert_array_equal(u["mask"], s["mask"])
        np.testing.assert_allclose(u["affine"], s["affine"], atol=1e-5)


def test_config_validation_and_cache_names():
    with pytest.raises(ValueError, match="unknown"):
        BrainConfig(classes=("ring", "cyst"))
    with pytest.raises(ValueError, match="channels"):
        BrainConfig(channels=3)
    assert BrainConfig().name() != BrainConfig(noise=0.05).name()
    assert BrainConfig().fingerprint() == BrainConfig().fingerprint()
    with pytest.raises(ValueError, match="contradicts"):
        volume_builders.load_volumes("brain3d", image_size=32, brain=SMALL, cache_dir="/nonexistent")
