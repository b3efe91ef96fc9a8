"""Figure fixes of issue 19: a visible ROC at AUC = 1, visible wrong-frame bars, reliability counts, colour bars.

Every number is checked against NumPy / scikit-learn computed here (np.histogram, roc_curve),
and visibility against the figure's own display transform (pixels), not the code's output.
"""

from __future__ import annotations

import matplotlib.colors as mcolors
import numpy as np
import pytest
import sklearn.metrics as skm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lclsc_jax.evaluate import plots
from lclsc_jax.explain import figures as xfig


def _probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """Random probabilities ``(n, c)`` (Dirichlet rows)."""
    return rng.dirichlet(np.ones(c), size=n)


def test_roc_at_auc_one_is_drawn_inside_the_margins_unclipped():
    y = np.array([0] * 10 + [1] * 10)
    score = np.r_[np.linspace(0.0, 0.4, 10), np.linspace(0.6, 1.0, 10)]
    probs = np.stack([1 - score, score], 1)
    fig = plots.make_roc_figure(y, probs)
    ax = fig.axes[0]
    curve, diagonal = ax.get_lines()[:2]
    fpr, tpr, _ = skm.roc_curve(y, score, drop_intermediate=False)
    assert skm.roc_auc_score(y, score) == 1.0
    np.testing.assert_allclose(curve.get_xdata(), fpr)
    np.testing.assert_allclose(curve.get_ydata(), tpr)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    assert x0 < 0 < 1 < x1 and y0 < 0 < 1 < y1  # a margin around the unit square
    assert not curve.get_clip_on() and curve.get_zorder() > diagonal.get_zorder()
    np.testing.assert_allclose(diagonal.get_xydata(), [[0, 0], [1, 1]])  # chance line kept
    # The curve's top edge (TPR = 1) lies strictly inside the axes' pixel box, not on the frame.
    FigureCanvasAgg(fig).draw()
    top = ax.transData.transform([[0.5, 1.0]])[0, 1]
    assert ax.bbox.y0 < top < ax.bbox.y1 - 1


def _containers(ax):
    """``{"correct": BarContainer, "wrong": BarContainer}`` of the confidence histogram, by legend label."""
    out = {}
    for c in ax.containers:
        out[c.get_label().split(" ")[0]] = c
    return out


def test_confidence_histogram_wrong_bars_contrast_and_match_numpy():
    rng = np.random.default_rng(0)
    c, n_bins = 3, 15
    p = _probs(rng, 303, c)
    y = p.argmax(1)
    y[:3] = (y[:3] + 1) % c  # 300 correct frames, 3 wrong
    fig = plots.make_confidence_figure(p, y, n_bins=n_bins)
    ax = fig.axes[0]
    bars = _containers(ax)
    assert set(bars) == {"correct", "wrong"}
    conf, ok = p.max(1), p.argmax(1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    ref_ok, _ = np.histogram(conf[ok], edges)
    ref_bad, _ = np.histogram(conf[~ok], edges)
    np.testing.assert_array_equal([r.get_height() for r in bars["correct"]], ref_ok)
    np.testing.assert_array_equal([r.get_height() for r in bars["wrong"]], ref_bad)
    assert ref_bad.sum() == 3 and ref_ok.sum() == 300
    c_ok = np.array(mcolors.to_rgb(bars["correct"][0].get_facecolor()))
    c_bad = np.array(mcolors.to_rgb(bars["wrong"][0].get_facecolor()))
    assert np.abs(c_ok - c_bad).sum() > 0.8  # clearly different colours
    # A single wrong frame is visible beside the tallest correct bar: >= 15 % of its height in pixels.
    FigureCanvasAgg(fig).draw()

    def pixels(rect):
        return np.diff(ax.transData.transform([[0, 0], [0, rect.get_height()]])[:, 1])[0]

    tallest = max(pixels(r) for r in bars["correct"])
    for r in bars["wrong"]:
        if r.get_height() >= 1:
            assert pixels(r) >= 0.15 * tallest
    # Every non-empty wrong bar carries its count as text.
    texts = [t.get_text() for t in ax.texts]
    for k in ref_bad[ref_bad > 0]:
        assert str(int(k)) in texts


def test_reliability_figure_counts_and_ece_match_numpy():
    rng = np.random.default_rng(1)
    p = _probs(rng, 120, 2)
    y = rng.integers(0, 2, 120)
    n_bins = 10
    fig = plots.make_reliability_figure(p, y, n_bins=n_bins)
    conf, ok = p.max(1), p.argmax(1) == y
    edges = np.linspace(0, 1, n_bins + 1)
    counts, _ = np.histogram(conf, edges)
    ece = sum(abs(ok[(conf > a) & (conf <= b)].mean() - conf[(conf > a) & (conf <= b)].mean())
              * ((conf > a) & (conf <= b)).sum() for a, b in zip(edges[:-1], edges[1:])
              if ((conf > a) & (conf <= b)).any()) / len(conf)
    top, bottom = fig.axes
    assert f"ECE={ece:.3f}" in top.get_title()
    assert sorted(int(t.get_text()) for t in top.texts) == sorted(counts[counts > 0].tolist())
    np.testing.assert_array_equal([r.get_height() for r in bottom.patches], counts)


def test_threshold_table_matches_a_loop():
    rng = np.random.default_rng(2)
    p = _probs(rng, 50, 3)
    y = rng.integers(0, 3, 50)
    t = [0.0, 0.4, 0.6, 0.99]
    tab = plots.threshold_table(p, y, t)
    for i, thr in enumerate(t):
        keep = p.max(1) >= thr
        assert tab["coverage"][i] == pytest.approx(keep.mean())
        if keep.any():
            assert tab["accuracy"][i] == pytest.approx((p.argmax(1) == y)[keep].mean())
        else:
            assert np.isnan(tab["accuracy"][i])


def test_patient_distribution_counts():
    acc = {"a": 1.0, "b": 0.95, "c": 0.8, "d": 0.5, "e": 0.69}
    fig = plots.make_patient_distribution_figure(acc)
    assert "5 patients: 2 above 90%, 2 below 70%" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="empty"):
        plots.make_patient_distribution_figure({})


def test_overlay_colour_bar_mask_outline_and_field_of_view():
    h = w = 32
    yy, xx = np.mgrid[:h, :w]
    valid = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 14 ** 2
    image = np.where(valid[..., None], 0.6, 0.0).astype(np.float32)
    heat = np.full((h, w), 0.3, np.float32)
    mask = (abs(yy - 16) < 5) & (abs(xx - 16) < 5)
    fig = Figure()
    ax = fig.subplots()
    xfig.overlay(ax, image, heat, "m", valid=valid, mask=mask, colorbar=True)
    (cax,) = ax.child_axes  # the colour bar, inset beside the map's axis
    assert cax._colorbar.mappable is ax.images[1]
    heat_img = ax.images[1].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(heat_img), ~valid)  # nothing drawn in the corners
    assert len(ax.collections) >= 1  # the mask's contour
    # Rendered: a corner pixel of the axis stays black (the frame's dark corner, no colour map on it).
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    x0, y0 = ax.transData.transform([[0.5, 0.5]])[0]
    px = rgba[rgba.shape[0] - int(round(y0)), int(round(x0)), :3]
    assert px.max() < 30
    # Old call form still works (no colour bar, no outline).
    fig2 = Figure()
    ax2 = fig2.subplots()
    xfig.overlay(ax2, image, heat, "m")
    assert not ax2.child_axes and not ax2.collections
