"""Saliency localisation metrics vs hand-computed cases and scikit-learn on flattened masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from lclsc_jax.evaluate.localisation import (
    area_binarize,
    average_precision,
    bbox_iou,
    binarize,
    class_specificity,
    dice,
    energy_pointing_game,
    iou,
    localisation_metrics,
    normalize_maps,
    otsu_binarize,
    pixel_precision,
    pixel_recall,
    pointing_game,
    runner_up_class,
    topk_binarize,
)


def _square(h: int, w: int, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def test_overlaps_hand_computed():
    gt = _square(6, 6, 1, 1, 3, 3)  # 9 pixels
    pred = _square(6, 6, 2, 2, 4, 4)  # 9 pixels, overlap 2x2 = 4
    assert dice(pred, gt) == pytest.approx(2 * 4 / 18)
    assert iou(pred, gt) == pytest.approx(4 / 14)
    assert pixel_precision(pred, gt) == pytest.approx(4 / 9)
    assert pixel_recall(pred, gt) == pytest.approx(4 / 9)
    assert dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0
    assert pixel_precision(np.zeros((3, 3), bool), gt[:3, :3]) == 0.0


def test_overlaps_match_sklearn_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, g = rng.random((2, 9, 7)) > 0.6
        assert dice(p, g) == pytest.approx(skm.f1_score(g.ravel(), p.ravel()))
        assert iou(p, g) == pytest.approx(skm.jaccard_score(g.ravel(), p.ravel()))
        assert pixel_precision(p, g) == pytest.approx(skm.precision_score(g.ravel(), p.ravel()))
        assert pixel_recall(p, g) == pytest.approx(skm.recall_score(g.ravel(), p.ravel()))


def test_bbox_iou_uses_largest_component_and_all_gt_pixels():
    pred = _square(10, 10, 0, 0, 3, 3)  # 16 px component, box (0,0)-(3,3)
    pred[8, 8] = pred[9, 9] = True  # diagonal 2-px component (8-connected), ignored
    gt = _square(10, 10, 2, 2, 4, 4)
    gt[9, 0] = True  # GT box spans rows 2..9, cols 0..4 -> 8 x 5 = 40
    # pred box 4x4 = 16; intersection rows 2..3, cols 0..3 -> 2 x 4 = 8
    assert bbox_iou(pred, gt) == pytest.approx(8 / (16 + 40 - 8))
    assert bbox_iou(np.zeros((4, 4), bool), gt[:4, :4]) == 0.0


def test_bbox_iou_eight_connectivity():
    pred = np.zeros((5, 5), bool)
    pred[0, 0] = pred[1, 1] = pred[2, 2] = True  # one diagonal component of 3 px
    pred[4, 0] = pred[4, 1] = True  # a 2-px component
    gt = _square(5, 5, 0, 0, 2, 2)
    assert bbox_iou(pred, gt) == pytest.approx(1.0)


def test_thresholds_and_otsu():
    s = np.full((4, 4), 0.2)
    s[1:3, 1:3] = 0.8
    s[0, 0] = 0.3  # between-class variance: {0.2 x11, 0.3} vs {0.8 x4} is the best split
    np.testing.assert_array_equal(binarize(s, 0.3), s >= 0.3)
    np.testing.assert_array_equal(otsu_binarize(s), s == 0.8)
    assert not otsu_binarize(np.full((4, 4), 0.3)).any()  # flat map -> empty
    valid = np.ones((4, 4), bool)
    valid[1, 1] = False
    assert not otsu_binarize(s, valid)[1, 1]


def _otsu_brute_force(values: np.ndarray) -> float:
    """Largest between-class variance over every split of the sorted distinct values."""
    levels = np.unique(values)
    best, best_t = -1.0, levels[0]
    for t in levels[:-1]:
        lo, hi = values[values <= t], values[values > t]
        var = lo.size * hi.size * (lo.mean() - hi.mean()) ** 2
        if var > best:
            best, best_t = var, t
    return best_t


def test_otsu_matches_brute_force_split():
    rng = np.random.default_rng(7)
    for _ in range(3):
        s = np.round(np.clip(rng.normal(0.3, 0.1, (10, 10)) + 0.4 * (rng.random((10, 10)) < 0.3), 0, 1), 3)
        np.testing.assert_array_equal(otsu_binarize(s), s > _otsu_brute_force(s.ravel()))


def test_pointing_game_with_tolerance():
    gt = _square(8, 8, 0, 0, 1, 1)
    s = np.zeros((8, 8))
    s[1, 1] = 1.0
    assert pointing_game(s, gt)
    s = np.zeros((8, 8))
    s[1, 4] = 1.0  # nearest GT pixel (1,1): distance 3
    assert not pointing_game(s, gt, tolerance=2.9)
    assert pointing_game(s, gt, tolerance=3.0)
    s = np.zeros((8, 8))
    s[4, 4] = 1.0  # nearest (1,1): sqrt(18) ~ 4.24
    assert not pointing_game(s, gt, tolerance=4.2)
    assert pointing_game(s, gt, tolerance=4.25)
    assert not pointing_game(np.full((8, 8), 0.5), gt)  # flat map
    valid = np.ones((8, 8), bool)
    valid[4, 4] = False  # the max lies outside the field of view
    s[0, 0] = 0.5
    assert pointing_game(s, gt, valid=valid)


def test_pointing_game_ties_first_in_raster_order_or_any_maximum():
    gt = _square(8, 8, 6, 6, 7, 7)  # bottom-right corner
    s = np.zeros((8, 8))
    s[0, 0] = s[7, 7] = 1.0  # two maxima: the first (raster order) far from the GT, the second on it
    assert not pointing_game(s, gt) and not pointing_game(s, gt, ties="first")
    assert pointing_game(s, gt, ties="any")
    flat = np.full((8, 8), 0.5)
    assert not pointing_game(flat, gt, ties="first") and pointing_game(flat, gt, ties="any")  # Quantus: a hit
    assert not pointing_game(flat, np.zeros((8, 8), bool), ties="any")  # an empty GT is a miss either way
    valid = np.ones((8, 8), bool)
    valid[7, 7] = False  # the on-GT maximum outside the field of view does not count
    assert not pointing_game(s, gt, ties="any", valid=valid)
    s[1, 1] = 1.0  # a third maximum, 5 px from the GT's (6, 6): a hit with tolerance, for "any" only
    assert pointing_game(s, gt, ties="any", tolerance=5 * 2**0.5) and not pointing_game(s, gt, tolerance=7.0)
    maps = np.stack([s, flat])
    res = localisation_metrics(maps, np.stack([gt, gt]), thresholds=(), otsu=False, pointing_ties="any")
    assert res["pointing_game"] == 1.0
    assert localisation_metrics(maps, np.stack([gt, gt]), thresholds=(), otsu=False)["pointing_game"] == 0.0
    with pytest.raises(ValueError, match="ties must be one of"):
        pointing_game(s, gt, ties="all")


def test_energy_pointing_game_hand_computed():
    gt = _square(4, 4, 0, 0, 0, 1)
    s = np.zeros((4, 4))
    s[0, 0], s[0, 1], s[3, 3] = 0.5, 0.25, 0.25
    assert energy_pointing_game(s, gt) == pytest.approx(0.75)
    assert energy_pointing_game(np.zeros((4, 4)), gt) == 0.0


def test_localisation_metrics_excludes_empty_gt_and_matches_loop():
    rng = np.random.default_rng(1)
    n, h, w = 5, 12, 12
    maps = rng.random((n, h, w)) ** 2
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        r, c = rng.integers(0, 8, 2)
        masks[i, r : r + 4, c : c + 4] = True
    masks[2] = False  # no GT: excluded
    maps[2] = 1.0  # would score perfectly if it were counted
    out = localisation_metrics(maps, masks, thresholds=(0.3, 0.6), otsu=True, return_per_image=True)
    assert (out["n_images"], out["n_empty_gt"], out["n_evaluated"]) == (5, 1, 4)
    kept = [0, 1, 3, 4]
    for t in (0.3, 0.6):
        d = [skm.f1_score(masks[i].ravel(), (maps[i] >= t).ravel()) for i in kept]
        j = [skm.jaccard_score(masks[i].ravel(), (maps[i] >= t).ravel()) for i in kept]
        assert out["thresholds"][str(t)]["dice"] == pytest.approx(np.mean(d))
        assert out["thresholds"][str(t)]["iou"] == pytest.approx(np.mean(j))
    hits = [masks[i].ravel()[np.argmax(maps[i])] for i in kept]
    assert out["pointing_game"] == pytest.approx(np.mean(hits))
    energy = [(maps[i] * masks[i]).sum() / maps[i].sum() for i in kept]
    assert out["energy_pointing_game"] == pytest.approx(np.mean(energy))
    assert set(out["thresholds"]) == {"0.3", "0.6", "otsu", "area"}
    assert out["per_image"]["thresholds"]["otsu"]["dice"][2] is None
    json.dumps(out)


def test_all_gt_empty_gives_none_means():
    out = localisation_metrics(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    assert out["n_evaluated"] == 0 and out["pointing_game"] is None
    assert out["thresholds"]["0.5"]["dice"] is None


def test_normalize_maps():
    m = np.stack([np.arange(4.0).reshape(2, 2) - 5, np.full((2, 2), 3.0)])
    out = normalize_maps(m)
    np.testing.assert_allclose(out[0], [[0, 1 / 3], [2 / 3, 1]])
    np.testing.assert_allclose(out[1], 0.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        localisation_metrics(np.full((1, 3, 3), 2.0), np.ones((1, 3, 3)))
    with pytest.raises(ValueError, match="binary"):
        localisation_metrics(np.zeros((1, 3, 3)), np.full((1, 3, 3), 0.5))
    with pytest.raises(ValueError, match="shape"):
        localisation_metrics(np.zeros((1, 3, 3)), np.ones((1, 3, 4)))
    with pytest.raises(ValueError, match="threshold"):
        localisation_metrics(np.zeros((1, 3, 3)), np.ones((1, 3, 3)), thresholds=(1.5,))
    with pytest.raises(ValueError, match="NaN"):
        localisation_metrics(np.full((1, 3, 3), np.nan), np.ones((1, 3, 3)))


# ------------------------------------------------------------- Dice at the mask's area, PR-AUC


def _topk_brute_force(s: np.ndarray, k: int, valid: np.ndarray) -> np.ndarray:
    """The k largest valid pixels, ties to the earlier pixel in raster order, by sorting Python tuples."""
    cells = sorted((-s[r, c], r * s.shape[1] + c) for r in range(s.shape[0]) for c in range(s.shape[1]) if valid[r, c])
    out = np.zeros(s.shape, bool)
    for _, flat in cells[:k]:
        out[flat // s.shape[1], flat % s.shape[1]] = True
    return out


def test_topk_and_area_binarize_match_brute_force_with_ties():
    rng = np.random.default_rng(11)
    for trial in range(6):
        s = np.round(rng.random((9, 8)), 1)  # few distinct values: many ties
        valid = rng.random((9, 8)) > 0.2
        gt = rng.random((9, 8)) > 0.7
        k = int((gt & valid).sum())
        ref = _topk_brute_force(s, k, valid)
        np.testing.assert_array_equal(topk_binarize(s, k, valid), ref)
        np.testing.assert_array_equal(area_binarize(s, gt, valid), ref)
        assert area_binarize(s, gt, valid).sum() == k
    assert not topk_binarize(np.full((4, 4), 0.5), 3).any()  # a flat map ranks nothing
    with pytest.raises(ValueError, match="k must"):
        topk_binarize(np.zeros((2, 2)), 5)


def test_dice_at_area_in_localisation_metrics_matches_brute_force():
    rng = np.random.default_rng(12)
    n, h, w = 6, 10, 11
    maps = np.round(rng.random((n, h, w)), 2)
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        r, c = rng.integers(0, 6, 2)
        masks[i, r:r + 4, c:c + 5] = True
    masks[3] = False  # excluded
    valid = np.ones((h, w), bool)
    valid[:2, :3] = False
    out = localisation_metrics(maps, masks, valid=valid, return_per_image=True)
    dices, ious, boxes = [], [], []
    for i in range(n):
        if i == 3:
            continue
        g = masks[i] & valid
        p = _topk_brute_force(maps[i], int(g.sum()), valid)
        dices.append(skm.f1_score(g.ravel(), p.ravel()))
        ious.append(skm.jaccard_score(g.ravel(), p.ravel()))
        boxes.append(bbox_iou(p, g))
    area = out["thresholds"]["area"]
    assert area["dice"] == pytest.approx(np.mean(dices))
    assert area["iou"] == pytest.approx(np.mean(ious))
    assert area["bbox_iou"] == pytest.approx(np.mean(boxes))
    # |P| = |G|, so precision = recall = Dice at the mask's area.
    assert area["precision"] == pytest.approx(area["dice"]) and area["recall"] == pytest.approx(area["dice"])
    assert out["per_image"]["thresholds"]["area"]["dice"][3] is None
    assert "area" not in localisation_metrics(maps, masks, area=False)["thresholds"]


def test_pr_auc_matches_sklearn_average_precision():
    rng = np.random.default_rng(13)
    n, h, w = 5, 12, 12
    maps = np.round(rng.random((n, h, w)) ** 2, 2)  # ties
    masks = rng.random((n, h, w)) > 0.75
    masks[2] = False
    maps[4] = 0.3  # flat: average precision = the GT's share of the valid pixels
    valid = np.ones((h, w), bool)
    valid[5:, :4] = False
    out = localisation_metrics(maps, masks, valid=valid, return_per_image=True)
    expect = []
    for i in (0, 1, 3, 4):
        ap = skm.average_precision_score(masks[i][valid], maps[i][valid])
        assert average_precision(maps[i], masks[i], valid) == pytest.approx(ap)
        assert out["per_image"]["pr_auc"][i] == pytest.approx(ap)
        expect.append(ap)
    assert out["pr_auc"] == pytest.approx(np.mean(expect))
    assert out["per_image"]["pr_auc"][4] == pytest.approx(masks[4][valid].mean())
    assert out["per_image"]["pr_auc"][2] is None and average_precision(maps[2], masks[2]) is None
    perfect = masks[0].astype(float)
    assert average_precision(perfect, masks[0]) == pytest.approx(1.0)


# ------------------------------------------------------------------------ class specificity


def test_runner_up_class_is_the_best_other_class():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.4, 0.4, 0.2], [0.2, 0.4, 0.4]])
    targets = np.array([1, 0, 1, 0])
    expect = [max((c for c in range(3) if c != t), key=lambda c: (scores[i, c], -c)) for i, t in enumerate(targets)]
    np.testing.assert_array_equal(runner_up_class(scores, targets), expect)
    np.testing.assert_array_equal(expect, [2, 2, 0, 1])
    with pytest.raises(ValueError, match="targets"):
        runner_up_class(scores, np.array([0, 1, 2, 3]))


def test_class_specificity_matches_scipy_and_brute_force():
    rng = np.random.default_rng(14)
    n, h, w = 6, 9, 10
    a = np.round(rng.random((n, h, w)), 2)
    b = np.round(rng.random((n, h, w)), 2)
    b[1] = a[1]  # a class-blind map: r = 1, gap = 0
    b[2] = 0.4  # flat wrong-class map: r undefined, its Dice at the area 0 (ranks nothing)
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        r, c = rng.integers(0, 5, 2)
        masks[i, r:r + 4, c:c + 4] = True
    masks[4] = False  # no mask: r still defined, no Dice gap
    valid = np.ones((h, w), bool)
    valid[:2, :2] = False
    out = class_specificity(a, b, masks, valid, return_per_image=True)
    rs, gaps = [], []
    for i in range(n):
        if i != 2:
            r = stats.pearsonr(a[i][valid], b[i][valid])[0]
            assert out["per_image"]["correlation"][i] == pytest.approx(r)
            rs.append(r)
        if i != 4:
            g = masks[i] & valid
            k = int(g.sum())
            d = [skm.f1_score(g.ravel(), _topk_brute_force(m[i], k, valid).ravel()) for m in (a, b)]
            if i == 2:
                d[1] = 0.0
            assert out["per_image"]["dice_area_gap"][i] == pytest.approx(d[0] - d[1])
            gaps.append(d[0] - d[1])
    assert out["per_image"]["correlation"][1] == pytest.approx(1.0) and out["per_image"]["dice_area_gap"][1] == 0
    assert out["per_image"]["correlation"][2] is None and out["per_image"]["dice_area_gap"][4] is None
    assert out["correlation"] == pytest.approx(np.mean(rs)) and out["dice_area_gap"] == pytest.approx(np.mean(gaps))
    assert (out["n_images"], out["n_correlated"], out["n_evaluated"]) == (6, 5, 5)
    # The true-class Dice at the area is localisation_metrics' own "area" Dice.
    ref = localisation_metrics(a, masks, valid=valid, thresholds=(), otsu=False)
    assert out["dice_area_true"] == pytest.approx(ref["thresholds"]["area"]["dice"])
    with pytest.raises(ValueError, match="same shape"):
        class_specificity(a, b[:2], masks)
