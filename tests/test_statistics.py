"""Hierarchical bootstrap over patients and frames: closed forms, a naive loop, coverage, t-intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lclsc_jax.evaluate import statistics as S


def _balanced(rng, n_pat=12, n_frames=8, patient_sd=1.0, frame_sd=0.5, mean=0.0):
    """Frames of ``n_pat`` patients with ``n_frames`` each: patient effect + frame noise."""
    patients = np.repeat([f"P{p:02d}" for p in range(n_pat)], n_frames)
    effect = rng.normal(0, patient_sd, n_pat)
    x = mean + np.repeat(effect, n_frames) + rng.normal(0, frame_sd, n_pat * n_frames)
    return x, patients


def _naive(x, patients, n_boot, rng, levels="patients+frames"):
    """The two-level bootstrap as a plain loop: draw patients, then each drawn patient's frames."""
    ids = sorted(set(patients))
    by = {p: x[patients == p] for p in ids}
    out = np.empty(n_boot)
    for b in range(n_boot):
        if levels == "frames":
            out[b] = rng.choice(x, size=x.size, replace=True).mean()
            continue
        vals = []
        for p in rng.choice(ids, size=len(ids), replace=True):
            f = by[p]
            vals.append(f if levels == "patients" else rng.choice(f, size=f.size, replace=True))
        out[b] = np.concatenate(vals).mean()
    return out


# ----------------------------------------------------------------------------- closed forms


def test_zero_variance_gives_a_zero_width_interval():
    patients = np.repeat(["a", "b", "c"], [2, 5, 3])
    res = S.hierarchical_bootstrap(np.full(10, 0.7), patients, n_boot=200)
    assert res["estimate"] == pytest.approx(0.7) and res["ci_low"] == pytest.approx(0.7)
    assert res["ci_high"] == pytest.approx(0.7) and res["se"] == pytest.approx(0.0, abs=1e-12)
    assert (res["n_patients"], res["n_frames"], res["n_replicates"]) == (3, 10, 1)


def test_a_constant_shift_gives_an_interval_at_the_shift():
    rng = np.random.default_rng(0)
    b, patients = _balanced(rng)
    b = np.stack([b, b + rng.normal(size=b.size)])  # two replicates, different outcomes
    res = S.paired_bootstrap(b + 0.25, b, patients, n_boot=300, seed=1)
    assert res["estimate"] == pytest.approx(0.25)
    assert res["ci_low"] == pytest.approx(0.25) and res["ci_high"] == pytest.approx(0.25)
    assert res["mean_a"] - res["mean_b"] == pytest.approx(0.25)


@pytest.mark.parametrize("levels", S.LEVELS)
def test_bootstrap_se_matches_the_closed_form_variance(levels):
    # Balanced design, P patients of n frames: T = (1/P) sum_j ybar_j over P iid patient draws, so
    # Var(T) = (1/P) [Var_pop(m_p) + mean_p(s2_p) / n] (both levels), (1/P) Var_pop(m_p) (patients),
    # s2_pop(all) / N (frames), with population (ddof=0) variances of the observed data.
    rng = np.random.default_rng(1)
    n_pat, n = 10, 6
    x, patients = _balanced(rng, n_pat, n)
    m = x.reshape(n_pat, n).mean(1)
    s2 = x.reshape(n_pat, n).var(1)
    expect = {"patients+frames": (m.var() + s2.mean() / n) / n_pat, "patients": m.var() / n_pat,
              "frames": x.var() / x.size}[levels]
    res = S.hierarchical_bootstrap(x, patients, n_boot=40000, seed=2, levels=levels)
    assert res["se"] == pytest.approx(np.sqrt(expect), rel=0.02)
    assert res["estimate"] == pytest.approx(x.mean())


def test_vectorised_bootstrap_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    n_pat = 9
    patients = np.concatenate([[f"p{p}"] * (2 + p % 4) for p in range(n_pat)])  # unbalanced
    x = rng.normal(size=patients.size) + np.array([int(p[1:]) for p in patients]) * 0.3
    for levels in S.LEVELS:
        loop = _naive(x, patients, 6000, np.random.default_rng(4), levels)
        res = S.hierarchical_bootstrap(x, patients, n_boot=6000, seed=5, levels=levels, confidence=0.9)
        lo, hi = np.quantile(loop, [0.05, 0.95])
        assert res["se"] == pytest.approx(loop.std(ddof=1), rel=0.06), levels
        assert res["ci_low"] == pytest.approx(lo, abs=0.1 * loop.std()), levels
        assert res["ci_high"] == pytest.approx(hi, abs=0.1 * loop.std()), levels


def test_weights_draw_whole_patients_then_their_frames():
    patients = np.repeat(["a", "b", "c", "d"], [3, 1, 4, 2])
    sizes = {"a": 3, "b": 1, "c": 4, "d": 2}
    w = S.bootstrap_weights(patients, 500, seed=0)
    assert w.shape == (500, 10)
    for p, k in sizes.items():  # a drawn patient brings n_p frame draws per copy
        assert np.all(w[:, patients == p].sum(1) % k == 0)
    copies = sum(w[:, patients == p].sum(1) / k for p, k in sizes.items())
    np.testing.assert_array_equal(copies, 4)  # 4 patients drawn in every resample
    assert w.mean() == pytest.approx(1.0, abs=0.05)  # E[w_f] = 1
    only_p = S.bootstrap_weights(patients, 50, seed=0, levels="patients")
    for p in sizes:
        cols = only_p[:, patients == p]
        assert np.all(cols == cols[:, :1])  # all frames of a patient drawn together


def test_stratified_weights_keep_the_patients_of_each_class():
    patients = np.repeat([f"p{i}" for i in range(6)], 3)
    labels = np.repeat([0, 0, 0, 1, 1, 2], 3)
    w = S.bootstrap_weights(patients, 300, seed=1, strata=labels)
    for c, n_pat in ((0, 3), (1, 2), (2, 1)):
        np.testing.assert_array_equal(w[:, labels == c].sum(1), 3 * n_pat)
    np.testing.assert_array_equal(w[:, labels == 2], np.broadcast_to(w[:, labels == 2], (300, 3)))


def test_replicate_average_with_unscored_frames():
    patients = np.array(["a", "a", "b", "b", "c"])
    x = np.array([[1.0, 0.0, 1.0, np.nan, 1.0],
                  [np.nan, 1.0, 0.0, 0.0, np.nan]])
    res = S.hierarchical_bootstrap(x, patients, n_boot=50)
    assert res["estimate"] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert res["n_frames"] == 5 and res["n_replicates"] == 2
    assert S.hierarchical_bootstrap(np.full(3, np.nan), ["a", "b", "c"])["estimate"] is None


def test_per_class_breakdown_uses_the_patients_of_each_class():
    rng = np.random.default_rng(6)
    patients = np.repeat([f"p{i}" for i in range(8)], 5)
    labels = np.repeat([0, 1, 0, 1, 0, 1, 2, 2], 5)
    b = rng.normal(size=(3, 40))
    shift = np.where(labels == 1, 0.5, -0.2)
    res = S.bootstrap_by_class(b + shift, patients, labels, paired_with=b, n_boot=100)
    assert set(res) == {0, 1, 2}
    for c, d in ((0, -0.2), (1, 0.5), (2, -0.2)):
        assert (res[c]["estimate"], res[c]["ci_low"], res[c]["ci_high"]) == pytest.approx((d, d, d))
    one = S.bootstrap_by_class(b, patients, labels, n_boot=100)
    assert one[1]["estimate"] == pytest.approx(b[:, labels == 1].mean())
    assert one[1]["n_patients"] == 3 and one[1]["n_frames"] == 15


def test_patient_labels_is_the_majority_label():
    patients = np.array(["x", "x", "x", "y", "y", "z"])
    labels = np.array([2, 2, 0, 1, 0, 1])
    np.testing.assert_array_equal(S.patient_labels(patients, labels), [2, 2, 2, 0, 0, 1])


def test_coverage_of_the_hierarchical_interval_and_the_failure_of_a_frame_bootstrap():
    # Strong patient effects: a frame bootstrap ignores them and under-covers; the two-level one does not.
    hits = {"patients+frames": 0, "frames": 0}
    sims = 150
    for s in range(sims):
        rng = np.random.default_rng(100 + s)
        x, patients = _balanced(rng, n_pat=20, n_frames=10, patient_sd=1.0, frame_sd=1.0, mean=0.3)
        for levels in hits:
            r = S.hierarchical_bootstrap(x, patients, n_boot=400, seed=s, levels=levels)
            hits[levels] += r["ci_low"] <= 0.3 <= r["ci_high"]
    assert 0.86 <= hits["patients+frames"] / sims <= 1.0
    assert hits["frames"] / sims < 0.7


def test_resampling_replicates_widens_the_interval_when_replicates_differ():
    rng = np.random.default_rng(7)
    x, patients = _balanced(rng, n_pat=10, n_frames=4, patient_sd=0.1, frame_sd=0.1)
    reps = np.stack([x, x + 1.0, x - 1.0, x + 0.5])
    fixed = S.hierarchical_bootstrap(reps, patients, n_boot=500)
    crossed = S.hierarchical_bootstrap(reps, patients, n_boot=500, resample_replicates=True)
    assert fixed["estimate"] == crossed["estimate"] == pytest.approx(x.mean() + 0.125)
    assert crossed["se"] > 5 * fixed["se"]


def test_seeded_and_reproducible():
    rng = np.random.default_rng(8)
    x, patients = _balanced(rng)
    a = S.hierarchical_bootstrap(x, patients, n_boot=300, seed=11)
    b = S.hierarchical_bootstrap(x, patients, n_boot=300, seed=11)
    c = S.hierarchical_bootstrap(x, patients, n_boot=300, seed=12)
    assert a == b and a["ci_low"] != c["ci_low"]


def test_t_interval_matches_scipy():
    v = np.array([0.81, 0.85, 0.79, 0.9, np.nan])
    r = S.t_interval(v, 0.9)
    lo, hi = stats.t.interval(0.9, df=3, loc=np.nanmean(v), scale=stats.sem(v[:4]))
    assert (r["mean"], r["ci_low"], r["ci_high"], r["n"]) == pytest.approx((np.nanmean(v), lo, hi, 4))
    assert S.t_interval([0.5])["std"] is None


@pytest.mark.parametrize("bad", [dict(n_boot=0), dict(confidence=1.0), dict(levels="clusters")])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        S.hierarchical_bootstrap(np.zeros(4), ["a", "a", "b", "b"], **bad)


def test_bad_shapes():
    with pytest.raises(ValueError, match="patients"):
        S.hierarchical_bootstrap(np.zeros(4), ["a", "b"])
    with pytest.raises(ValueError, match="same shape"):
        S.paired_bootstrap(np.zeros((2, 4)), np.zeros((1, 4)), ["a"] * 4)
    with pytest.raises(ValueError, match="inf"):
        S.hierarchical_bootstrap(np.array([1.0, np.inf]), ["a", "b"])


def test_detectable_difference_has_the_stated_power():
    # The power of a two-sided z-test at the returned difference, from the normal CDF (not from ppf).
    for conf, power, se in ((0.95, 0.8, 0.05), (0.9, 0.9, 0.2)):
        d = S.detectable_difference(se, conf, power)
        z = stats.norm.isf((1 - conf) / 2)
        got = stats.norm.cdf(d / se - z) + stats.norm.cdf(-d / se - z)
        assert got == pytest.approx(power, abs=1e-3)
    assert S.detectable_difference(0.1) == pytest.approx(0.28, abs=2e-3)  # the textbook 2.8 SE
    rng = np.random.default_rng(0)
    pat = np.repeat(np.arange(10), 4)
    res = S.paired_bootstrap(rng.normal(size=40), rng.normal(size=40), pat, n_boot=300)
    assert res["detectable"] == pytest.approx(S.detectable_difference(res["se"]))
    with pytest.raises(ValueError):
        S.detectable_difference(-1.0)
    with pytest.raises(ValueError):
        S.detectable_difference(0.1, power=1.0)


def test_weighted_classification_metrics_match_sklearn_with_sample_weight():
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    n, k = 60, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:6] = probs[6:12]  # tied scores
    w = S.bootstrap_weights(np.repeat(np.arange(12), 5), 20, seed=1)
    w = np.concatenate([np.ones((1, n)), w])
    got = S.weighted_classification_metrics(probs, y, w)
    for b in range(len(w)):
        keep = w[b] > 0  # a resample holds the frames it drew
        yy, pp, ww = y[keep], probs[keep], w[b, keep]
        pred = pp.argmax(1)
        assert got["accuracy"][b] == pytest.approx(skm.accuracy_score(yy, pred, sample_weight=ww))
        assert got["balanced_accuracy"][b] == pytest.approx(skm.balanced_accuracy_score(yy, pred, sample_weight=ww))
        assert got["f1"][b] == pytest.approx(skm.f1_score(yy, pred, average="macro", sample_weight=ww,
                                                          zero_division=0))
        if len(np.unique(yy)) == k:
            assert got["auroc"][b] == pytest.approx(skm.roc_auc_score(yy, pp, multi_class="ovr", average="macro",
                                                                      sample_weight=ww))
    with pytest.raises(ValueError, match="need probs"):
        S.weighted_classification_metrics(probs, y[:-1], w)


def test_metric_intervals_equal_percentiles_of_sklearn_on_each_resample():
    """metric_intervals vs a brute force: the same patient resamples, sklearn's weighted metrics, np.quantile."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(5)
    patients = np.repeat([f"P{p}" for p in range(9)], 7)
    y = np.repeat(np.arange(9) % 3, 7)
    logits = rng.normal(size=(len(y), 3)) + 1.2 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = S.metric_intervals(probs, y, patients, n_boot=200, confidence=0.9, seed=4)
    w = S.bootstrap_weights(patients, 200, seed=np.random.default_rng(4), strata=y)  # the draws it makes
    pred = probs.argmax(1)
    acc = [skm.accuracy_score(y, pred, sample_weight=wb) for wb in w]
    bal = [skm.balanced_accuracy_score(y[wb > 0], pred[wb > 0], sample_weight=wb[wb > 0]) for wb in w]
    for key, vals, point in (("accuracy", acc, skm.accuracy_score(y, pred)),
                             ("balanced_accuracy", bal, skm.balanced_accuracy_score(y, pred))):
        lo, hi = np.quantile(vals, [0.05, 0.95])
        assert got[key]["estimate"] == pytest.approx(point)
        assert (got[key]["ci_low"], got[key]["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert got["auroc"]["estimate"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    with pytest.raises(ValueError, match="n_boot"):
        S.metric_intervals(probs, y, patients, n_boot=0)
