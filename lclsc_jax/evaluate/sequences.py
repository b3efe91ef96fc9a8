"""Frames -> sequences: grouping, sliding windows, aggregators, decision stability, filter scores (NumPy).

A pCLE recording is a sequence of frames of one patient. Records are grouped by ``(patient, sequence)``
and ordered by frame index; a *window* of ``W`` frames is aggregated into one decision:

* ``mean_score``: the mean over the window's kept frames of the frame scores (GEI cosine scores
  ``cos(z, G_c)``, or log-probabilities for a linear-head run); the decision is its argmax.
* ``vote``: a confidence-weighted vote, ``sum_t keep_t * max_c p_t,c * onehot(argmax_c p_t,c)``,
  normalised to sum 1.

A window with no kept frame is *undecided* (scores all NaN, decision ``-1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "AGGREGATORS",
    "aggregate_window",
    "decisions",
    "filter_scores",
    "growing_predictions",
    "sequence_groups",
    "stable_decision_time",
    "window_bounds",
    "window_predictions",
]

#: The window aggregators: mean of frame scores, confidence-weighted vote.
AGGREGATORS = ("mean_score", "vote")


def _keep(keep: np.ndarray | None, t: int) -> np.ndarray:
    """``(T,)`` bool keep flags (all True when ``keep`` is None)."""
    if keep is None:
        return np.ones(t, dtype=bool)
    k = np.asarray(keep, dtype=bool).reshape(-1)
    if k.shape[0] != t:
        raise ValueError(f"keep has {k.shape[0]} entries for {t} frames")
    return k


def aggregate_window(scores: np.ndarray, probs: np.ndarray, keep: np.ndarray | None = None,
                     how: str = "mean_score") -> np.ndarray:
    """(W, C) frame scores and probabilities of one window -> (C,) window scores (all NaN: no kept frame)."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if s.ndim != 2 or p.shape != s.shape:
        raise ValueError(f"scores and probs must both be (W, C), got {s.shape} and {p.shape}")
    k = _keep(keep, s.shape[0])
    c = s.shape[1]
    if not k.any():
        return np.full(c, np.nan)
    if how == "mean_score":
        return s[k].mean(axis=0)
    if how == "vote":
        pk = p[k]
        votes = np.zeros(c)
        np.add.at(votes, pk.argmax(axis=1), pk.max(axis=1))
        total = votes.sum()
        return votes / total if total > 0 else np.full(c, 1.0 / c)
    raise ValueError(f"unknown aggregator {how!r}; choose from {AGGREGATORS}")


def decisions(window_scores: np.ndarray) -> np.ndarray:
    """(..., C) window scores -> (...,) int argmax decisions, -1 where the scores are all NaN (undecided)."""
    w = np.asarray(window_scores, dtype=np.float64)
    undecided = np.isnan(w).all(axis=-1)
    out = np.where(undecided[..., None], -np.inf, np.nan_to_num(w, nan=-np.inf)).argmax(axis=-1)
    return np.where(undecided, -1, out).astype(np.int64)


def sequence_groups(patients: Sequence, sequences: Sequence | None = None,
                    frames: Sequence | None = None) -> list[np.ndarray]:
    """Record indices ``(T_s,)`` of each (patient, sequence), sorted by frame index, in order of first appearance.

    Without sequence information (``sequences is None``) each patient is one sequence, its records in record
    order (sorted by ``frames`` when those are given).
    """
    pats = np.asarray(patients).astype(str)
    n = pats.shape[0]
    seqs = np.zeros(n, dtype=str) if sequences is None else np.asarray(sequences).astype(str)
    if seqs.shape[0] != n:
        raise ValueError(f"{seqs.shape[0]} sequence ids for {n} records")
    order = np.arange(n) if frames is None else np.asarray(frames, dtype=np.int64)
    if order.shape[0] != n:
        raise ValueError(f"{order.shape[0]} frame indices for {n} records")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(pats, seqs)):
        groups.setdefault(key, []).append(i)
    out = []
    for idx in groups.values():
        idx = np.asarray(idx, dtype=np.int64)
        out.append(idx[np.argsort(order[idx], kind="stable")])
    return out


def window_bounds(t: int, window: int, causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Half-open frame ranges ``[lo, hi)`` ``(T,)`` of each position's window.

    Causal: frames ``[t-W+1, t]``; centred: ``[t-W//2, t+W//2]``; both clipped to ``[0, T)``.
    """
    if window < 1:
        raise ValueError(f"a window needs at least 1 frame, got {window}")
    pos = np.arange(t)
    if causal:
        return np.maximum(pos - window + 1, 0), pos + 1
    return np.maximum(pos - window // 2, 0), np.minimum(pos + window // 2 + 1, t)


def _contributions(scores: np.ndarray, probs: np.ndarray, keep: np.ndarray, how: str) -> np.ndarray:
    """(T, C) per-frame terms whose window sum the aggregator normalises (zero for dropped frames)."""
    if how == "mean_score":
        return np.where(keep[:, None], scores, 0.0)
    if how == "vote":
        onehot = np.eye(probs.shape[1])[probs.argmax(axis=1)]
        return onehot * (probs.max(axis=1) * keep)[:, None]
    raise ValueError(f"unknown aggregator {how!r}; choose from {AGGREGATORS}")


def window_predictions(scores: np.ndarray, probs: np.ndarray, keep: np.ndarray | None = None, window: int = 12,
                       causal: bool = True, how: str = "mean_score") -> tuple[np.ndarray, np.ndarray]:
    """(T, C) frame scores and probabilities of one sequence -> decisions ``(T,)`` int (-1 undecided), window
    scores ``(T, C)``: position ``t`` aggregates its window (:func:`window_bounds`) with :func:`aggregate_window`."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if s.ndim != 2 or p.shape != s.shape:
        raise ValueError(f"scores and probs must both be (T, C), got {s.shape} and {p.shape}")
    t, c = s.shape
    k = _keep(keep, t)
    lo, hi = window_bounds(t, window, causal)
    x = np.concatenate([np.zeros((1, c)), np.cumsum(_contributions(s, p, k, how), axis=0)])
    kc = np.concatenate([[0], np.cumsum(k)])
    sums = x[hi] - x[lo]
    n = (kc[hi] - kc[lo]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if how == "mean_score":
            agg = sums / n[:, None]
        else:
            total = sums.sum(axis=1, keepdims=True)
            agg = np.where(total > 0, sums / np.where(total > 0, total, 1.0), 1.0 / c)
    agg = np.where((n > 0)[:, None], agg, np.nan)
    return decisions(agg), agg


def growing_predictions(scores: np.ndarray, probs: np.ndarray, keep: np.ndarray | None = None,
                        how: str = "mean_score") -> tuple[np.ndarray, np.ndarray]:
    """The online decision ``(T,)`` and scores ``(T, C)`` from all frames so far (a causal window of length T)."""
    return window_predictions(scores, probs, keep, window=max(len(np.asarray(scores)), 1), causal=True, how=how)


def stable_decision_time(preds: np.ndarray, fps: float) -> float | None:
    """Seconds of video ``(t*+1)/fps`` after which the decisions ``(T,)`` never change again; None if the final
    decision is undecided (-1) or the sequence is empty."""
    p = np.asarray(preds).reshape(-1)
    if p.size == 0 or p[-1] < 0:
        return None
    differs = np.flatnonzero(p != p[-1])
    t_star = 0 if differs.size == 0 else int(differs[-1]) + 1
    return (t_star + 1) / float(fps)


def filter_scores(p_diagnostic: np.ndarray, diagnostic: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """A frame filter at ``threshold`` on P(diagnostic) ``(N,)`` against the true flags ``(N,)``.

    Positive = non-diagnostic (what the filter must catch): sensitivity = rejected non-diagnostic /
    non-diagnostic, specificity = kept diagnostic / diagnostic, plus the kept fraction and the counts.
    NaN where a denominator is zero.
    """
    p = np.asarray(p_diagnostic, dtype=np.float64).reshape(-1)
    d = np.asarray(diagnostic, dtype=bool).reshape(-1)
    if p.shape != d.shape:
        raise ValueError(f"{p.shape[0]} filter scores for {d.shape[0]} flags")
    kept = p >= threshold
    n_bad, n_good = int((~d).sum()), int(d.sum())
    return {
        "threshold": float(threshold),
        "sensitivity": float((~kept & ~d).sum() / n_bad) if n_bad else float("nan"),
        "specificity": float((kept & d).sum() / n_good) if n_good else float("nan"),
        "kept_fraction": float(kept.mean()) if p.size else float("nan"),
        "n_non_diagnostic": n_bad,
        "n_diagnostic": n_good,
    }
