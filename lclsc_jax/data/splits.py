"""Patient-wise splits: fixed train/val/test, stratified grouped k-fold, leave-one-patient-out.

Every split returns record indices (sorted int64 arrays). A patient never appears on two
sides; ``check_disjoint`` enforces it and every function here calls it on its result.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import LeaveOneGroupOut

from lclsc_jax.data.builders import Dataset

SPLIT_ORDER = ("train", "val", "test")


def _patient_labels(patients: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique patients (P,) and each one's majority label (P,) (0 without labels)."""
    uniq = np.unique(patients)
    if labels is None:
        return uniq, np.zeros(len(uniq), np.int64)
    labels = np.asarray(labels)
    if labels.shape != patients.shape:
        raise ValueError(f"labels shape {labels.shape} != patients shape {patients.shape}")
    maj = []
    for p in uniq:
        counts = Counter(labels[patients == p].tolist())
        maj.append(min(counts, key=lambda c: (-counts[c], c)))
    return uniq, np.asarray(maj, np.int64)


def _records_of(patients: np.ndarray, chosen) -> np.ndarray:
    """Record indices (sorted, int64) whose patient is in ``chosen``."""
    return np.flatnonzero(np.isin(patients, np.asarray(list(chosen), dtype=patients.dtype))).astype(np.int64)


def check_disjoint(patients, splits: dict[str, np.ndarray]) -> None:
    """Raise ValueError naming the patients shared by any two splits {name: record indices}."""
    patients = np.asarray(patients)
    sets = {k: set(patients[np.asarray(v, dtype=np.int64)].tolist()) for k, v in splits.items()}
    names = list(sets)
    problems = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(sets[a] & sets[b])
            if shared:
                more = f" (+{len(shared) - 10} more)" if len(shared) > 10 else ""
                problems.append(f"'{a}' and '{b}' share patient(s) {shared[:10]}{more}")
    if problems:
        raise ValueError("patient-wise split violated: " + "; ".join(problems))


class SplitWarning(UserWarning):
    """A split that leaves a class out of validation or test (e.g. a class with a single patient)."""


def absent_classes(labels: np.ndarray, idx: np.ndarray, classes: Sequence[int]) -> list[int]:
    """The ``classes`` with no record among ``idx`` (record indices into ``labels (N,)``)."""
    present = set(np.asarray(labels)[np.asarray(idx, np.int64)].tolist())
    return [c for c in classes if c not in present]


def _warn_absent(labels: np.ndarray | None, splits: dict[str, np.ndarray], expected: dict[str, bool],
                 class_names: Sequence[str] | None, why: str) -> None:
    """A ``SplitWarning`` per split (val, test) that was ``expected`` to hold records but misses some class."""
    if labels is None:
        return
    classes = np.unique(np.asarray(labels)).tolist()
    for name in ("val", "test"):
        missing = absent_classes(labels, splits[name], classes) if expected[name] else []
        if missing:
            shown = [str(class_names[c]) if class_names is not None else str(c) for c in missing]
            warnings.warn(f"class(es) {shown} have no {name} records ({why.format(split=name)}): "
                          f"{name} metrics will not cover them", SplitWarning, stacklevel=3)


def _stratified_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) patients of one class; at least one each when the class allows it."""
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 2:
        n_test = max(1, n_test)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n - n_test >= 2:
        n_val = max(1, n_val)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - n_test - 1, 0))
    return n_val, n_test


def patient_split(
    patients,
    labels=None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_column=None,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """{"train","val","test"}: record indices (sorted) by patient, stratified by class.

    With ``split_column`` (N,) of "train"/"val"/"test" (a manifest's ``split``), it is used
    as given, after checking that no patient is in two splits. A class left out of a val or
    test split that should hold records (e.g. a class with one patient) gives a ``SplitWarning``
    naming it (by ``class_names`` when given) and the split.
    """
    patients = np.asarray(patients).astype(str)
    if split_column is not None:
        col = np.asarray(split_column).astype(str)
        if col.shape != patients.shape:
            raise ValueError(f"split_column shape {col.shape} != patients shape {patients.shape}")
        bad = sorted(set(col.tolist()) - set(SPLIT_ORDER))
        if bad:
            raise ValueError(f"split_column has unknown values {bad}; expected {list(SPLIT_ORDER)}")
        splits = {k: np.flatnonzero(col == k).astype(np.int64) for k in SPLIT_ORDER}
        check_disjoint(patients, splits)
        _warn_absent(labels, splits, {k: len(splits[k]) > 0 for k in SPLIT_ORDER}, class_names,
                     "the split column puts none of their rows in {split}")
        return splits
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad fractions: val={val_fraction}, test={test_fraction}")
    uniq, plab = _patient_labels(patients, labels)
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {k: [] for k in SPLIT_ORDER}
    for c in np.unique(plab):
        group = uniq[plab == c]
        group = group[rng.permutation(len(group))]
        n_val, n_test = _stratified_counts(len(group), val_fraction, test_fraction)
        chosen["test"] += group[:n_test].tolist()
        chosen["val"] += group[n_test : n_test + n_val].tolist()
        chosen["train"] += group[n_test + n_val :].tolist()
    splits = {k: _records_of(patients, v) for k, v in chosen.items()}
    check_disjoint(patients, splits)
    _warn_absent(labels, splits, {"train": True, "val": val_fraction > 0, "test": test_fraction > 0}, class_names,
                 "too few patients to deal one to {split}")
    return splits


def splits_for(
    ds: Dataset, val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, np.ndarray]:
    """patient_split for a Dataset, honouring its manifest ``split`` column when present.

    Stratified by ``ds.strata`` when set (a frame filter splits as the tissue classifier does), else ``ds.labels``.
    """
    strata = ds.labels if getattr(ds, "strata", None) is None else ds.strata
    return patient_split(
        ds.patients, strata, val_fraction, test_fraction, seed, split_column=ds.split_column,
        class_names=ds.class_names if strata is ds.labels else None,
    )


def patient_kfold(patients, k: int, seed: int = 0, labels=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_idx, test_idx) folds grouped by patient, stratified by class when ``labels`` given."""
    patients = np.asarray(patients).astype(str)
    uniq, plab = _patient_labels(patients, labels)
    if not 2 <= k <= len(uniq):
        raise ValueError(f"k={k} must be in [2, number of patients={len(uniq)}]")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    nxt = 0  # dealing continues across classes, so fold sizes differ by at most one patient
    for c in np.unique(plab):
        group = uniq[plab == c]
        for p in group[rng.permutation(len(group))]:
            fold_of[str(p)] = nxt
            nxt = (nxt + 1) % k
    folds = []
    for f in range(k):
        test_p = [p for p, ff in fold_of.items() if ff == f]
        test = _records_of(patients, test_p)
        train = np.setdiff1d(np.arange(len(patients), dtype=np.int64), test)
        check_disjoint(patients, {"train": train, "test": test})
        folds.append((train, test))
    return folds


def leave_one_patient_out(patients) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (train_idx, test_idx) fold per patient (sorted by patient id)."""
    patients = np.asarray(patients).astype(str)
    if len(np.unique(patients)) < 2:
        raise ValueError("leave-one-patient-out needs at least 2 patients")
    # scikit-learn's LeaveOneGroupOut visits the groups in np.unique (sorted) order.
    return [(tr.astype(np.int64), te.astype(np.int64))
            for tr, te in LeaveOneGroupOut().split(patients, groups=patients)]


def split_report(ds: Dataset, splits: dict[str, np.ndarray]) -> str:
    """Markdown table: per split, records per class, total records and patients."""
    head = ["split", *ds.class_names, "records", "patients"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, idx in splits.items():
        idx = np.asarray(idx, dtype=np.int64)
        counts = np.bincount(ds.labels[idx], minlength=ds.num_classes)
        n_pat = len(np.unique(ds.patients[idx]))
        row = [name, *map(str, counts.tolist()), str(len(idx)), str(n_pat)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def label_subset(patients, labels, indices, fraction: float, seed: int) -> np.ndarray:
    """The records of a random ``fraction`` of the patients in ``indices`` (a label-efficiency run's labelled subset).

    Per class, ``ceil(fraction * patients of the class)`` patients (at least one) are drawn with
    ``seed``, so every class keeps a labelled patient; ``fraction=1`` returns ``indices`` unchanged.
    ``patients``, ``labels``: ``(N,)`` per record; ``indices``: record indices; returns sorted int64.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the labelled fraction must be in (0, 1], got {fraction}")
    idx = np.sort(np.asarray(indices, np.int64))
    if fraction == 1.0:
        return idx
    pats, labs = _patient_labels(np.asarray(patients)[idx], np.asarray(labels)[idx])
    rng = np.random.default_rng([int(seed), 0x1ABE1])
    chosen = []
    for c in np.unique(labs):
        members = pats[labs == c]
        k = max(1, int(np.ceil(fraction * len(members))))
        chosen.extend(rng.choice(members, k, replace=False).tolist())
    keep = np.isin(np.asarray(patients)[idx], np.asarray(chosen))
    return idx[keep]
