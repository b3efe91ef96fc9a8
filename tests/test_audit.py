"""Shortcut audit: planted shortcuts are found and named, none is found where there is none, folds are patient-wise."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn import metrics as skm

from lclsc_jax import data
from lclsc_jax.evaluate import localisation_metrics, shortcuts
from lclsc_jax.protocols import audit


def write_dataset(root, kind: str, n_patients: int = 18, frames: int = 6, size: int = 32, fov: bool = True,
                  seed: int = 0) -> str:
    """A CSV manifest of 8-bit PNG frames with masks; ``kind`` plants the class signal (or none).

    ``brightness``: class sets the mean grey level. ``spectrum``: class sets the frequency of an
    oriented sinusoid of fixed amplitude (same mean and histogram). ``none``: every class from one
    distribution (with a per-patient gain). In every kind the mask holds class-blind fine texture.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    c = (np.arange(size) + 0.5) / size - 0.5
    disc = (c[:, None] ** 2 + c[None, :] ** 2) <= 0.25
    rows = []
    for p in range(n_patients):
        label = p % 3
        gain = rng.uniform(0.85, 1.15)
        for f in range(frames):
            tex = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.5)
            tex /= tex.std()
            if kind == "brightness":
                img = 0.3 + 0.15 * label + 0.06 * tex
            elif kind == "spectrum":
                freq = (0.07, 0.14, 0.28)[label]
                th, ph = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
                img = 0.5 + 0.12 * np.cos(2 * np.pi * freq * (xx * np.cos(th) + yy * np.sin(th)) + ph) + 0.03 * tex
            else:
                img = 0.45 * gain + 0.08 * tex
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.15 * size) ** 2
            img = img + mask * 0.12 * rng.standard_normal((size, size)) + 0.01 * rng.standard_normal((size, size))
            if fov:
                img = img * disc
            name = f"p{p:02d}_f{f}"
            Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(os.path.join(root, name + ".png"))
            Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(root, name + "_m.png"))
            rows.append([name + ".png", f"c{label}", f"pt{p:02d}", name + "_m.png"])
    path = os.path.join(root, "manifest.csv")
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient", "mask"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="module")
def manifests(root):
    return {"brightness": write_dataset(str(root / "brightness"), "brightness"),
            "spectrum": write_dataset(str(root / "spectrum"), "spectrum", fov=False),
            "none": write_dataset(str(root / "none"), "none")}


def _load(root, manifests, kind):
    return data.load(manifests[kind], image_size=32, channels=1, cache_dir=str(root / "cache"))


# ------------------------------------------------------------------------- pieces


def test_patient_folds_never_put_a_patient_on_both_sides():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"pt{i}" for i in range(11)], rng.integers(1, 6, 11))
    labels = np.asarray([int(p[2:]) % 3 for p in patients])
    folds, k, notes = audit.patient_folds(patients, labels, 3, seed=3)
    assert k == 3 and len(folds) == 3 and not notes
    seen = []
    for train, test in folds:
        assert not set(patients[train]) & set(patients[test])
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(patients)))
        seen += test.tolist()
    assert sorted(seen) == list(range(len(patients)))  # every frame tested exactly once
    folds, k, notes = audit.patient_folds(patients, labels, 20)
    assert k == 11 and "k reduced from 20 to 11" in notes[0] and "fewer patients" in notes[1]
    with pytest.raises(ValueError, match="2 patients"):
        audit.patient_folds(["a", "a"], [0, 1], 2)


def test_bootstrap_over_patients():
    y = np.array([0] * 10 + [1] * 10)
    pred = np.array([0] * 10 + [0] * 10)  # patient A (class 0) all right, patient B (class 1) all wrong
    patients = np.array(["A"] * 10 + ["B"] * 10)
    s = audit.bootstrap_scores(y, pred, patients, 2, n_boot=4000, seed=0)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    # Drawing 2 of 2 patients: accuracy 1 (AA, p=1/4), 0.5 (AB/BA, 1/2) or 0 (BB, 1/4).
    assert s["accuracy_ci"] == [0.0, 1.0]
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 3, 300))
    patients = np.repeat(np.arange(30), 10)
    s = audit.bootstrap_scores(y, pred, patients, 3, n_boot=500)
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert s["accuracy_ci"][0] < s["accuracy"] < s["accuracy_ci"][1]
    same = audit.bootstrap_scores(y, y, patients, 3, n_boot=200)
    assert same["accuracy_ci"] == [1.0, 1.0]


# ----------------------------------------------------------------------- audits


def test_brightness_shortcut_is_found_and_named(root, manifests):
    ds = _load(root, manifests, "brightness")
    diagnostic = np.ones(len(ds.labels), bool)
    diagnostic[[0, 7, 50]] = False
    wrapped = types.SimpleNamespace(**{k: getattr(ds, k) for k in ("source", "labels", "patients", "class_names",
                                                                     "has_masks", "split_column", "path")},
                                    diagnostic=diagnostic)
    out = str(root / "out_brightness")
    r = audit.audit_dataset(wrapped, out, folds=6, n_boot=300, progress=False)
    assert r["verdict"]["level"] == "shortcut"
    assert r["best"]["accuracy"] >= 0.95 and r["cv"]["classifiers"]["logistic"]["histogram"]["accuracy"] >= 0.95
    top = r["univariate"][0]
    assert top["group"] == "histogram" and top["balanced_accuracy"] >= 0.95
    assert top["feature"] in {f"histogram.{s}" for s in ("mean", "p05", "p25", "p50", "p75", "p95", "p01", "p99")}
    assert top["feature"] in r["verdict"]["text"]
    assert r["fov"]["used"] == "disc" and r["fov"]["valid_pixels"] == shortcuts.inscribed_disc(32, 32).sum()
    assert r["chance"]["balanced_accuracy"] == pytest.approx(1 / 3)
    # Non-diagnostic frames are left out, and said so.
    assert (r["n_frames"], r["n_used"], r["n_nondiagnostic_dropped"]) == (108, 105, 3)
    assert sum(f["n_test"] for f in r["cv"]["folds"]) == 105 and "3 non-diagnostic" in r["notes"][0]
    tested = [p for f in r["cv"]["folds"] for p in f["test_patients"]]
    assert sorted(tested) == sorted(set(ds.patients.tolist()))  # each patient in exactly one test fold
    # Held out: the trainer's default split (0.15, 0.2, seed 0); train + val -> test.
    split = data.patient_split(ds.patients, ds.labels, 0.15, 0.2, 0)
    assert r["held_out"]["test_patients"] == sorted(set(ds.patients[split["test"]].tolist()))
    assert r["held_out"]["classifiers"]["logistic"]["histogram"]["accuracy"] >= 0.9

    # Blind maps: the test split's frames, scored inside the disc; recompute one row independently.
    bm = r["blind_maps"]
    assert bm["split"] == "test" and bm["indices"] == split["test"].tolist()
    idx = np.asarray(bm["indices"])
    images = np.stack([ds.source[int(i)]["image"] for i in idx])
    masks = np.stack([ds.source[int(i)]["mask"] > 0 for i in idx])
    valid = shortcuts.inscribed_disc(32, 32)
    ref = localisation_metrics(shortcuts.local_std_map(images, valid), masks, valid=valid)
    row = {x["method"]: x for x in bm["rows"]}
    assert row["blind:local_std"]["dice@otsu"] == pytest.approx(ref["thresholds"]["otsu"]["dice"], abs=1e-6)
    assert row["blind:local_std"]["dice@area"] == pytest.approx(ref["thresholds"]["area"]["dice"], abs=1e-6)
    assert row["blind:local_std"]["pr_auc"] == pytest.approx(ref["pr_auc"], abs=1e-6)
    # The mask holds the only fine texture: local std finds it, noise does not.
    assert row["blind:local_std"]["dice@area"] > row["blind:random"]["dice@area"] + 0.3

    for name in ("audit.json", "audit.md", "audit.png", "audit_maps.png"):
        assert os.path.getsize(os.path.join(out, name)) > 500, name
    saved = json.load(open(os.path.join(out, "audit.json")))
    assert saved["verdict"] == r["verdict"]
    md = open(os.path.join(out, "audit.md")).read()
    assert "## Verdict" in md and "a shortcut" in md and "| `blind:local_std` |" in md and "histogram (11)" in md


def test_spectral_shortcut_is_found_and_named(root, manifests):
    r = audit.audit_dataset(_load(root, manifests, "spectrum"), str(root / "out_spectrum"), folds=6, n_boot=300,
                            progress=False)
    assert r["fov"]["used"] == "whole"
    spectrum = max(r["cv"]["classifiers"][c]["spectrum"]["accuracy"] for c in audit.CLASSIFIERS)
    assert spectrum >= 0.9 and r["verdict"]["level"] == "shortcut"
    assert r["cv"]["classifiers"]["logistic"]["histogram"]["accuracy"] < 0.6  # same mean and histogram
    bands = [u for u in r["univariate"][:5] if u["feature"].startswith("spectrum.band")]
    assert bands and bands[0]["balanced_accuracy"] >= 0.8


def test_no_shortcut_where_there_is_none(root, manifests):
    r = audit.audit_dataset(_load(root, manifests, "none"), str(root / "out_none"), folds=6, n_boot=300,
                            progress=False)
    for clf in audit.CLASSIFIERS:
        for g in audit.FEATURE_SETS:
            assert r["cv"]["classifiers"][clf][g]["balanced_accuracy"] < 0.6, (clf, g)
    assert r["verdict"]["level"] == "none" and r["verdict"]["text"].startswith("No shortcut found")


def _lclsc(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_lclsc_audit_data_writes_the_report(root, manifests):
    out = str(root / "cli_out")
    r = _lclsc("audit-data", "--data", manifests["none"], "--set", "data.image_size=32",
               f"data.cache_dir={root / 'cache'}", "--folds", "3", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "## Verdict" in r.stdout and "audit.json" in r.stdout
    for name in ("audit.json", "audit.md", "audit.png", "audit_maps.png"):
        assert os.path.exists(os.path.join(out, name)), name
    rep = json.load(open(os.path.join(out, "audit.json")))
    assert rep["cv"]["k"] == 3 and rep["n_used"] == 108


def test_lclsc_audit_data_bad_input_exits_2(root, manifests, capsys):
    from lclsc_jax import cli

    rc = cli.main(["audit-data", "--data", str(root / "missing.csv"), "--out", str(root / "x"), "--no-progress"])
    assert rc == 2 and "audit-data: error" in capsys.readouterr().err
    rc = cli.main(["audit-data", "--data", manifests["none"], "--set", "data.image_size=32",
                   f"data.cache_dir={root / 'cache'}", "--split", "tests", "--out", str(root / "x"), "--no-progress"])
    assert rc == 2 and "split 'tests'" in capsys.readouterr().err


def test_audit_data_help(capsys):
    from lclsc_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["audit-data", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--data", "--config", "--set", "--folds", "--split", "--out"):
        assert flag in out
