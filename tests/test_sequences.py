"""Sequence evaluation (pure NumPy): aggregators, windows, grouping, stability, filter scores vs loop references."""

import numpy as np
import pytest

from lclsc_jax.evaluate import sequences as sq


def _rand(t=17, c=3, seed=0, p_keep=0.6):
    r = np.random.default_rng(seed)
    return r.normal(size=(t, c)), r.dirichlet(np.ones(c), size=t), r.random(t) < p_keep


def _ref_window(s, p, k, how):
    """Loop reference for one window: explicit sums over kept frames."""
    c = s.shape[1]
    rows = [i for i in range(len(s)) if k[i]]
    if not rows:
        return np.full(c, np.nan)
    if how == "mean_score":
        return np.array([sum(s[i, j] for i in rows) / len(rows) for j in range(c)])
    v = np.zeros(c)
    for i in rows:
        j = int(np.argmax(p[i]))
        v[j] += p[i, j]
    return v / v.sum()


def test_aggregate_window_mean_score_hand_values():
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.4]])
    p = np.array([[0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])
    np.testing.assert_allclose(sq.aggregate_window(s, p, np.array([1, 0, 1], bool)), [0.7, 0.25])
    np.testing.assert_allclose(sq.aggregate_window(s, p), [1.6 / 3, 1.3 / 3])


def test_aggregate_window_vote_hand_values():
    p = np.array([[0.7, 0.3], [0.1, 0.9], [0.6, 0.4]])
    s = np.log(p)
    # votes: class 0 gets 0.7 + 0.6 = 1.3, class 1 gets 0.9 -> normalised by 2.2
    np.testing.assert_allclose(sq.aggregate_window(s, p, how="vote"), [1.3 / 2.2, 0.9 / 2.2])
    np.testing.assert_allclose(sq.aggregate_window(s, p, np.array([0, 1, 0], bool), how="vote"), [0.0, 1.0])


def test_aggregate_window_no_kept_frame_is_nan_and_undecided():
    s, p, _ = _rand(4)
    for how in sq.AGGREGATORS:
        w = sq.aggregate_window(s, p, np.zeros(4, bool), how=how)
        assert w.shape == (3,) and np.isnan(w).all()
        assert sq.decisions(w) == -1
    with pytest.raises(ValueError, match="aggregator"):
        sq.aggregate_window(s, p, how="median")


@pytest.mark.parametrize("how", sq.AGGREGATORS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 4, 5, 40])
def test_window_predictions_match_loop_reference(how, causal, window):
    s, p, k = _rand(17, seed=window)
    k[3:9] = False  # a run of rejected frames: some small windows are undecided
    preds, agg = sq.window_predictions(s, p, k, window, causal=causal, how=how)
    t = len(s)
    for i in range(t):
        lo, hi = (max(0, i - window + 1), i + 1) if causal else (max(0, i - window // 2), min(t, i + window // 2 + 1))
        ref = _ref_window(s[lo:hi], p[lo:hi], k[lo:hi], how)
        np.testing.assert_allclose(agg[i], ref, rtol=1e-9, atol=1e-12)
        assert preds[i] == (-1 if np.isnan(ref).all() else int(np.argmax(ref)))
    if window == 1:
        assert (preds[3:9] == -1).all()


def test_window_bounds_and_growing_window():
    lo, hi = sq.window_bounds(6, 3, causal=True)
    np.testing.assert_array_equal(lo, [0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(hi, [1, 2, 3, 4, 5, 6])
    lo, hi = sq.window_bounds(6, 4, causal=False)  # centred: [t-2, t+2]
    np.testing.assert_array_equal(lo, [0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(hi, [3, 4, 5, 6, 6, 6])
    with pytest.raises(ValueError, match="at least 1 frame"):
        sq.window_bounds(6, 0)
    s, p, k = _rand(9, seed=3)
    preds, agg = sq.growing_predictions(s, p, k)
    for i in range(9):
        np.testing.assert_allclose(agg[i], _ref_window(s[: i + 1], p[: i + 1], k[: i + 1], "mean_score"))


def test_sequence_groups_orders_by_frame_and_keeps_patients_apart():
    patients = ["a", "a", "b", "a", "b", "a"]
    seqs = [0, 1, 0, 0, 0, 1]
    frames = [2, 1, 0, 0, 1, 0]
    groups = sq.sequence_groups(patients, seqs, frames)
    assert [g.tolist() for g in groups] == [[3, 0], [5, 1], [2, 4]]
    # without sequences: one per patient, record order
    assert [g.tolist() for g in sq.sequence_groups(patients)] == [[0, 1, 3, 5], [2, 4]]
    # same sequence id in two patients = two sequences
    assert len(sq.sequence_groups(["a", "b"], ["s0", "s0"], [0, 0])) == 2


def test_stable_decision_time():
    assert sq.stable_decision_time([2, 2, 2], fps=10) == pytest.approx(0.1)
    assert sq.stable_decision_time([0, 1, 0, 1, 1, 1], fps=2) == pytest.approx(4 / 2)  # t* = 3
    assert sq.stable_decision_time([-1, -1, 1], fps=1) == pytest.approx(3.0)
    assert sq.stable_decision_time([0, 1, -1], fps=1) is None
    assert sq.stable_decision_time([], fps=1) is None


def test_filter_scores_against_counts():
    r = np.random.default_rng(5)
    p = r.random(200)
    d = r.random(200) < 0.7
    f = sq.filter_scores(p, d, threshold=0.4)
    kept = p >= 0.4
    tp = sum(1 for i in range(200) if not d[i] and not kept[i])
    tn = sum(1 for i in range(200) if d[i] and kept[i])
    assert f["sensitivity"] == pytest.approx(tp / (200 - d.sum()))
    assert f["specificity"] == pytest.approx(tn / d.sum())
    assert f["kept_fraction"] == pytest.approx(kept.sum() / 200)
    assert np.isnan(sq.filter_scores(p[:3], np.ones(3, bool))["sensitivity"])
