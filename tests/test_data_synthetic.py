"""Synthetic pCLE builder: determinism, evidence inside the masks, TFDS without TensorFlow."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lclsc_jax import data
from lclsc_jax.data import synthetic

SMALL = data.SyntheticConfig(num_patients=6, images_per_patient=3, image_size=32, seed=7)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return data.load(synthetic=SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


def test_generator_is_deterministic_and_seed_dependent():
    a = data.generate_arrays(SMALL)
    b = data.generate_arrays(SMALL)
    for k in ("image", "mask", "label", "patient"):
        assert a[k].tobytes() == b[k].tobytes(), k
    c = data.generate_arrays(dataclasses.replace(SMALL, seed=8))
    assert a["image"].tobytes() != c["image"].tobytes()


def test_built_dataset_has_the_generated_bytes(built):
    ref = data.generate_arrays(SMALL)
    assert len(built.source) == SMALL.num_images == len(built.labels)
    assert built.has_masks and built.num_classes == 3 and built.channels == 1
    for i in range(SMALL.num_images):
        ex = built.source[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 1)
        assert ex["image"].tobytes() == ref["image"][i].tobytes()
        assert ex["mask"].tobytes() == ref["mask"][i].tobytes()
        assert ex["label"] == ref["label"][i] == built.labels[i]
        assert ex["patient"] == ref["patient"][i] == built.patients[i]


def test_rebuild_in_fresh_cache_gives_same_bytes(built, tmp_path):
    again = data.load(synthetic=SMALL, cache_dir=tmp_path)
    assert again.path != built.path
    for i in (0, 5, SMALL.num_images - 1):
        assert again.source[i]["image"].tobytes() == built.source[i]["image"].tobytes()


def test_patients_have_one_class_and_classes_are_balanced(built):
    for p in np.unique(built.patients):
        assert len(set(built.labels[built.patients == p].tolist())) == 1
    assert np.bincount(built.labels).tolist() == [6, 6, 6]


def test_config_names_differ_per_parameter():
    names = {
        SMALL.name(),
        dataclasses.replace(SMALL, seed=1).name(),
        dataclasses.replace(SMALL, image_size=48).name(),
        dataclasses.replace(SMALL, num_patients=9).name(),
        dataclasses.replace(SMALL, noise_range=(0.0, 0.01)).name(),
    }
    assert len(names) == 5


def test_masks_are_nonempty_inside_the_field_of_view():
    a = data.generate_arrays(dataclasses.replace(SMALL, image_size=64))
    s = 64
    yy, xx = np.mgrid[:s, :s]
    outside = np.hypot(yy - (s - 1) / 2, xx - (s - 1) / 2) > 0.47 * s
    assert a["mask"].sum(axis=(1, 2)).min() > 20
    assert not (a["mask"] & outside).any()
    assert (a["image"][:, outside, 0] == 0).all()  # dark outside the circular field of view
    assert set(np.unique(a["mask"]).tolist()) == {0, 1}


def _region_features(img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Simple hand-made features of the pixels in ``region`` (intensity histogram, gradients)."""
    x = img.astype(np.float32) / 255
    gy, gx = np.gradient(x)
    g = np.hypot(gx, gy)
    lap = np.abs(ndimage.laplace(x))
    v = x[region]
    hist = np.histogram(v, bins=8, range=(0, 1))[0] / v.size
    return np.concatenate([hist, [v.mean(), v.std(), g[region].mean(), g[region].std(), lap[region].mean()]])


def test_masks_cover_the_class_evidence():
    """A classifier on the masked region beats chance by far; on the rest it stays near chance."""
    cfg = data.SyntheticConfig(num_patients=12, images_per_patient=8, image_size=64, seed=3)
    a = data.generate_arrays(cfg)
    s = cfg.image_size
    yy, xx = np.mgrid[:s, :s]
    fov = np.hypot(yy - (s - 1) / 2, xx - (s - 1) / 2) < 0.47 * s - 3
    xm, xu = [], []
    for img, m in zip(a["image"][..., 0], a["mask"].astype(bool)):
        xm.append(_region_features(img, m))
        # Leave a 2-px band so gradients at the disc edge do not leak inside texture.
        xu.append(_region_features(img, fov & ~ndimage.binary_dilation(m, iterations=2)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = GroupKFold(n_splits=4)  # held-out patients
    acc_m = cross_val_score(clf, np.stack(xm), a["label"], groups=a["patient"], cv=cv).mean()
    acc_u = cross_val_score(clf, np.stack(xu), a["label"], groups=a["patient"], cv=cv).mean()
    assert acc_m >= 0.75, (acc_m, acc_u)
    assert acc_u <= 0.55, (acc_m, acc_u)
    assert acc_m - acc_u >= 0.3


def test_patient_effects_shift_brightness():
    cfg = dataclasses.replace(SMALL, images_per_patient=4, brightness_range=(0.5, 1.5))
    a = data.generate_arrays(cfg)
    per_patient = [a["image"][a["patient"] == p].mean() for p in np.unique(a["patient"])]
    assert np.ptp(per_patient) > 5  # gray levels


def test_frames_are_distinct_at_default_size():
    """Every (patient, frame) draws its own randomness: no two 128x128 frames coincide."""
    cfg = data.SyntheticConfig(num_patients=5, images_per_patient=10, image_size=128)
    imgs = [synthetic.generate_image(cfg, p, f)[0] for p in range(5) for f in range(10)]
    assert len({im.tobytes() for im in imgs}) == 50


def test_render_examples_writes_png(built, tmp_path):
    from PIL import Image

    out = data.render_examples(built, 6, tmp_path / "grid.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_no_tensorflow_imported(tmp_path):
    """Building and reading must never import TensorFlow (it is not a dependency)."""
    code = textwrap.dedent(
        f"""
        import sys
        from lclsc_jax import data
        cfg = data.SyntheticConfig(num_patients=3, images_per_patient=2, image_size=32)
        ds = data.load(synthetic=cfg, cache_dir={str(tmp_path)!r})
        ds.source[0]
        it = data.train_iterator(ds, [0, 1, 2], global_batch_size=2, seed=0,
                                 process_index=0, process_count=1)
        next(it)
        bad = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        assert not bad, bad
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
