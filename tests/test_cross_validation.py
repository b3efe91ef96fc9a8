"""Cross-validation protocol: patient-wise folds, nested splits, aggregation, resume without retraining."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lclsc_jax.protocols import cross_validation as cv
from lclsc_jax.train import config as C
from lclsc_jax.train import loop

# 10 patients, labels by patient (p % 2), 3-5 records each, records of a patient not contiguous.
_PAT = np.array([f"P{p}" for p in range(10) for _ in range(3 + p % 3)])
_RNG = np.random.default_rng(0)
_PERM = _RNG.permutation(len(_PAT))
PATIENTS = _PAT[_PERM]
LABELS = np.array([int(p[1:]) % 2 for p in PATIENTS])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kfold_is_patient_disjoint_and_covers_every_record_once(k):
    folds = cv.cv_folds(PATIENTS, LABELS, folds=k, seed=1)
    assert len(folds) == k
    tests = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(PATIENTS)))  # each record tested exactly once
    for train, test in folds:
        assert set(PATIENTS[train]).isdisjoint(PATIENTS[test])
        assert len(train) + len(test) == len(PATIENTS)
    assert set().union(*(set(PATIENTS[te]) for _, te in folds)) == set(PATIENTS)


def test_lopo_has_one_patient_per_test_fold():
    folds = cv.cv_folds(PATIENTS, LABELS, lopo=True)
    assert len(folds) == len(set(PATIENTS))
    seen = []
    for train, test in folds:
        (p,) = set(PATIENTS[test])
        assert p not in set(PATIENTS[train])
        assert len(test) == np.sum(PATIENTS == p)
        seen.append(p)
    assert sorted(seen) == sorted(set(PATIENTS))


def test_nested_split_holds_out_training_patients_only():
    train, test = cv.cv_folds(PATIENTS, LABELS, folds=2, seed=0)[0]
    s = cv.fold_splits(PATIENTS, LABELS, train, test, nested=True, val_fraction=0.3, seed=0)
    assert set(PATIENTS[s["val"]]) and set(PATIENTS[s["train"]])
    assert set(PATIENTS[s["val"]]).isdisjoint(PATIENTS[s["train"]])
    assert set(PATIENTS[s["val"]]) | set(PATIENTS[s["train"]]) == set(PATIENTS[train])
    np.testing.assert_array_equal(np.sort(np.concatenate([s["train"], s["val"]])), np.sort(train))
    np.testing.assert_array_equal(s["test"], test)
    flat = cv.fold_splits(PATIENTS, LABELS, train, test, nested=False)
    assert len(flat["val"]) == 0
    np.testing.assert_array_equal(flat["train"], train)


def test_nested_split_with_too_few_patients_is_a_clear_error():
    pats = np.array(["A", "A", "B", "B"])
    with pytest.raises(ValueError, match="too few"):
        cv.fold_splits(pats, np.array([0, 0, 1, 1]), np.array([0, 1]), np.array([2, 3]), nested=True)


def _fake_fold(rng, patients, labels, c=2):
    """A fold's predictions: random probabilities (N, c) for the given labels and patients."""
    logits = rng.normal(size=(len(labels), c)) + 1.5 * np.eye(c)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"probs": probs, "label": np.asarray(labels), "patient": np.asarray(patients)}


def test_lopo_summary_pools_predictions_when_fold_auroc_is_undefined():
    from lclsc_jax import evaluate

    rng = np.random.default_rng(3)
    preds = [_fake_fold(rng, [f"P{i}"] * 4, [i % 2] * 4) for i in range(6)]  # one class per fold
    metrics = [evaluate.classification_metrics(p["label"], p["probs"], patients=p["patient"]) for p in preds]
    s = cv.summarize_folds(metrics, preds, ["a", "b"])
    assert all(f["auroc"] is None for f in s["folds"])
    assert s["aggregate"]["metrics"]["auroc"]["n"] == 0 and s["notes"]
    y = np.concatenate([p["label"] for p in preds])
    pr = np.concatenate([p["probs"] for p in preds])
    assert s["pooled"]["auroc"] == pytest.approx(roc_auc_score(y, pr[:, 1]))
    assert s["pooled"]["accuracy"] == pytest.approx(np.mean(pr.argmax(1) == y))
    accs = [np.mean(p["probs"].argmax(1) == p["label"]) for p in preds]
    assert s["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert s["aggregate"]["metrics"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))


def test_lopo_figures_skip_the_undefined_per_fold_roc(tmp_path):
    from lclsc_jax import evaluate

    rng = np.random.default_rng(4)
    preds = [_fake_fold(rng, [f"P{i}"] * 3, [i % 2] * 3) for i in range(4)]
    metrics = [evaluate.classification_metrics(p["label"], p["probs"], patients=p["patient"]) for p in preds]
    s = cv.summarize_folds(metrics, preds, ["a", "b"])
    figs = cv.write_cv_figures(s, preds, ["a", "b"], str(tmp_path))
    assert set(figs) == {"roc_pooled", "confusion_matrix", "confidence", "per_patient"}
    assert all(os.path.getsize(tmp_path / f) > 1000 for f in figs.values())
    assert s["pooled"]["n_patients"] == 4 and set(s["pooled"]["per_patient"]) == {"P0", "P1", "P2", "P3"}


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = C.load("tiny", {"data.cache_dir": str(cache), "train.steps": 6, "train.eval_every": 6,
                          "train.checkpoint_every": 6, "train.log_every": 3})
    return cfg, loop.load_dataset(cfg)


@pytest.mark.slow
def test_cross_validate_end_to_end_and_resume_skips_finished_folds(tiny, tmp_path, monkeypatch, capsys):
    cfg, ds = tiny
    wd = str(tmp_path / "cv")
    calls = []
    real_train = loop.train

    def interrupted_train(cfg_, workdir, **kw):  # fold 0 trains, fold 1 is "killed" at its start
        calls.append(os.path.basename(workdir))
        if workdir.endswith("fold_01"):
            raise KeyboardInterrupt
        return real_train(cfg_, workdir, **kw)

    monkeypatch.setattr(loop, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        cv.cross_validate(cfg, wd, folds=2, dataset=ds, progress=False)
    assert calls == ["fold_00", "fold_01"]
    m0 = os.path.join(wd, "fold_00", "metrics.json")
    assert os.path.exists(m0) and not os.path.exists(os.path.join(wd, "fold_01", "metrics.json"))
    stamp = os.stat(m0).st_mtime_ns

    calls.clear()
    monkeypatch.setattr(loop, "train", lambda cfg_, workdir, **kw: (calls.append(os.path.basename(workdir)),
                                                                       real_train(cfg_, workdir, **kw))[1])
    summary = cv.cross_validate(cfg, wd, folds=2, dataset=ds, progress=False)
    assert calls == ["fold_01"]  # the finished fold was not retrained
    assert os.stat(m0).st_mtime_ns == stamp

    calls.clear()
    again = cv.cross_validate(cfg, wd, folds=2, dataset=ds, progress=False)
    assert calls == [] and again["mean"] == summary["mean"]

    # Folds: patient-disjoint train/test (as trained, from each fold's splits.json), tests cover everyone.
    tested = []
    for k in range(2):
        with open(os.path.join(wd, f"fold_{k:02d}", "splits.json")) as f:
            sp = json.load(f)
        assert set(sp["patients"]["train"]).isdisjoint(sp["patients"]["test"])
        assert sp["counts"]["val"] == 0  # not nested: no validation patients
        tested += sp["patients"]["test"]
        z = np.load(os.path.join(wd, f"fold_{k:02d}", "predictions.npz"))
        np.testing.assert_array_equal(np.sort(z["index"]), sp["indices"]["test"])
        np.testing.assert_array_equal(z["label"], ds.labels[z["index"]])
    assert sorted(tested) == sorted(set(ds.patients))

    # Aggregates equal numpy statistics of the per-fold files.
    with open(os.path.join(wd, "cv_summary.json")) as f:
        saved = json.load(f)
    folds = [json.load(open(os.path.join(wd, f"fold_{k:02d}", "metrics.json"))) for k in range(2)]
    for key in ("accuracy", "f1", "balanced_accuracy"):
        vals = [m[key] for m in folds]
        agg = saved["aggregate"]["metrics"][key]
        assert agg["mean"] == pytest.approx(np.mean(vals))
        assert agg["std"] == pytest.approx(np.std(vals, ddof=1))
        assert agg["ci_low"] < agg["mean"] < agg["ci_high"] or agg["std"] == 0
    preds = [np.load(os.path.join(wd, f"fold_{k:02d}", "predictions.npz")) for k in range(2)]
    y = np.concatenate([p["label"] for p in preds])
    pr = np.concatenate([p["probs"] for p in preds])
    assert saved["pooled"]["accuracy"] == pytest.approx(np.mean(pr.argmax(1) == y))
    assert saved["pooled"]["n"] == len(ds.labels)
    for name in ("roc_folds", "roc_pooled", "confusion_matrix", "confidence", "per_patient"):
        assert os.path.getsize(os.path.join(wd, "figures", saved["figures"][name])) > 1000

    # `lclsc cv` with the same settings finds every fold finished and prints the summary.
    from lclsc_jax import cli

    sets = [f"{k}={v}" for k, v in C.flatten(cfg).items() if k.startswith(("train.", "data.cache_dir"))]
    assert cli.main(["cv", "--workdir", wd, "--config", "tiny", "--folds", "2", "--no-progress", "--no-figures",
                     "--set", *sets]) == 0
    out = capsys.readouterr().out
    assert calls == [] and "2-fold CV, 2 folds" in out and f"{saved['pooled']['accuracy']:.4f}" in out

    # A restart with other settings is refused instead of mixing folds.
    with pytest.raises(ValueError, match="other settings"):
        cv.cross_validate(cfg, wd, folds=3, dataset=ds, progress=False)


def test_the_folds_follow_the_configs_split_seed_unless_a_seed_is_given(tmp_path, monkeypatch):
    # A repeated CV is one CV per data.split_seed: the fold assignment must follow it (the ablation's replicates).
    import types

    from lclsc_jax import evaluate

    ds = types.SimpleNamespace(patients=PATIENTS, labels=LABELS, class_names=("a", "b"))
    seen = []

    def fake_fold(cfg, ds_, fold_dir, splits, which, progress):
        seen.append(sorted(set(PATIENTS[splits["test"]])))
        te = splits["test"]
        probs = np.eye(2)[LABELS[te]] * 0.8 + 0.1
        m = evaluate.classification_metrics(LABELS[te], probs, patients=PATIENTS[te])
        return m, {"probs": probs, "label": LABELS[te], "index": te, "patient": PATIENTS[te]}

    monkeypatch.setattr(cv, "_run_fold", fake_fold)
    for split_seed in (3, 4):
        cfg = C.load("tiny", {"data.split_seed": split_seed})
        seen.clear()
        s = cv.cross_validate(cfg, str(tmp_path / f"s{split_seed}"), folds=3, dataset=ds, progress=False, figures=False)
        expect = [sorted(set(PATIENTS[te])) for _, te in cv.cv_folds(PATIENTS, LABELS, folds=3, seed=split_seed)]
        assert seen == expect and s["seed"] == split_seed
    assert expect != [sorted(set(PATIENTS[te])) for _, te in cv.cv_folds(PATIENTS, LABELS, folds=3, seed=3)]
    seen.clear()
    cv.cross_validate(C.load("tiny", {"data.split_seed": 4}), str(tmp_path / "explicit"), folds=3, seed=3, dataset=ds,
                      progress=False, figures=False)
    assert seen == [sorted(set(PATIENTS[te])) for _, te in cv.cv_folds(PATIENTS, LABELS, folds=3, seed=3)]
