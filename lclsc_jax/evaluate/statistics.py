"""Intervals that include the data: a hierarchical bootstrap over patients and frames (NumPy, host side).

The unit of an ablation is a *replicate*: one trained model per (split seed, training seed), each
scoring frames of patients. ``outcomes (R, N)`` holds one number per replicate ``r`` and frame
``f`` (a frame's correctness, its Dice at the mask's area, its ROAD gap, ...), NaN where frame
``f`` was not scored in replicate ``r`` (not in its test split, or undefined there, e.g. an
empty mask). The statistic is the **replicate average of per-replicate frame means**,

    T = mean_r [ sum_f w_f M_rf X_rf / sum_f w_f M_rf ],     M_rf = [X_rf observed],

with ``w_f = 1`` for the data as observed. A bootstrap resample draws new weights ``w``:

* ``levels="patients+frames"`` (default; the two-level bootstrap of Davison & Hinkley 1997,
  section 3.8, and Saravanan et al. 2020): draw the patients with replacement (within each
  class when ``strata`` is given, so every resample keeps the class mix), then, for each drawn
  copy of a patient, draw its ``n_p`` frames with replacement. Frames of one patient are not
  independent (same tissue, same probe pass); this is what a frame-level bootstrap ignores.
  Resampling at both levels slightly overstates the variance (the within-patient spread is
  counted twice in small patients), so the interval errs on the wide side.
* ``levels="patients"``: patients only (each drawn patient brings all its frames).
* ``levels="frames"``: frames independently (the plain bootstrap; too narrow when patients differ).

A copy of patient ``p`` drawn ``c_p`` times brings ``Multinomial(c_p * n_p, 1/n_p)`` frame counts
(a sum of independent multinomials with equal cell probabilities), so a whole block of
resamples is drawn with one ``Generator.multinomial`` call per patient: no loop over resamples.
The interval is the percentile interval of ``T`` over the resamples.

What is and is not in the interval. Patients and frames are resampled; the replicates are
averaged, not resampled (unless ``resample_replicates=True``): the interval answers "how much
would this replicate-averaged number move with other patients and frames, for these trained
models". The training variance is measured across independent repeats instead: ``t_interval``
over replicate units (independent training seeds) is a valid Student-t interval for that
question. A t-interval over the folds of one cross-validation is not (the folds' training sets
overlap, so fold scores are correlated and the interval is too narrow; Nadeau & Bengio 2003),
nor is one over frames of the same patients.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "LEVELS",
    "bootstrap_by_class",
    "bootstrap_weights",
    "detectable_difference",
    "hierarchical_bootstrap",
    "INTERVAL_METRICS",
    "metric_intervals",
    "paired_bootstrap",
    "patient_labels",
    "t_interval",
    "weighted_classification_metrics",
]

#: What a resample draws: patients then frames within them, patients only, or frames only.
LEVELS = ("patients+frames", "patients", "frames")
_CHUNK_CELLS = 1 << 22  # weights of at most ~4M (resample, frame) cells in memory at once


# ------------------------------------------------------------------------------ inputs


def _as_outcomes(outcomes: Any) -> np.ndarray:
    """``(R, N)`` float64 from ``(N,)`` or ``(R, N)``."""
    x = np.asarray(outcomes, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"outcomes must have shape (N,) or (R, N) with N >= 1, got {np.shape(outcomes)}")
    if np.isinf(x).any():
        raise ValueError("outcomes contain inf; use NaN for frames that were not scored")
    return x


def _ids(values: Any, n: int, name: str) -> np.ndarray:
    """``(n,)`` array of string ids."""
    a = np.asarray(values)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one per frame), got {a.shape}")
    return a.astype(str)


def _check_settings(n_boot: int, confidence: float, levels: str) -> None:
    """Validate the common bootstrap settings."""
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")


def patient_labels(patients: Any, labels: Any) -> np.ndarray:
    """``(N,)`` int64: the majority label of each frame's patient (``patients``, ``labels`` ``(N,)``; ties -> lower)."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iub":
        raise ValueError(f"labels must be integer class indices of shape (N,), got {lab.shape} {lab.dtype}")
    pat = _ids(patients, lab.shape[0], "patients")
    _, inv = np.unique(pat, return_inverse=True)
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError("labels must be >= 0")
    counts = np.zeros((inv.max() + 1 if inv.size else 0, (lab.max() + 1) if lab.size else 1), np.int64)
    np.add.at(counts, (inv, lab), 1)
    return counts.argmax(axis=1)[inv]


# ------------------------------------------------------------------------------ weights


def _groups(pidx: np.ndarray, n_patients: int, strata: np.ndarray | None) -> list[np.ndarray]:
    """Patient indices of each stratum (one group without strata)."""
    if strata is None:
        return [np.arange(n_patients)]
    first = np.unique(pidx, return_index=True)[1]  # a frame of each patient (strata are per patient here)
    pstrat = strata[first]
    return [np.flatnonzero(pstrat == s) for s in np.unique(pstrat)]


def _weight_blocks(patients: np.ndarray, n_boot: int, rng: np.random.Generator, levels: str,
                   strata: np.ndarray | None) -> Iterator[np.ndarray]:
    """Blocks ``(b, N)`` of resampling weights, ``n_boot`` rows in all, bounded in memory."""
    n = patients.shape[0]
    uniq, pidx = np.unique(patients, return_inverse=True)
    n_pat = len(uniq)
    if strata is not None:  # one stratum per patient: its majority stratum
        strata = patient_labels(patients, np.unique(strata, return_inverse=True)[1])
    members = [np.flatnonzero(pidx == p) for p in range(n_pat)]
    groups = _groups(pidx, n_pat, strata)
    frame_groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    block = max(1, min(n_boot, _CHUNK_CELLS // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(block, n_boot - done)
        w = np.zeros((b, n), np.float64)
        if levels == "frames":
            for g in frame_groups:
                w[:, g] = rng.multinomial(len(g), np.full(len(g), 1.0 / len(g)), size=b)
        else:
            counts = np.zeros((b, n_pat), np.int64)
            for g in groups:
                counts[:, g] = rng.multinomial(len(g), np.full(len(g), 1.0 / len(g)), size=b)
            if levels == "patients":
                w[:] = counts[:, pidx]
            else:
                for p, f in enumerate(members):
                    w[:, f] = rng.multinomial(counts[:, p] * len(f), np.full(len(f), 1.0 / len(f)))
        done += b
        yield w


def bootstrap_weights(patients: Any, n_boot: int, seed: int | np.random.Generator = 0,
                      levels: str = "patients+frames", strata: Any = None) -> np.ndarray:
    """Resampling weights ``(n_boot, N)`` (how often each frame is drawn) for frames of ``patients (N,)``.

    ``levels``: see :data:`LEVELS`; ``strata (N,)`` (e.g. labels): patients (or frames) are drawn
    within each stratum, a patient's stratum being its frames' majority. Row sums are ``N`` when
    every patient has the same number of frames.
    """
    _check_settings(n_boot, 0.5, levels)
    pat = np.asarray(patients).astype(str)
    if pat.ndim != 1 or pat.size == 0:
        raise ValueError(f"patients must have shape (N,) with N >= 1, got {pat.shape}")
    st = None if strata is None else _ids(strata, pat.size, "strata")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return np.concatenate(list(_weight_blocks(pat, int(n_boot), rng, levels, st)))


# ---------------------------------------------------------------------------- bootstrap


def _replicate_means(x: np.ndarray, mask: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(b, R)`` weighted frame means of each replicate under weights ``w (b, N)``; NaN without weight."""
    num = w @ np.where(mask, x, 0.0).T
    den = w @ mask.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _average_replicates(means: np.ndarray, rep_w: np.ndarray | None) -> np.ndarray:
    """``(b,)`` average over replicates (NaN-aware), optionally weighted by resampled replicate counts."""
    ok = np.isfinite(means)
    w = ok.astype(np.float64) if rep_w is None else rep_w * ok
    tot = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, (np.where(ok, means, 0.0) * w).sum(axis=1) / np.where(tot > 0, tot, 1.0), np.nan)


def hierarchical_bootstrap(outcomes: Any, patients: Any, *, n_boot: int = 2000, confidence: float = 0.95,
                           seed: int = 0, levels: str = "patients+frames", strata: Any = None,
                           resample_replicates: bool = False) -> dict[str, Any]:
    """Percentile bootstrap interval of the replicate-averaged frame mean of ``outcomes (N,) | (R, N)``.

    ``patients (N,)``: the patient of each frame; NaN outcomes are frames not scored in that
    replicate. Resampling as the module docstring says (``levels``, ``strata``); with
    ``resample_replicates`` the replicate units are drawn with replacement as well (a crossed
    design; crude with few replicates). Returns ``{estimate, ci_low, ci_high, se, confidence,
    n_boot, n_valid, n_replicates, n_patients, n_frames, levels, stratified, resample_replicates}``
    (plain Python; ``estimate``/interval None when nothing was observed). ``se`` is the standard
    deviation of the resampled statistic; ``n_valid`` counts the resamples where it was defined.
    """
    _check_settings(n_boot, confidence, levels)
    x = _as_outcomes(outcomes)
    r, n = x.shape
    pat = _ids(patients, n, "patients")
    st = None if strata is None else _ids(strata, n, "strata")
    mask = np.isfinite(x)
    seen = mask.any(axis=0)
    out: dict[str, Any] = {"estimate": None, "ci_low": None, "ci_high": None, "se": None,
                           "confidence": float(confidence), "n_boot": int(n_boot), "n_valid": 0,
                           "n_replicates": int(mask.any(axis=1).sum()), "n_patients": int(len(np.unique(pat[seen]))),
                           "n_frames": int(seen.sum()), "levels": levels, "stratified": st is not None,
                           "resample_replicates": bool(resample_replicates)}
    if not seen.any():
        return out
    x, mask, pat = x[:, seen], mask[:, seen], pat[seen]  # frames never scored carry no information
    st = None if st is None else st[seen]
    est = _average_replicates(_replicate_means(x, mask, np.ones((1, x.shape[1]))), None)[0]
    rng = np.random.default_rng(seed)
    rep_w = None
    if resample_replicates:
        rep_w = rng.multinomial(r, np.full(r, 1.0 / r), size=int(n_boot)).astype(np.float64)
    stats_, start = [], 0
    for w in _weight_blocks(pat, int(n_boot), rng, levels, st):
        rw = None if rep_w is None else rep_w[start:start + len(w)]
        stats_.append(_average_replicates(_replicate_means(x, mask, w), rw))
        start += len(w)
    boot = np.concatenate(stats_)
    boot = boot[np.isfinite(boot)]
    alpha = 1.0 - confidence
    out.update(estimate=float(est), n_valid=int(boot.size))
    if boot.size:
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        out.update(ci_low=float(lo), ci_high=float(hi), se=float(boot.std(ddof=1)) if boot.size > 1 else 0.0)
    return out


def paired_bootstrap(a: Any, b: Any, patients: Any, **kwargs: Any) -> dict[str, Any]:
    """Bootstrap of ``a - b`` on the same frames and replicates (``(N,)`` or ``(R, N)`` each): paired by frame.

    Pairs where either side is NaN are dropped. Returns ``hierarchical_bootstrap``'s dict of the
    difference plus ``mean_a`` and ``mean_b`` (replicate-averaged means on the paired frames) and
    ``detectable`` (``detectable_difference`` of its standard error at its confidence, 80% power).
    Keyword arguments go to ``hierarchical_bootstrap``.
    """
    xa, xb = _as_outcomes(a), _as_outcomes(b)
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same shape (same replicates and frames), got {xa.shape} and "
                         f"{xb.shape}")
    both = np.isfinite(xa) & np.isfinite(xb)
    d = np.where(both, xa - xb, np.nan)
    res = hierarchical_bootstrap(d, patients, **kwargs)
    res["detectable"] = None if res["se"] is None else detectable_difference(res["se"], res["confidence"])
    ones = np.ones((1, xa.shape[1]))
    res["mean_a"] = res["mean_b"] = None
    if both.any():
        res["mean_a"] = float(_average_replicates(_replicate_means(np.where(both, xa, 0), both, ones), None)[0])
        res["mean_b"] = float(_average_replicates(_replicate_means(np.where(both, xb, 0), both, ones), None)[0])
    return res


def bootstrap_by_class(outcomes: Any, patients: Any, labels: Any, *, paired_with: Any = None,
                       **kwargs: Any) -> dict[int, dict[str, Any]]:
    """Per class ``c``: the bootstrap restricted to the frames of patients whose majority label is ``c``.

    ``labels (N,)`` int. With ``paired_with`` (same shape as ``outcomes``) each entry is the paired
    difference ``outcomes - paired_with`` (``paired_bootstrap``), else ``hierarchical_bootstrap``.
    Keyword arguments go to the bootstrap (``strata`` is not used: one class per subset).
    """
    x = _as_outcomes(outcomes)
    pl = patient_labels(patients, labels)
    pat = _ids(patients, x.shape[1], "patients")
    kwargs.pop("strata", None)
    out: dict[int, dict[str, Any]] = {}
    for c in np.unique(pl):
        sel = pl == c
        if paired_with is None:
            out[int(c)] = hierarchical_bootstrap(x[:, sel], pat[sel], **kwargs)
        else:
            out[int(c)] = paired_bootstrap(x[:, sel], _as_outcomes(paired_with)[:, sel], pat[sel], **kwargs)
    return out


def detectable_difference(se: float, confidence: float = 0.95, power: float = 0.8) -> float:
    """The smallest true difference a two-sided test at ``1 - confidence`` finds with probability ``power``.

    ``(z_{1-(1-confidence)/2} + z_{power}) * se`` for an estimate with standard error ``se`` and a
    normal sampling distribution: 2.80 ``se`` at 95% / 80% (the minimum detectable effect of a
    study; Bloom 1995). An interval that includes 0 rules out differences larger than about this,
    not the difference itself.
    """
    if not 0 < confidence < 1 or not 0 < power < 1:
        raise ValueError(f"confidence and power must be in (0, 1), got {confidence} and {power}")
    if not se >= 0:
        raise ValueError(f"se must be >= 0, got {se}")
    return float((stats.norm.ppf(1 - (1 - confidence) / 2) + stats.norm.ppf(power)) * se)


# ------------------------------------------------------------------------ t-intervals


def t_interval(values: Any, confidence: float = 0.95) -> dict[str, Any]:
    """Mean, std (ddof=1) and Student-t interval of ``values (n,)``: valid for *independent* repeats only.

    Right for independent training seeds of one configuration (the training variance on fixed
    data). Not for the folds of one cross-validation (overlapping training sets: too narrow) nor
    for frames of the same patients (use ``hierarchical_bootstrap``). NaNs are dropped; with one
    value ``std`` and the interval are None.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    out: dict[str, Any] = {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": int(v.size)}
    if v.size == 0:
        return out
    out["mean"] = float(v.mean())
    if v.size > 1:
        std = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, df=v.size - 1)) * std / math.sqrt(v.size)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out



# ------------------------------------------------------------ classification under resampling


def _weighted_auc(score: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(B,)`` weighted ROC AUC of ``score (N,)`` for ``positive (N,)`` under weights ``w (B, N)`` (ties count 1/2)."""
    order = np.argsort(score, kind="stable")
    s, pos, ws = score[order], positive[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    wp = np.add.reduceat(ws * pos, starts, axis=1)  # (B, G) positive weight per score group
    wn = np.add.reduceat(ws * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each group
    num = (wp * (below + 0.5 * wn)).sum(1)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_classification_metrics(probs: Any, labels: Any, weights: Any) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro F1 and macro one-vs-rest AUROC ``(B,)`` under frame weights ``(B, N)``.

    ``probs (N, K)``, ``labels (N,)`` int in ``[0, K)``; ``weights`` e.g. ``bootstrap_weights`` (a row
    of ones gives the plain metrics). Each equals scikit-learn's metric with ``sample_weight`` (the
    tests' oracle): classes absent under a resample's weights are left out of the macro averages
    (NaN when none is left); F1 of a class never predicted nor present is left out as well.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    if p.ndim != 2 or y.shape != (p.shape[0],) or w.shape[1] != p.shape[0]:
        raise ValueError(f"need probs (N, K), labels (N,), weights (B, N); got {p.shape}, {y.shape}, {w.shape}")
    pred = p.argmax(1)
    tot = w.sum(1)
    out = {"accuracy": (w * (pred == y)).sum(1) / tot}
    rec, f1, auc = [], [], []
    for c in range(p.shape[1]):
        t, q = y == c, pred == c
        tp, n_true, n_pred = (w * (t & q)).sum(1), (w * t).sum(1), (w * q).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rec.append(np.where(n_true > 0, tp / np.where(n_true > 0, n_true, 1.0), np.nan))
            f1.append(np.where(n_true + n_pred > 0, 2 * tp / np.where(n_true + n_pred > 0, n_true + n_pred, 1.0),
                               np.nan))
        auc.append(_weighted_auc(p[:, c], t, w))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no class left: NaN
        out["balanced_accuracy"] = np.nanmean(np.stack(rec, 1), 1)
        out["f1"] = np.nanmean(np.stack(f1, 1), 1)
        out["auroc"] = np.nanmean(np.stack(auc, 1), 1)
    return out


#: The metrics :func:`metric_intervals` gives intervals for (keys of :func:`weighted_classification_metrics`).
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc")


def metric_intervals(probs: Any, labels: Any, patients: Any, *, n_boot: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Patient-bootstrap intervals of accuracy, balanced accuracy, macro F1 and macro AUROC.

    ``probs (N, C)``, ``labels (N,)``, ``patients (N,)``: resampling weights from
    :func:`bootstrap_weights` (patients within their class, then frames within patients), the metrics
    from :func:`weighted_classification_metrics`, percentile intervals. Returns ``{metric: {estimate,
    ci_low, ci_high}}`` (None where undefined). Memory is bounded: weights are drawn in blocks.
    """
    _check_settings(n_boot, confidence, "patients+frames")
    p, y = np.asarray(probs, np.float64), np.asarray(labels, np.int64)
    pat = np.asarray(patients).astype(str)
    point = weighted_classification_metrics(p, y, np.ones((1, len(y))))
    rng = np.random.default_rng(seed)
    block = max(1, min(int(n_boot), _CHUNK_CELLS // max(len(y), 1)))
    parts = [weighted_classification_metrics(p, y, bootstrap_weights(pat, min(block, int(n_boot) - b), seed=rng,
                                                                     strata=y))
             for b in range(0, int(n_boot), block)]
    a = 1.0 - confidence
    out: dict[str, dict[str, float | None]] = {}
    for k in INTERVAL_METRICS:
        b = np.concatenate([q[k] for q in parts])
        b = b[np.isfinite(b)]
        est = float(point[k][0]) if np.isfinite(point[k][0]) else None
        lo, hi = (float(v) for v in np.quantile(b, [a / 2, 1 - a / 2])) if b.size else (None, None)
        out[k] = {"estimate": est, "ci_low": lo, "ci_high": hi}
    return out
