"""Report figures: PNGs are written, and plotted values agree with scikit-learn."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn import metrics as skm

from lclsc_jax.evaluate.metrics import classification_metrics
from lclsc_jax.evaluate.plots import (
    confidence_histogram,
    confusion_matrix_plot,
    make_confidence_figure,
    make_confusion_figure,
    make_roc_figure,
    per_patient_bars,
    roc_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fold(seed: int, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    z = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    p = np.exp(z)
    return y, p / p.sum(1, keepdims=True)


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _legend_aucs(fig) -> list[list[float]]:
    return [
        [float(re.search(r"AUC=([0-9.]+)", t.get_text()).group(1)) for t in ax.get_legend().get_texts()]
        for ax in fig.axes
    ]


def test_roc_binary_folds_legend_matches_sklearn(tmp_path):
    folds = [_fold(s, 40, 2) for s in range(3)]
    ys, ps = [f[0] for f in folds], [f[1] for f in folds]
    fig = make_roc_figure(ys, ps)
    (aucs,) = _legend_aucs(fig)
    ref = [skm.roc_auc_score(y, p[:, 1]) for y, p in folds]
    np.testing.assert_allclose(aucs, ref, atol=5e-4)
    # The plotted line is sklearn's ROC curve.
    fpr, tpr, _ = skm.roc_curve(ys[0], ps[0][:, 1], drop_intermediate=False)
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), fpr)
    np.testing.assert_allclose(line.get_ydata(), tpr)
    out = roc_curves(ys, ps, tmp_path / "sub" / "roc.png")
    assert out == tmp_path / "sub" / "roc.png" and _is_png(out)


def test_roc_multiclass_one_panel_per_class(tmp_path):
    y, p = _fold(4, 60, 3)
    fig = make_roc_figure(y, p, class_names=["a", "b", "c"])
    assert len(fig.axes) == 3
    m = classification_metrics(y, p, class_names=["a", "b", "c"])
    for ax_aucs, name in zip(_legend_aucs(fig), "abc"):
        assert ax_aucs[0] == pytest.approx(m["per_class"][name]["auroc"], abs=5e-4)
    assert _is_png(roc_curves(y, p, tmp_path / "roc3.png"))


def test_confusion_matrix_plot(tmp_path):
    cm = [[5, 1], [2, 7]]
    fig = make_confusion_figure(cm, ["benign", "malignant"])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["1", "2", "5", "7"]
    assert _is_png(confusion_matrix_plot(cm, ["benign", "malignant"], tmp_path / "cm.png", normalize=True))
    with pytest.raises(ValueError, match="square"):
        make_confusion_figure([[1, 2, 3]], None)


def test_per_patient_bars(tmp_path):
    y, p = _fold(5, 30, 2)
    pats = [f"P{i % 4}" for i in range(30)]
    m = classification_metrics(y, p, patients=pats)
    out = per_patient_bars(m["per_patient"], tmp_path / "pp.png")
    assert _is_png(out)
    with pytest.raises(ValueError, match="empty"):
        per_patient_bars({}, tmp_path / "x.png")


def test_confidence_histogram_and_reliability(tmp_path):
    y, p = _fold(6, 50, 3)
    fig = make_confidence_figure(p, y)
    hist_ax, rel_ax = fig.axes
    m = classification_metrics(y, p)
    assert f"ECE={m['ece']:.3f}" in rel_ax.get_title()
    heights = [r.get_height() for r in hist_ax.patches]
    assert sum(heights) == 50  # correct + wrong stacked bars count every frame
    assert _is_png(confidence_histogram(p, y, tmp_path / "conf.png"))
