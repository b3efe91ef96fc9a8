"""Shortcut audit of a dataset (``lclsc audit-data``): global statistics vs class, class-blind maps vs masks.

A dataset on which the class can be read off global image statistics (brightness, contrast, the
power spectrum) lets a classifier score well without looking at the evidence; a dataset on which a
class-blind texture map already overlaps the masks lets any saliency method "localise". This
module measures both, patient-wise, for the built-in simulator and for users' data alike:

1. ``evaluate.shortcuts.global_statistics`` of every frame, inside the field of view (a circular
   one is detected from dark corners);
2. standardised logistic regression, gradient-boosted trees and k-nearest neighbours on each
   feature group and on all features, patient-wise stratified k-fold CV (out-of-fold
   predictions), plus the fixed train+val -> test split the trainer uses; accuracy and balanced
   accuracy with 95% intervals from a bootstrap over patients, against chance;
3. each statistic alone (a depth-3 tree, same folds), ranked: which statistic leaks;
4. with masks: every class-blind map (``shortcuts.BLIND_MAPS``) scored like ``benchmark-cams``.

Writes ``audit.json``, ``audit.md`` (tables and a verdict), ``audit.png`` and ``audit_maps.png``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits

from lclsc_jax import data
from lclsc_jax.evaluate import shortcuts
from lclsc_jax.protocols.cam_benchmark import localisation_row, select_images
from lclsc_jax.train.reporting import log

__all__ = ["CLASSIFIERS", "audit_dataset", "bootstrap_scores", "format_audit", "patient_folds", "verdict",
           "volume_band_edges", "volume_statistics"]

#: Classifiers fitted on the global statistics.
CLASSIFIERS: tuple[str, ...] = ("logistic", "boosting", "knn")
FEATURE_SETS: tuple[str, ...] = (*shortcuts.FEATURE_GROUPS, "all")
MAP_COLUMNS = ("dice@otsu", "dice@area", "iou@area", "pr_auc", "pointing_game", "energy_pointing_game")


# ------------------------------------------------------------------------- reading


def _read(ds: Any, indices: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """Images ``(n, H, W, C)`` uint8 and masks ``(n, H, W)`` bool (None without masks) of records ``indices``."""
    images, masks = [], []
    getitems = getattr(ds.source, "__getitems__", None)
    for i in range(0, len(indices), chunk):
        part = [int(j) for j in indices[i:i + chunk]]
        recs = getitems(part) if getitems is not None else [ds.source[j] for j in part]
        images += [np.asarray(r["image"]) for r in recs]
        masks += [np.asarray(r["mask"]) > 0 for r in recs]
    if not images:
        raise ValueError("no frames to read")
    return np.stack(images), (np.stack(masks) if ds.has_masks else None)


def volume_band_edges(shape: Sequence[int], n_bands: int = shortcuts.N_SPECTRUM_BANDS) -> np.ndarray:
    """``(n_bands + 1,)`` log-spaced radial frequency edges (cycles/voxel) of a volume, lowest to the cube's corner."""
    return np.geomspace(1.0 / max(shape), np.sqrt(0.75), n_bands + 1)


def volume_statistics(volumes: Any, n_bands: int = shortcuts.N_SPECTRUM_BANDS) -> tuple[np.ndarray, tuple[str, ...]]:
    """Global statistics of volumes ``(N, D, H, W[, C])`` (uint8 or [0, 1] float): ``(features (N, F), names)``.

    The 3D counterparts of ``shortcuts.global_statistics``, same names and groups, over every voxel
    of the channel mean: the ``histogram.*`` moments and percentiles; ``spectrum.band*`` shares of the
    mean-removed 3D power spectrum in ``volume_band_edges`` bands and ``spectrum.log_energy``;
    ``gradient.magnitude_mean`` (``np.gradient`` over the three axes, interior voxels) and
    ``gradient.coherence``: anisotropy of the summed 3D structure tensor,
    ``sqrt(1.5 sum (l_i - mean l)^2 / sum l_i^2)`` of its eigenvalues (0 isotropic, 1 one orientation).
    """
    x = np.asarray(volumes)
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float64) * scale
    if x.ndim == 5:
        x = x.mean(axis=-1)
    if x.ndim != 4:
        raise ValueError(f"volumes must have shape (N, D, H, W) or (N, D, H, W, C), got {np.shape(volumes)}")
    n, shape = x.shape[0], x.shape[1:]
    hist = shortcuts._histogram_stats(x.reshape(n, -1))  # pylint: disable=protected-access
    xm = x - x.reshape(n, -1).mean(axis=1)[:, None, None, None]
    power = np.abs(np.fft.fftn(xm, axes=(1, 2, 3))) ** 2
    f = np.meshgrid(*[np.fft.fftfreq(s) for s in shape], indexing="ij")
    r = np.sqrt(sum(fi**2 for fi in f))
    nz = r > 0
    edges = volume_band_edges(shape, n_bands)
    band = np.clip(np.searchsorted(edges, r[nz], side="right") - 1, 0, n_bands - 1)
    p = power[:, nz]
    energy = np.stack([p[:, band == b].sum(axis=1) for b in range(n_bands)], axis=1)
    total = energy.sum(axis=1)
    frac = np.where(total[:, None] > 0, energy / np.where(total > 0, total, 1.0)[:, None], 0.0)
    log_energy = np.log(total / (np.prod(shape) ** 2) + 1e-12)  # Parseval: the variance of the volume
    g = np.gradient(x, axis=(1, 2, 3))
    inner = (slice(None),) + (slice(1, -1),) * 3
    g = [gi[inner].reshape(n, -1) for gi in g]
    mag = np.sqrt(sum(gi**2 for gi in g)).mean(axis=1)
    tensor = np.stack([np.stack([(g[a] * g[b]).sum(axis=1) for b in range(3)], -1) for a in range(3)], -2)
    lam = np.linalg.eigvalsh(tensor)
    den = (lam**2).sum(axis=1)
    coh = np.where(den > 0, np.sqrt(1.5 * ((lam - lam.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
                                    / np.where(den > 0, den, 1.0)), 0.0)
    feats = np.column_stack([hist, frac, log_energy, mag, coh])
    return feats.astype(np.float64), shortcuts.feature_names(n_bands)


def _features(ds: Any, indices: np.ndarray, valid: np.ndarray | None, progress: bool,
              chunk: int = 256) -> tuple[np.ndarray, tuple[str, ...]]:
    """``global_statistics`` (``volume_statistics`` for volumes) of records ``indices``, in chunks (bounded memory)."""
    feats, names = [], ()
    t0 = time.time()
    for i in range(0, len(indices), chunk):
        images, _ = _read(ds, indices[i:i + chunk], chunk)
        if images.ndim == 5:
            f, names = volume_statistics(images)
        else:
            f, names = shortcuts.global_statistics(images, valid)
        feats.append(f)
        done = min(i + chunk, len(indices))
        if progress and (done == len(indices) or (i // chunk) % 8 == 7):
            log(f"[audit-data] statistics of {done}/{len(indices)} frames ({time.time() - t0:.1f} s)", True)
    return np.concatenate(feats), names


# ------------------------------------------------------------------------ folds


def patient_folds(patients: Any, labels: Any, k: int, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                                                             int, list[str]]:
    """Patient-wise stratified folds ``[(train_idx, test_idx)]`` (``data.patient_kfold``), k at most the patients.

    Returns ``(folds, k_used, notes)``; the notes say when k was reduced or a class has fewer
    patients than folds (then some test folds lack that class).
    """
    patients = np.asarray(patients).astype(str)
    labels = np.asarray(labels)
    uniq = np.unique(patients)
    if k < 2:
        raise ValueError(f"folds must be >= 2, got {k}")
    if len(uniq) < 2:
        raise ValueError(f"patient-wise cross-validation needs at least 2 patients, got {len(uniq)}")
    notes = []
    k_used = min(int(k), len(uniq))
    if k_used < k:
        notes.append(f"k reduced from {k} to {k_used}: only {len(uniq)} patients")
    per_class = {int(c): len(np.unique(patients[labels == c])) for c in np.unique(labels)}
    few = sorted(c for c, n in per_class.items() if n < k_used)
    if few:
        notes.append(f"class(es) {few} have fewer patients ({[per_class[c] for c in few]}) than folds ({k_used}): "
                     "some test folds lack them")
    folds = data.patient_kfold(patients, k_used, seed=seed, labels=labels)
    return folds, k_used, notes


# -------------------------------------------------------------------- classifiers


def _make(name: str, n_train: int, seed: int) -> Any:
    """A fresh scikit-learn classifier ``name`` (of ``CLASSIFIERS``, or ``tree`` for univariate scans)."""
    if name == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    if name == "boosting":
        return HistGradientBoostingClassifier(max_iter=60, early_stopping=False, random_state=seed)
    if name == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=max(1, min(15, n_train))))
    if name == "tree":
        return DecisionTreeClassifier(max_depth=3, min_samples_leaf=max(1, min(5, n_train // 10)),
                                      random_state=seed)
    raise ValueError(f"unknown classifier {name!r}; expected one of {CLASSIFIERS} or 'tree'")


def _fit_predict(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    """Predicted labels of ``x_test``; a training set of one class predicts that class.

    One thread (OpenMP/BLAS): the problems are small, and threads only contend on a busy machine.
    """
    classes = np.unique(y_train)
    if len(classes) == 1:
        return np.full(len(x_test), classes[0], dtype=y_train.dtype)
    with threadpool_limits(limits=1):
        clf = _make(name, len(x_train), seed)
        clf.fit(x_train, y_train)
        return np.asarray(clf.predict(x_test), dtype=y_train.dtype)


def _oof(name: str, x: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
         seed: int) -> np.ndarray:
    """Out-of-fold predictions ``(N,)``: each frame predicted by the model of the fold that holds it out."""
    pred = np.empty_like(y)
    for train, test in folds:
        pred[test] = _fit_predict(name, x[train], y[train], x[test], seed)
    return pred


# ------------------------------------------------------------------------ scoring


def bootstrap_scores(y: Any, pred: Any, patients: Any, n_classes: int, *, n_boot: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, Any]:
    """Accuracy and balanced accuracy of ``pred (N,)`` vs ``y (N,)``, percentile intervals from a patient bootstrap.

    Each replicate draws the patients with replacement (all of a drawn patient's frames, counted
    as often as drawn); balanced accuracy is the mean recall over the classes present.
    """
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    patients = np.asarray(patients).astype(str)
    uniq, pidx = np.unique(patients, return_inverse=True)
    n_pc = np.zeros((len(uniq), n_classes))
    ok_pc = np.zeros((len(uniq), n_classes))
    np.add.at(n_pc, (pidx, y), 1.0)
    np.add.at(ok_pc, (pidx, y), (y == pred).astype(float))

    def scores(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_c, ok_c = w @ n_pc, w @ ok_pc  # (B, C)
        acc = ok_c.sum(-1) / np.maximum(n_c.sum(-1), 1e-12)
        with np.errstate(invalid="ignore", divide="ignore"):
            rec = np.where(n_c > 0, ok_c / np.where(n_c > 0, n_c, 1.0), np.nan)
        return acc, np.nanmean(rec, axis=-1)

    acc, bal = scores(np.ones((1, len(uniq))))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n_boot).astype(float)
    b_acc, b_bal = scores(w)
    a = (1 - confidence) / 2
    ci = lambda v: [float(np.nanquantile(v, a)), float(np.nanquantile(v, 1 - a))]  # noqa: E731
    return {"n": int(len(y)), "n_patients": int(len(uniq)), "accuracy": float(acc[0]), "accuracy_ci": ci(b_acc),
            "balanced_accuracy": float(bal[0]), "balanced_accuracy_ci": ci(b_bal)}


def _chance(y: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Chance levels: majority-class frequency (accuracy) and 1/C over the classes present (balanced accuracy)."""
    counts = np.bincount(y, minlength=len(class_names))
    present = int((counts > 0).sum())
    return {"accuracy": float(counts.max() / counts.sum()), "majority_class": class_names[int(np.argmax(counts))],
            "balanced_accuracy": 1.0 / max(present, 1), "n_classes_present": present}


def verdict(best: Mapping[str, Any], chance: Mapping[str, Any], top: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """``{"level", "text"}`` from the best classifier's balanced accuracy and its interval against chance.

    The interval is ``balanced_accuracy_ci_adjusted`` when given (Bonferroni over the
    ``n_comparisons`` combinations the best was chosen from), else ``balanced_accuracy_ci``.
    ``shortcut``: the interval's lower end is above chance and the point estimate at least
    halfway from chance to 1; ``weak``: only the lower end is above chance; ``none`` otherwise.
    """
    c = float(chance["balanced_accuracy"])
    b, (lo, hi) = best["balanced_accuracy"], best.get("balanced_accuracy_ci_adjusted", best["balanced_accuracy_ci"])
    n_comp = best.get("n_comparisons")
    ci = (f"95% interval [{lo:.2f}, {hi:.2f}]"
          + (f", widened for picking the best of {n_comp} classifier x feature-set combinations" if n_comp else ""))
    what = (f"balanced accuracy {b:.2f} on held-out patients ({ci}; chance {c:.2f}; "
            f"{best['classifier']} on {best['group']} statistics)")
    leak = ""
    if top:
        t = top[0]
        leak = (f" The most predictive single statistic is `{t['feature']}` (balanced accuracy "
                f"{t['balanced_accuracy']:.2f} alone).")
    if lo > c and b >= c + 0.5 * (1 - c):
        level = "shortcut"
        text = (f"Global statistics predict the class at {what}: a shortcut. A classifier can score this well "
                f"without looking at the evidence.{leak}")
    elif lo > c:
        level = "weak"
        text = (f"Global statistics carry some class information: {what}; above chance but far from a full "
                f"shortcut. Check the leading statistics before trusting accuracy differences of this size.{leak}")
    else:
        level = "none"
        text = (f"No shortcut found at this sample size: the best global-statistics classifier reaches {what}; "
                "the interval includes chance.")
    return {"level": level, "text": text}


# ------------------------------------------------------------------------- FOV


def _detect_fov(ds: Any, indices: np.ndarray, max_frames: int = 512) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                             dict[str, Any]]:
    """``(valid, score_valid, info)`` from up to ``max_frames`` frames (``shortcuts.estimate_fov``).

    Circular (corners dark in almost every frame): ``valid`` is the measured disc (statistics
    and blind maps are computed inside it) and ``score_valid`` the inscribed disc (maps are
    scored inside it, as ``benchmark-cams`` does). Otherwise both are None (the whole frame).
    """
    sample = select_images(indices, max_frames)
    images, _ = _read(ds, sample)
    est = shortcuts.estimate_fov(images)
    h, w = images.shape[1:3]
    info = {k: v for k, v in est.items() if k != "valid"}
    if est["circular"]:
        info.update(used="disc", valid_pixels=int(est["valid"].sum()),
                    description=(f"circular: corners dark in {est['dark_fraction']:.0%} of {est['n_frames']} frames; "
                                 f"the frames go dark {est['radius_px']:.1f} px from the centre (inscribed disc: "
                                 f"{min(h, w) / 2:.1f} px). Statistics and blind maps use the disc inside that "
                                 f"({int(est['valid'].sum())} px); blind maps are scored inside the inscribed disc, "
                                 "as benchmark-cams does"))
        return est["valid"], shortcuts.inscribed_disc(h, w), info
    info.update(used="whole", valid_pixels=int(h * w),
                description=(f"whole frame: corners dark in only {est['dark_fraction']:.0%} of {est['n_frames']} "
                             "frames, so no circular field of view"))
    return None, None, info


# --------------------------------------------------------------------- blind maps


def _map_picks(labels: np.ndarray, has_mask: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` positions: frames with a mask first (the first of each class, then the rest), then the others."""
    order: list[int] = []
    for pool in (np.flatnonzero(has_mask), np.flatnonzero(~has_mask)):
        order += [int(pool[labels[pool] == c][0]) for c in np.unique(labels[pool])]
        order += [int(i) for i in pool if int(i) not in order]
    return np.asarray(order[:k], np.int64)


def _blind_maps(ds: Any, indices: np.ndarray, valid: np.ndarray | None, score_valid: np.ndarray | None,
                max_images: int, seed: int, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score every class-blind map (computed in ``valid``) inside ``score_valid`` on up to ``max_images`` frames."""
    idx = select_images(indices, max_images)
    images, masks = _read(ds, idx)
    rows, maps = [], {}
    for name in shortcuts.BLIND_MAPS:
        m = shortcuts.blind_map(name, images, valid, seed=seed).astype(np.float32)
        row = {"method": f"blind:{name}", **localisation_row(m, masks, (0.5,), score_valid)}
        rows.append(row)
        maps[name] = m
        log(f"[audit-data] blind:{name:<10} dice@otsu={_num(row['dice@otsu'])} dice@area={_num(row['dice@area'])} "
             f"pr_auc={_num(row['pr_auc'])}", progress)
    labels = np.asarray([int(ds.labels[i]) for i in idx])
    patients = [str(ds.patients[i]) for i in idx]
    return ({"indices": idx.tolist(), "n_images": int(len(idx)), "n_evaluated": rows[0]["n_evaluated"], "rows": rows},
            {"images": images, "masks": masks, "maps": maps, "labels": labels, "idx": idx, "patients": patients})


# ------------------------------------------------------------------------ main


def audit_dataset(ds: Any, out_dir: str, *, folds: int = 8, seed: int = 0, split: str | None = None,
                  max_map_images: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.2,
                  split_seed: int = 0, n_boot: int = 1000, figure_images: int = 4,
                  progress: bool = True) -> dict[str, Any]:
    """Audit ``ds`` (a ``lclsc_jax.data.Dataset``) for shortcuts; write ``audit.json/.md/.png`` and ``audit_maps.png``.

    ``folds``: patient-wise stratified k-fold (reduced to the number of patients, with a note);
    ``seed``: fold assignment, classifiers and bootstrap. The held-out split is
    ``data.patient_split(val_fraction, test_fraction, split_seed)`` (the trainer's default, or the
    manifest's ``split`` column): train+val -> test. Blind maps are scored on up to
    ``max_map_images`` frames of ``split`` (default ``"test"``; ``"all"`` for every frame) when the
    data have masks. Frames flagged non-diagnostic (``ds.diagnostic`` False, when present) are left
    out of the statistics. Returns the report (also ``audit.json``).
    """
    t_start = time.time()
    n = len(ds.labels)
    labels_all = np.asarray(ds.labels, np.int64)
    patients_all = np.asarray(ds.patients).astype(str)
    class_names = list(ds.class_names)
    if n == 0:
        raise ValueError("the dataset has no frames")
    diagnostic = getattr(ds, "diagnostic", None)
    keep = np.ones(n, bool) if diagnostic is None else np.asarray(diagnostic).astype(bool)
    if keep.shape != (n,):
        raise ValueError(f"ds.diagnostic must have shape ({n},), got {keep.shape}")
    used = np.flatnonzero(keep)
    if len(np.unique(labels_all[used])) < 2:
        raise ValueError("the audit needs frames of at least 2 classes")
    y, patients = labels_all[used], patients_all[used]
    notes: list[str] = []
    if diagnostic is not None:
        notes.append(f"{n - len(used)} non-diagnostic frame(s) dropped from the statistics")
    log(f"[audit-data] {n} frames, {len(np.unique(patients_all))} patients, {len(class_names)} classes"
         + (f"; {n - len(used)} non-diagnostic dropped" if diagnostic is not None else ""), progress)

    # The trainer's fixed patient-wise split (train + val -> test); its `split` frames get the blind maps.
    splits = data.patient_split(patients_all, labels_all, val_fraction, test_fraction, split_seed,
                                split_column=getattr(ds, "split_column", None))
    map_split = split or "test"
    if map_split != "all" and not (map_split in splits and len(splits[map_split])):
        raise ValueError(f"split {map_split!r} is empty or unknown; choose from "
                         f"{sorted(k for k in splits if len(splits[k]))} or 'all'")

    first_shape = ds.source[int(used[0])]["image"].shape
    is_volume = len(first_shape) == 4  # (D, H, W, C): no field of view, 3D statistics, no blind maps
    if is_volume:
        valid = score_valid = None
        fov = {"used": "whole", "valid_pixels": int(np.prod(first_shape[:3])),
               "description": "volumes: statistics over every voxel (no field of view)"}
    else:
        valid, score_valid, fov = _detect_fov(ds, used)
    log(f"[audit-data] field of view: {fov['description']}", progress)
    x, names = _features(ds, used, valid, progress)
    groups = {g: [i for i, nm in enumerate(names) if shortcuts.feature_group(nm) == g] for g in shortcuts.FEATURE_GROUPS}
    groups["all"] = list(range(len(names)))
    h, w = first_shape[:2]
    edges = volume_band_edges(first_shape[:3]) if is_volume else shortcuts.spectrum_band_edges(h, w)

    cv_folds, k_used, fold_notes = patient_folds(patients, y, folds, seed)
    notes += fold_notes
    chance = _chance(y, class_names)
    boot = dict(n_boot=n_boot, seed=seed)
    cv: dict[str, dict[str, Any]] = {}
    oof: dict[tuple[str, str], np.ndarray] = {}
    for clf in CLASSIFIERS:
        cv[clf] = {}
        for g in FEATURE_SETS:
            t0 = time.time()
            pred = oof[(clf, g)] = _oof(clf, x[:, groups[g]], y, cv_folds, seed)
            cv[clf][g] = bootstrap_scores(y, pred, patients, len(class_names), **boot)
            log(f"[audit-data] CV {clf:<8} {g:<9} accuracy {cv[clf][g]['accuracy']:.3f} balanced "
                 f"{cv[clf][g]['balanced_accuracy']:.3f} ({time.time() - t0:.1f} s)", progress)
    best_clf, best_g = max(((c, g) for c in CLASSIFIERS for g in FEATURE_SETS),
                           key=lambda cg: cv[cg[0]][cg[1]]["balanced_accuracy"])
    # The best of several combinations is optimistic: its interval for the verdict is Bonferroni-adjusted.
    n_comb = len(CLASSIFIERS) * len(FEATURE_SETS)
    adj = bootstrap_scores(y, oof[(best_clf, best_g)], patients, len(class_names), n_boot=max(n_boot, 4000),
                           seed=seed, confidence=1 - 0.05 / n_comb)
    best = {"classifier": best_clf, "group": best_g, **cv[best_clf][best_g], "n_comparisons": n_comb,
            "adjusted_confidence": 1 - 0.05 / n_comb, "accuracy_ci_adjusted": adj["accuracy_ci"],
            "balanced_accuracy_ci_adjusted": adj["balanced_accuracy_ci"]}

    univariate = []
    for j, nm in enumerate(names):
        pred = _oof("tree", x[:, [j]], y, cv_folds, seed)
        s = bootstrap_scores(y, pred, patients, len(class_names), n_boot=1, seed=seed)
        univariate.append({"feature": nm, "group": shortcuts.feature_group(nm), "accuracy": s["accuracy"],
                           "balanced_accuracy": s["balanced_accuracy"]})
    univariate.sort(key=lambda r: (-r["balanced_accuracy"], -r["accuracy"], r["feature"]))
    log(f"[audit-data] most predictive statistic: {univariate[0]['feature']} "
         f"(balanced accuracy {univariate[0]['balanced_accuracy']:.3f})", progress)

    pos = {int(r): i for i, r in enumerate(used)}  # record index -> row of x
    tr = np.asarray([pos[int(r)] for r in np.concatenate([splits["train"], splits["val"]]) if int(r) in pos], np.int64)
    te = np.asarray([pos[int(r)] for r in splits["test"] if int(r) in pos], np.int64)
    held_out: dict[str, Any] = {"val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": split_seed,
                                "manifest_split": getattr(ds, "split_column", None) is not None,
                                "n_train": int(len(tr)), "n_test": int(len(te)),
                                "test_patients": sorted(set(patients[te].tolist())), "classifiers": {}}
    if len(te) and len(tr):
        held_out["chance"] = _chance(y[te], class_names)
        for clf in CLASSIFIERS:
            held_out["classifiers"][clf] = {}
            for g in FEATURE_SETS:
                pred = _fit_predict(clf, x[tr][:, groups[g]], y[tr], x[te][:, groups[g]], seed)
                held_out["classifiers"][clf][g] = bootstrap_scores(y[te], pred, patients[te], len(class_names), **boot)
        log(f"[audit-data] held-out split: {len(tr)} train+val frames -> {len(te)} test frames "
             f"({len(held_out['test_patients'])} patients)", progress)
    else:
        notes.append("the fixed split has an empty train or test side: no held-out scores")

    blind: dict[str, Any] | None = None
    fig_maps = None
    if ds.has_masks and is_volume:
        notes.append("volumes: class-blind maps are 2D only and were not scored")
    elif ds.has_masks:
        map_idx = np.arange(n, dtype=np.int64) if map_split == "all" else np.asarray(splits[map_split], np.int64)
        blind, fig_maps = _blind_maps(ds, map_idx, valid, score_valid, max_map_images, seed, progress)
        blind["split"] = map_split
    else:
        notes.append("no masks: class-blind maps not scored")

    report: dict[str, Any] = {
        "source": getattr(ds, "path", ""), "class_names": class_names,
        "n_frames": int(n), "n_used": int(len(used)),
        "n_nondiagnostic_dropped": None if diagnostic is None else int(n - len(used)),
        "n_patients": int(len(np.unique(patients))),
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(class_names)},
        "class_patients": {c: int(len(np.unique(patients[y == i]))) for i, c in enumerate(class_names)},
        "image_size": [int(s) for s in first_shape[:len(first_shape) - 1]], "fov": fov,
        "features": list(names), "feature_groups": {g: [names[i] for i in ix] for g, ix in groups.items() if g != "all"},
        "spectrum_band_edges": [float(e) for e in edges],
        "cv": {"k": k_used, "k_requested": int(folds), "seed": seed, "n_boot": n_boot,
               "folds": [{"test_patients": sorted(set(patients[te_].tolist())), "n_test": int(len(te_))}
                         for _, te_ in cv_folds],
               "classifiers": cv},
        "chance": chance, "best": best, "univariate": univariate, "held_out": held_out, "blind_maps": blind,
        "notes": notes,
    }
    report["verdict"] = verdict(best, chance, univariate)
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "audit.json"), "md": os.path.join(out_dir, "audit.md"),
             "figure": os.path.join(out_dir, "audit.png")}
    _summary_figure(report, files["figure"])
    if fig_maps is not None and figure_images > 0:
        files["maps_figure"] = os.path.join(out_dir, "audit_maps.png")
        _maps_figure(fig_maps, class_names, figure_images, files["maps_figure"])
    report["files"] = {k: os.path.basename(p) for k, p in files.items()}
    report["seconds"] = round(time.time() - t_start, 1)
    with open(files["md"], "w") as f:
        f.write(format_audit(report) + "\n")
    tmp = files["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, files["json"])
    log(f"[audit-data] {report['verdict']['level']}: written {out_dir} in {report['seconds']:.0f} s", progress)
    return report


# ------------------------------------------------------------------------ reporting


def _num(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, ``–`` for None."""
    return "–" if v is None else f"{v:.{digits}f}"


def _cell(s: Mapping[str, Any], key: str) -> str:
    """``0.953 [0.912, 0.981]``."""
    lo, hi = s[f"{key}_ci"]
    return f"{s[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _score_tables(by_clf: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Two Markdown tables (accuracy, balanced accuracy): rows feature sets, columns classifiers."""
    lines = []
    for key, title in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy")):
        lines += ["", f"{title}:", "", "| features | " + " | ".join(CLASSIFIERS) + " |",
                  "|---|" + "---|" * len(CLASSIFIERS)]
        for g in FEATURE_SETS:
            n_feat = sum(len(v) for v in groups.values()) if g == "all" else len(groups[g])
            lines.append(f"| {g} ({n_feat}) | " + " | ".join(_cell(by_clf[c][g], key) for c in CLASSIFIERS) + " |")
    return lines


def format_audit(report: Mapping[str, Any], top: int = 10) -> str:
    """The Markdown report of ``audit_dataset``: verdict, data, classifier tables, leading statistics, blind maps."""
    r = report
    ch, groups = r["chance"], r["feature_groups"]
    lines = [f"# Shortcut audit{': ' + r['source'] if r.get('source') else ''}", "", "## Verdict", "",
             r["verdict"]["text"]]
    if r.get("blind_maps"):
        rows = [x for x in r["blind_maps"]["rows"] if x.get("dice@area") is not None]
        if rows:
            b = max(rows, key=lambda x: x["dice@area"])
            lines[-1] += (f" Class-blind maps reach Dice {b['dice@area']:.2f} at the mask's area "
                          f"(`{b['method']}`, {r['blind_maps']['n_evaluated']} {r['blind_maps']['split']} frames): "
                          "a saliency method localises the evidence only where it beats this floor.")
    classes = ", ".join(f"{c} ({r['class_counts'][c]} frames, {r['class_patients'][c]} patients)"
                        for c in r["class_names"])
    lines += ["", "## Data", "",
              f"- frames: {r['n_frames']} ({r['n_used']} used"
              + (f"; {r['n_nondiagnostic_dropped']} non-diagnostic dropped" if r["n_nondiagnostic_dropped"] is not None
                 else "") + f"), {r['n_patients']} patients, {'x'.join(str(s) for s in r['image_size'])} "
              + ("voxels" if len(r["image_size"]) == 3 else "px"),
              f"- classes: {classes}",
              f"- field of view: {r['fov']['description']}",
              f"- cross-validation: patient-wise stratified {r['cv']['k']}-fold (seed {r['cv']['seed']}; no patient "
              "in train and test); 95% intervals: bootstrap over patients "
              f"({r['cv']['n_boot']} replicates)"]
    lines += [f"- note: {nt}" for nt in r["notes"]]
    lines += ["", "## Global-statistics classifiers (patient-wise CV, out-of-fold predictions)", "",
              f"Chance: accuracy {ch['accuracy']:.3f} (always `{ch['majority_class']}`), balanced accuracy "
              f"{ch['balanced_accuracy']:.3f} (1/{ch['n_classes_present']}). Classifiers: `logistic` (standardised "
              "logistic regression), `boosting` (histogram gradient-boosted trees), `knn` (15 nearest neighbours, "
              "standardised)."]
    lines += _score_tables(r["cv"]["classifiers"], groups)
    ho = r["held_out"]
    if ho["classifiers"]:
        src = "the manifest's `split` column" if ho["manifest_split"] else (
            f"val_fraction {ho['val_fraction']}, test_fraction {ho['test_fraction']}, split seed {ho['split_seed']}")
        lines += ["", "## Held-out patients (the trainer's fixed split)", "",
                  f"Train on train+val ({ho['n_train']} frames), test on {ho['n_test']} frames of "
                  f"{len(ho['test_patients'])} patients ({src}). Chance: accuracy {ho['chance']['accuracy']:.3f}, "
                  f"balanced accuracy {ho['chance']['balanced_accuracy']:.3f}."]
        lines += _score_tables(ho["classifiers"], groups)
    lines += ["", f"## Most predictive single statistics (each alone: depth-3 tree, same folds; top {top})", "",
              "| statistic | group | accuracy | balanced accuracy |", "|---|---|---|---|"]
    lines += [f"| `{u['feature']}` | {u['group']} | {u['accuracy']:.3f} | {u['balanced_accuracy']:.3f} |"
              for u in r["univariate"][:top]]
    e = r["spectrum_band_edges"]
    lines += ["", "Spectrum bands (radial frequency, cycles/px; period in px): " + "; ".join(
        f"band{i + 1} [{e[i]:.3f}, {e[i + 1]:.3f}) ({1 / e[i + 1]:.1f}–{1 / e[i]:.1f} px)" for i in range(len(e) - 1))
        + "."]
    bm = r.get("blind_maps")
    lines += ["", "## Class-blind saliency maps vs masks", ""]
    if bm:
        lines += [f"{bm['n_images']} frames of split `{bm['split']}` ({bm['n_evaluated']} with a non-empty mask), "
                  "scored like `lclsc benchmark-cams` (same metrics, same field of view). Maps: `local_std` (7x7 "
                  "local standard deviation), `dog` (difference-of-Gaussians band-pass energy), `centre` (a centred "
                  "Gaussian), `random` (uniform noise).", "",
                  "| map | " + " | ".join(MAP_COLUMNS) + " |", "|---|" + "---|" * len(MAP_COLUMNS)]
        lines += [f"| `{row['method']}` | " + " | ".join(_num(row.get(c)) for c in MAP_COLUMNS) + " |"
                  for row in bm["rows"]]
    elif len(r["image_size"]) == 3:
        lines += ["Not scored here on volumes: `lclsc benchmark-cams` scores the 3D class-blind maps next to a "
                  "trained run's maps."]
    else:
        lines += ["The data have no masks: nothing to score."]
    lines += ["", "## How to read this", "",
              "Accuracies are of held-out patients only. Well above chance from global statistics means the class "
              "can be predicted without the tissue evidence: a model's accuracy on these data does not show that it "
              "learned the evidence. The per-statistic table names what leaks. The blind-map Dice is the floor a "
              "saliency method has to beat before its maps can be said to localise the evidence."]
    return "\n".join(lines)


def _summary_figure(report: Mapping[str, Any], path: str) -> str:
    """``audit.png``: accuracies per classifier x feature set (intervals, chance), top statistics, blind-map scores."""
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2).ravel()
    cv, ch = report["cv"]["classifiers"], report["chance"]
    width = 0.8 / len(CLASSIFIERS)
    xs = np.arange(len(FEATURE_SETS))
    for ax, key, chance, title in ((axes[0], "accuracy", ch["accuracy"], "accuracy"),
                                   (axes[1], "balanced_accuracy", ch["balanced_accuracy"], "balanced accuracy")):
        for i, clf in enumerate(CLASSIFIERS):
            vals = np.asarray([cv[clf][g][key] for g in FEATURE_SETS])
            ci = np.asarray([cv[clf][g][f"{key}_ci"] for g in FEATURE_SETS])
            err = np.clip(np.stack([vals - ci[:, 0], ci[:, 1] - vals]), 0, None)
            ax.bar(xs + (i - (len(CLASSIFIERS) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=clf)
        ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance {chance:.2f}")
        ax.set_xticks(xs)
        ax.set_xticklabels(FEATURE_SETS)
        ax.set_ylim(0, 1.25)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(f"global statistics -> class: {title}\n(patient-wise {report['cv']['k']}-fold CV, 95% CI)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=4)
    top = report["univariate"][:10][::-1]
    ax = axes[2]
    colours = {"histogram": "tab:blue", "spectrum": "tab:orange", "gradient": "tab:green"}
    ax.barh(np.arange(len(top)), [u["balanced_accuracy"] for u in top], color=[colours[u["group"]] for u in top])
    ax.set_yticks(np.arange(len(top)))
    ax.set_yticklabels([u["feature"] for u in top], fontsize=7)
    ax.axvline(ch["balanced_accuracy"], color="k", ls="--", lw=1)
    ax.set_xlim(0, 1.05)
    ax.set_title("single statistics: balanced accuracy (CV)", fontsize=9)
    ax = axes[3]
    bm = report.get("blind_maps")
    if bm:
        cols = ("dice@otsu", "dice@area", "pr_auc")
        names = [r["method"].split(":", 1)[1] for r in bm["rows"]]
        wd = 0.8 / len(cols)
        for i, c in enumerate(cols):
            ax.bar(np.arange(len(names)) + (i - 1) * wd, [r.get(c) or 0.0 for r in bm["rows"]], wd, label=c)
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(names)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
        ax.set_title(f"class-blind maps vs masks ({bm['n_evaluated']} {bm['split']} frames)", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no masks: blind maps not scored", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    best, top1 = report["best"], report["univariate"][0]
    fig.suptitle(f"{report['verdict']['level'].upper()}: best balanced accuracy {best['balanced_accuracy']:.2f} "
                 f"(chance {ch['balanced_accuracy']:.2f}; {best['classifier']} on {best['group']}); "
                 f"top statistic {top1['feature']} ({top1['balanced_accuracy']:.2f})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def _maps_figure(fig_data: Mapping[str, Any], class_names: Sequence[str], k: int, path: str) -> str:
    """``audit_maps.png``: rows = frames (one per class first), columns = image + each blind map, mask outlined."""
    picks = _map_picks(fig_data["labels"], fig_data["masks"].reshape(len(fig_data["masks"]), -1).any(axis=1), k)
    images = shortcuts.to_luminance(fig_data["images"][picks])
    masks = fig_data["masks"][picks]
    names = list(fig_data["maps"])
    ncol = 1 + len(names)
    fig = Figure(figsize=(1.8 * ncol, 1.8 * len(picks) + 0.3))
    axes = fig.subplots(len(picks), ncol, squeeze=False)
    for i, p in enumerate(picks):
        for j in range(ncol):
            ax = axes[i, j]
            ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0)
            if j:
                ax.imshow(fig_data["maps"][names[j - 1]][p], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            if masks[i].any():
                ax.contour(masks[i].astype(float), levels=[0.5], colors="white", linewidths=0.8)
            if i == 0:
                ax.set_title("image" if j == 0 else f"blind:{names[j - 1]}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(f"#{int(fig_data['idx'][p])} {fig_data['patients'][p]}\n"
                              f"{class_names[int(fig_data['labels'][p])]}", fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path
