"""Patient-wise k-fold and leave-one-patient-out cross-validation of a config (``lclsc cv``).

``cross_validate`` trains one run per fold into ``WORKDIR/fold_XX``, predicts its held-out
patients and writes ``fold_XX/metrics.json`` (the fold's completion mark) and
``fold_XX/predictions.npz``; a restarted CV skips finished folds and resumes an interrupted one
from its last checkpoint. ``WORKDIR/cv_summary.json`` holds per-fold metrics, their
mean/std/95% CI (``aggregate_folds``) and metrics of the pooled predictions. See
``docs/protocols.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lclsc_jax import data, evaluate
from lclsc_jax.evaluate import plots
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop
from lclsc_jax.train.config import Config, to_dict
from lclsc_jax.train.reporting import log

__all__ = ["SCALAR_KEYS", "cross_validate", "cv_folds", "fold_name", "fold_splits", "format_ci", "format_cv_summary",
           "summarize_folds", "write_cv_figures"]

SCALAR_KEYS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auroc",
               "ece", "patient_accuracy")
CV_CONFIG = "cv_config.json"
CV_SUMMARY = "cv_summary.json"
FOLD_METRICS = "metrics.json"
FOLD_PREDICTIONS = "predictions.npz"


def cv_folds(patients: Any, labels: Any = None, folds: int = 5, lopo: bool = False,
             seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-wise ``(train_idx, test_idx)`` record indices: stratified k-fold, or one patient per fold."""
    if lopo:
        return data.leave_one_patient_out(patients)
    return data.patient_kfold(patients, int(folds), seed=seed, labels=labels)


def fold_splits(patients: Any, labels: Any, train_idx: np.ndarray, test_idx: np.ndarray, nested: bool = False,
                val_fraction: float = 0.15, seed: int = 0) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` of one fold; ``nested`` holds out a patient-wise, stratified val slice of train.

    Without ``nested`` the val split is empty: every training patient trains, and no checkpoint
    is selected (the fold is evaluated at its last step).
    """
    train_idx = np.asarray(train_idx, np.int64)
    test_idx = np.asarray(test_idx, np.int64)
    if not nested:
        splits = {"train": train_idx, "val": np.zeros(0, np.int64), "test": test_idx}
    else:
        labels_t = None if labels is None else np.asarray(labels)[train_idx]
        inner = data.patient_split(np.asarray(patients)[train_idx], labels_t, val_fraction=val_fraction,
                                   test_fraction=0.0, seed=seed)
        if len(inner["val"]) == 0:
            raise ValueError("nested CV: the training patients of a fold are too few to hold out a validation "
                             f"patient (val_fraction={val_fraction}); use more patients or folds=None")
        splits = {"train": train_idx[inner["train"]], "val": train_idx[inner["val"]], "test": test_idx}
    data.check_disjoint(patients, splits)
    return splits


def fold_name(k: int) -> str:
    """Directory name of fold ``k``: ``fold_00``, ``fold_01``, ..."""
    return f"fold_{k:02d}"


def _predict_fold(fold_dir: str, ds: Any, test_idx: np.ndarray, which: str) -> tuple[dict[str, np.ndarray], int]:
    """Predictions ``{probs (N, C), label, index, patient (N,)}`` of a fold's run on its test records."""
    run = runs.load_run(fold_dir, which)
    res = runs.predict(run, ds, test_idx)
    return {k: res[k] for k in ("probs", "label", "index", "patient")}, run.step


def scalars(m: Mapping[str, Any]) -> dict[str, Any]:
    """The headline scalar metrics of a ``classification_metrics`` result (None where undefined)."""
    return {k: m.get(k) for k in SCALAR_KEYS if k in m}


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, np.ndarray]],
                    class_names: Sequence[str], confidence: float = 0.95) -> dict[str, Any]:
    """Per-fold scalars, their mean/std/CI (``aggregate_folds``) and metrics of all folds' pooled predictions.

    The per-fold t-interval treats the folds as independent; their training sets overlap, so it is
    too narrow (Nadeau & Bengio 2003). For an interval that includes the patients, bootstrap the
    pooled predictions over patients and frames (``evaluate.statistics.hierarchical_bootstrap``).

    ``predictions[k]`` holds ``probs (N_k, C)``, ``label (N_k,)`` and ``patient (N_k,)``. Folds where a
    metric is undefined (e.g. AUROC of a one-class LOPO fold) are left out of its statistics;
    the pooled metrics are always defined when the pooled labels have two classes.
    """
    if len(fold_metrics) != len(predictions) or not fold_metrics:
        raise ValueError(f"need one prediction set per fold, got {len(fold_metrics)} metrics and "
                         f"{len(predictions)} predictions")
    agg = evaluate.aggregate_folds(list(fold_metrics), confidence=confidence)
    probs = np.concatenate([np.asarray(p["probs"]) for p in predictions])
    labels = np.concatenate([np.asarray(p["label"]) for p in predictions])
    patients = np.concatenate([np.asarray(p["patient"]).astype(str) for p in predictions])
    pooled = evaluate.classification_metrics(labels, probs, class_names=list(class_names), patients=patients)
    undefined = [i for i, m in enumerate(fold_metrics) if m.get("auroc") is None]
    notes = []
    if undefined:
        notes.append(f"AUROC undefined in {len(undefined)} of {len(fold_metrics)} folds (one class in the test "
                     "fold); its mean is over the other folds, see pooled.auroc")
    return {
        "n_folds": len(fold_metrics),
        "folds": [{"fold": i, **scalars(m)} for i, m in enumerate(fold_metrics)],
        "mean": {k: v["mean"] for k, v in agg["metrics"].items() if k in SCALAR_KEYS},
        "aggregate": agg,
        "pooled": pooled,
        "notes": notes,
    }


def format_cv_summary(summary: Mapping[str, Any]) -> str:
    """A short table of a ``cross_validate`` summary: mean ± std [95% CI] over folds, and pooled values."""
    name = "leave-one-patient-out" if summary.get("protocol") == "lopo" else f"{summary['n_folds']}-fold"
    lines = [f"{name} CV, {summary['n_folds']} folds, {summary.get('n_records', '?')} records "
             f"({summary.get('n_patients', '?')} patients)", f"  {'metric':<18} {'mean ± std [95% CI]':<34} pooled"]
    for k in SCALAR_KEYS:
        s = summary["aggregate"]["metrics"].get(k)
        pooled = summary["pooled"].get(k)
        if s is None:
            continue
        lines.append(f"  {k:<18} {format_ci(s):<34} {'' if pooled is None else f'{pooled:.4f}'}")
    return "\n".join(lines + [f"  note: {n}" for n in summary.get("notes", [])])


def write_cv_figures(summary: Mapping[str, Any], predictions: Sequence[Mapping[str, np.ndarray]],
                class_names: Sequence[str], out_dir: str) -> dict[str, str]:
    """Write ROC per fold (if any fold has two classes) and pooled, per-patient bars, confusion matrix, confidence PNGs.

    Returns ``{figure name: path relative to out_dir}``.
    """
    ys = [np.asarray(p["label"]) for p in predictions]
    ps = [np.asarray(p["probs"]) for p in predictions]
    pooled = summary["pooled"]
    out = {}
    if any(len(np.unique(y)) > 1 for y in ys):  # LOPO folds usually hold one class: no curve to draw
        out["roc_folds"] = plots.roc_curves(ys, ps, os.path.join(out_dir, "roc_folds.png"), class_names=class_names)
    out |= {
        "roc_pooled": plots.roc_curves(np.concatenate(ys), np.concatenate(ps), os.path.join(out_dir, "roc_pooled.png"),
                                       class_names=class_names),
        "confusion_matrix": plots.confusion_matrix_plot(np.asarray(pooled["confusion_matrix"]), class_names,
                                                        os.path.join(out_dir, "confusion_matrix.png")),
        "confidence": plots.confidence_histogram(np.concatenate(ps), np.concatenate(ys),
                                                 os.path.join(out_dir, "confidence.png")),
        "per_patient": plots.per_patient_bars(pooled["per_patient"], os.path.join(out_dir, "per_patient.png")),
    }
    return {k: os.path.relpath(str(v), out_dir) for k, v in out.items()}


def _cv_settings(cfg: Config, ds: Any, folds: list[tuple[np.ndarray, np.ndarray]], lopo: bool, nested: bool,
                 seed: int) -> dict[str, Any]:
    """What identifies a CV run (saved as ``cv_config.json``; a restart must match it)."""
    return {"protocol": "lopo" if lopo else "kfold", "n_folds": len(folds), "nested": bool(nested),
            "seed": int(seed), "n_records": int(len(ds.labels)), "class_names": list(ds.class_names),
            "test_patients": [sorted(set(map(str, ds.patients[te]))) for _, te in folds],
            "config": to_dict(cfg)}


def _check_settings(workdir: str, settings: dict[str, Any]) -> None:
    """Write ``cv_config.json``, or raise if the workdir holds a CV run made with other settings."""
    path = os.path.join(workdir, CV_CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != json.loads(json.dumps(settings)):
            diff = sorted(k for k in settings if saved.get(k) != json.loads(json.dumps(settings[k])))
            raise ValueError(f"{workdir} holds a cross-validation run with other settings (differs in {diff}); "
                             "resume it with the same config/folds/seed or pick a new workdir")
    else:
        loop.write_json(path, settings)


def _load_fold(fold_dir: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """A finished fold's ``(metrics, predictions)``, or None when it has not finished."""
    mpath, ppath = os.path.join(fold_dir, FOLD_METRICS), os.path.join(fold_dir, FOLD_PREDICTIONS)
    if not (os.path.exists(mpath) and os.path.exists(ppath)):
        return None
    with open(mpath) as f:
        metrics = json.load(f)
    with np.load(ppath) as z:
        preds = {k: z[k] for k in z.files}
    return metrics, preds


def _run_fold(cfg: Config, ds: Any, fold_dir: str, splits: dict[str, np.ndarray], which: str,
              progress: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train (or resume) one fold, predict its test records, write predictions then metrics."""
    loop.train(cfg, fold_dir, splits=splits, dataset=ds, progress=progress)
    preds, step = _predict_fold(fold_dir, ds, splits["test"], which)
    metrics = evaluate.classification_metrics(preds["label"], preds["probs"], class_names=list(ds.class_names),
                                              patients=preds["patient"])
    metrics.update(checkpoint=which, checkpoint_step=step, test_patients=sorted(set(map(str, preds["patient"]))),
                   n_train=int(len(splits["train"])), n_val=int(len(splits["val"])))
    if jax.process_index() == 0:
        tmp = os.path.join(fold_dir, "predictions.tmp.npz")
        np.savez(tmp, probs=preds["probs"], label=preds["label"], index=preds["index"],
                 patient=np.asarray(preds["patient"]).astype(str))
        os.replace(tmp, os.path.join(fold_dir, FOLD_PREDICTIONS))
    loop.write_json(os.path.join(fold_dir, FOLD_METRICS), metrics)  # written last: the fold's completion mark
    return metrics, preds


def cross_validate(cfg: Config, workdir: str, folds: int | None = 5, lopo: bool = False, nested: bool = False,
                   seed: int | None = None, dataset: Any = None, progress: bool = True,
                   figures: bool = True) -> dict[str, Any]:
    """Patient-wise k-fold (``folds``) or leave-one-patient-out (``lopo``) CV of ``cfg``; returns the summary.

    Fold ``k`` trains in ``workdir/fold_XX`` (resumed if interrupted, skipped if its
    ``metrics.json`` exists). ``nested`` holds out ``cfg.data.val_fraction`` of each fold's
    training patients for best-checkpoint selection; otherwise all training patients train and
    the last checkpoint is evaluated. ``seed`` drives the fold and inner-split assignment
    (default: the config's ``data.split_seed``, so a repeated CV over split seeds is a list of
    configs). Writes ``workdir/cv_summary.json`` and, with ``figures``, PNGs in ``workdir/figures``.
    """
    if not lopo and (folds is None or int(folds) < 2):
        raise ValueError(f"folds must be >= 2 for k-fold CV (or pass lopo=True), got {folds}")
    seed = int(cfg.data.split_seed if seed is None else seed)
    ds = dataset if dataset is not None else loop.load_dataset(cfg)
    fold_list = cv_folds(ds.patients, ds.labels, folds or 0, lopo, seed)
    os.makedirs(workdir, exist_ok=True)
    _check_settings(workdir, _cv_settings(cfg, ds, fold_list, lopo, nested, seed))
    which = "best" if nested else "latest"
    name = "leave-one-patient-out" if lopo else f"{len(fold_list)}-fold"
    metrics_all: list[dict[str, Any]] = []
    preds_all: list[dict[str, np.ndarray]] = []
    for k, (train_idx, test_idx) in enumerate(fold_list):
        fold_dir = os.path.join(workdir, fold_name(k))
        done = _load_fold(fold_dir)
        if done is not None:
            log(f"[cv] {name} fold {k + 1}/{len(fold_list)}: finished earlier, skipped", progress)
        else:
            splits = fold_splits(ds.patients, ds.labels, train_idx, test_idx, nested, cfg.data.val_fraction, seed)
            test_p = sorted(set(map(str, ds.patients[test_idx])))
            log(f"[cv] {name} fold {k + 1}/{len(fold_list)}: {len(splits['train'])} train / {len(splits['val'])} "
                 f"val / {len(test_idx)} test records; test patients {test_p}", progress)
            done = _run_fold(cfg, ds, fold_dir, splits, which, progress)
            log(f"[cv] fold {k + 1}/{len(fold_list)}: accuracy {done[0]['accuracy']:.4f}", progress)
        metrics_all.append(done[0])
        preds_all.append(done[1])
    summary = summarize_folds(metrics_all, preds_all, ds.class_names)
    summary.update(protocol="lopo" if lopo else "kfold", nested=bool(nested), seed=int(seed), checkpoint=which,
                   class_names=list(ds.class_names), n_records=int(sum(len(p["label"]) for p in preds_all)),
                   n_patients=int(len(np.unique(ds.patients))))
    for entry, m in zip(summary["folds"], metrics_all):
        entry.update(workdir=fold_name(entry["fold"]), test_patients=m.get("test_patients"), n_test=m.get("n"),
                     checkpoint_step=m.get("checkpoint_step"))
    if figures and jax.process_index() == 0:
        summary["figures"] = write_cv_figures(summary, preds_all, ds.class_names, os.path.join(workdir, "figures"))
    loop.write_json(os.path.join(workdir, CV_SUMMARY), summary)
    mean = summary["mean"]
    log(f"[cv] {name}: mean accuracy {mean.get('accuracy', float('nan')):.4f}; pooled accuracy "
         f"{summary['pooled']['accuracy']:.4f}, pooled AUROC {summary['pooled']['auroc']}", progress)
    return summary

def format_ci(s: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """``mean ± std [ci_low, ci_high]`` (just the mean with one value; ``–`` when missing); ``signed``: ``+0.1``."""
    if not s or s.get("mean") is None:
        return "–"
    f = f"{'+' if signed else ''}.{digits}f"
    if s.get("std") is None:
        return format(s["mean"], f)
    return f"{format(s['mean'], f)} ± {s['std']:.{digits}f} [{format(s['ci_low'], f)}, {format(s['ci_high'], f)}]"
