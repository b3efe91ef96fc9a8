"""Patient-wise splits: no patient on two sides, stratification, reports."""

from __future__ import annotations

import numpy as np
import pytest

from lclsc_jax import data


def _toy(n_patients=12, per=5, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i:02d}" for i in range(n_patients)], per)
    labels = np.repeat(np.arange(n_patients) % n_classes, per).astype(np.int32)
    order = rng.permutation(len(patients))  # records need not be grouped
    return patients[order], labels[order]


def _patients_of(patients, idx):
    return set(patients[idx].tolist())


@pytest.mark.parametrize("k", [2, 3, 4, 12])
def test_patient_kfold_partitions_patients(k):
    patients, labels = _toy()
    folds = data.patient_kfold(patients, k, seed=1, labels=labels)
    assert len(folds) == k
    seen = []
    for train, test in folds:
        assert not (_patients_of(patients, train) & _patients_of(patients, test))
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(patients)))
        seen += test.tolist()
    assert sorted(seen) == list(range(len(patients)))  # every record tested exactly once


def test_patient_kfold_stratifies_when_patients_allow():
    patients, labels = _toy(n_patients=12, n_classes=3)
    for _, test in data.patient_kfold(patients, 4, seed=3, labels=labels):
        # 4 patients per class over 4 folds -> each fold gets one patient of each class
        assert np.bincount(labels[test], minlength=3).tolist() == [5, 5, 5]


def test_patient_kfold_seed_changes_assignment_and_bad_k():
    patients, labels = _toy()
    a = data.patient_kfold(patients, 3, seed=0, labels=labels)
    b = data.patient_kfold(patients, 3, seed=5, labels=labels)
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="k=13"):
        data.patient_kfold(patients, 13, seed=0)


def test_leave_one_patient_out():
    patients, _ = _toy(n_patients=5)
    folds = data.leave_one_patient_out(patients)
    assert len(folds) == 5
    for train, test in folds:
        assert len(_patients_of(patients, test)) == 1
        assert not (_patients_of(patients, train) & _patients_of(patients, test))
        assert len(train) + len(test) == len(patients)


def test_patient_split_disjoint_stratified_and_deterministic():
    patients, labels = _toy(n_patients=24, per=3)
    s = data.patient_split(patients, labels, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert set(s) == {"train", "val", "test"}
    sets = {k: _patients_of(patients, v) for k, v in s.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    assert sum(len(v) for v in s.values()) == len(patients)
    # 8 patients per class: round(1.6)=2 test, round(1.2)=1 val per class
    assert [len(sets[k]) for k in ("train", "val", "test")] == [15, 3, 6]
    for k, n_per_class in (("test", 2), ("val", 1)):
        assert np.bincount(labels[s[k]], minlength=3).tolist() == [3 * n_per_class] * 3
    again = data.patient_split(patients, labels, seed=0)
    assert all(np.array_equal(s[k], again[k]) for k in s)


def test_check_disjoint_raises_naming_patients():
    patients = np.array(["a", "a", "b", "c", "c"])
    data.check_disjoint(patients, {"train": np.array([0, 1, 2]), "test": np.array([3, 4])})
    with pytest.raises(ValueError, match=r"'train' and 'test' share patient\(s\) \['c'\]"):
        data.check_disjoint(patients, {"train": np.array([0, 3]), "test": np.array([4])})


def test_split_column_used_and_checked():
    patients = np.array(["a", "a", "b", "c"])
    labels = np.array([0, 0, 1, 1])
    s = data.patient_split(patients, labels, split_column=np.array(["train", "train", "val", "test"]))
    assert {k: v.tolist() for k, v in s.items()} == {"train": [0, 1], "val": [2], "test": [3]}
    with pytest.raises(ValueError, match=r"share patient\(s\) \['a'\]"):
        data.patient_split(patients, labels, split_column=np.array(["train", "test", "val", "test"]))


def test_split_report_counts(tmp_path):
    ds = data.load(
        synthetic=data.SyntheticConfig(num_patients=6, images_per_patient=2, image_size=32),
        cache_dir=tmp_path,
    )
    s = {"train": np.arange(0, 8), "test": np.arange(8, 12)}
    rep = data.split_report(ds, s)
    lines = rep.splitlines()
    assert lines[0] == "| split | healthy | glioma | meningioma | records | patients |"
    # records 0..7 are patients P000..P003 (classes 0,1,2,0), 8..11 are P004, P005 (classes 1, 2)
    assert lines[2] == "| train | 4 | 2 | 2 | 8 | 4 |"
    assert lines[3] == "| test | 0 | 2 | 2 | 4 | 2 |"
