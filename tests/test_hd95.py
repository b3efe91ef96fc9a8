"""HD95 and the localisation metrics on volumes, against MONAI and brute-force NumPy/scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from lclsc_jax.evaluate import localisation as loc


def _surface_brute(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the array border counts as outside)."""
    pad = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for ax in range(mask.ndim):
        for step in (-1, 1):
            sl = [slice(1, -1)] * mask.ndim
            sl[ax] = slice(1 + step, pad.shape[ax] - 1 + step)
            inner &= pad[tuple(sl)]
    return mask & ~inner


def _hd95_brute(p: np.ndarray, g: np.ndarray, spacing=(1.0, 1.0, 1.0), q: float = 95.0) -> float:
    """Symmetric HD95 by all-pairs distances between the two surfaces (scipy cdist)."""
    sp = np.argwhere(_surface_brute(p)) * np.asarray(spacing)
    sg = np.argwhere(_surface_brute(g)) * np.asarray(spacing)
    d = cdist(sp, sg)
    return float(max(np.percentile(d.min(axis=1), q), np.percentile(d.min(axis=0), q)))


def _random_blob(rng: np.random.Generator, shape=(9, 10, 11)) -> np.ndarray:
    """A random union of two boxes (non-convex, touching the border sometimes)."""
    m = np.zeros(shape, bool)
    for _ in range(2):
        lo = [rng.integers(0, s - 2) for s in shape]
        hi = [rng.integers(a + 1, s + 1) for a, s in zip(lo, shape)]
        m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    p, g = _random_blob(rng), _random_blob(rng)
    spacing = (1.0, 1.0, 1.0) if seed % 2 == 0 else (2.0, 0.5, 1.25)
    got = loc.hausdorff95(p, g, spacing=None if seed % 2 == 0 else spacing)
    assert got == pytest.approx(_hd95_brute(p, g, spacing), abs=1e-9)


def test_hd95_2d_and_known_value():
    # Two single voxels 3 apart along one axis (surface = the voxel itself): HD95 = 3 * spacing.
    p = np.zeros((4, 5, 6), bool)
    g = np.zeros((4, 5, 6), bool)
    p[1, 1, 1] = True
    g[1, 1, 4] = True
    assert loc.hausdorff95(p, g) == pytest.approx(3.0)
    assert loc.hausdorff95(p, g, spacing=(1.0, 1.0, 0.5)) == pytest.approx(1.5)
    assert loc.hausdorff95(p[1], g[1]) == pytest.approx(3.0)  # 2D
    assert loc.hausdorff95(p, p) == 0.0


def test_hd95_empty_masks_are_nan():
    z = np.zeros((3, 4, 5), bool)
    m = z.copy()
    m[1, 1, 1] = True
    assert np.isnan(loc.hausdorff95(z, m))
    assert np.isnan(loc.hausdorff95(m, z))
    assert np.isnan(loc.hausdorff95(z, z))
    with pytest.raises(ValueError, match="shape"):
        loc.hausdorff95(m, m[0])


@pytest.mark.torch
def test_hd95_matches_monai():
    pytest.importorskip("monai")
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(11)
    for k in range(4):
        p, g = _random_blob(rng, (12, 10, 9)), _random_blob(rng, (12, 10, 9))
        spacing = [1.0, 1.0, 1.0] if k < 2 else [0.7, 1.3, 2.0]
        tp, tg = torch.from_numpy(p)[None, None].float(), torch.from_numpy(g)[None, None].float()
        ref = compute_hausdorff_distance(tp, tg, include_background=True, percentile=95, spacing=spacing)
        assert loc.hausdorff95(p, g, spacing) == pytest.approx(float(ref[0, 0]), rel=1e-5, abs=1e-5)


def test_overlaps_and_pointing_on_volumes():
    rng = np.random.default_rng(3)
    p, g = _random_blob(rng), _random_blob(rng)
    inter, union = np.logical_and(p, g).sum(), np.logical_or(p, g).sum()
    assert loc.dice(p, g) == pytest.approx(2 * inter / (p.sum() + g.sum()))
    assert loc.iou(p, g) == pytest.approx(inter / union)
    # 3D box IoU of two boxes, by hand.
    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    a[0:3, 0:3, 0:3] = True  # 27 voxels
    b[1:5, 1:4, 2:6] = True  # 4 * 3 * 4 = 48, overlap 2 * 2 * 1 = 4
    assert loc.bbox_iou(a, b) == pytest.approx(4 / (27 + 48 - 4))
    # Two diagonal voxels are one 26-connected component (box 2x2x2).
    c = np.zeros((6, 6, 6), bool)
    c[0, 0, 0] = c[1, 1, 1] = True
    assert loc.bbox_iou(c, c) == pytest.approx(1.0)
    c[5, 5, 5] = True  # a third, separate voxel: largest component = the diagonal pair
    big = np.zeros_like(c)
    big[0:2, 0:2, 0:2] = True
    assert loc.bbox_iou(c, big) == pytest.approx(1.0)
    s = np.zeros((5, 6, 7))
    s[2, 3, 4] = 1.0
    m = np.zeros((5, 6, 7), bool)
    m[2, 3, 6] = True
    assert not loc.pointing_game(s, m)
    assert loc.pointing_game(s, m, tolerance=2.0)


def test_localisation_metrics_volumes_with_hd95():
    rng = np.random.default_rng(5)
    masks = np.stack([_random_blob(rng, (8, 9, 10)) for _ in range(3)])
    masks[2] = False  # an empty GT is excluded
    maps = rng.random((3, 8, 9, 10))
    spacing = (1.0, 2.0, 0.5)
    out = loc.localisation_metrics(maps, masks, thresholds=(0.5,), hd95=True, spacing=spacing, return_per_image=True)
    assert out["n_evaluated"] == 2 and out["n_empty_gt"] == 1
    d_ref, h_ref = [], []
    for i in range(2):
        k = int(masks[i].sum())
        order = np.argsort(-maps[i].ravel(), kind="stable")[:k]
        pred = np.zeros(maps[i].size, bool)
        pred[order] = True
        pred = pred.reshape(maps[i].shape)
        d_ref.append(2 * (pred & masks[i]).sum() / (pred.sum() + masks[i].sum()))
        h_ref.append(_hd95_brute(pred, masks[i], spacing))
    assert out["thresholds"]["area"]["dice"] == pytest.approx(np.mean(d_ref))
    assert out["thresholds"]["area"]["hd95"] == pytest.approx(np.mean(h_ref))
    assert out["thresholds"]["area"]["n_hd95"] == 2
    assert out["per_image"]["thresholds"]["area"]["hd95"][2] is None
    # A volume-shaped valid mask broadcasts over the batch.
    valid = np.ones((8, 9, 10), bool)
    valid[0] = False
    out_v = loc.localisation_metrics(maps, masks, valid=valid)
    assert out_v["n_images"] == 3
    norm = loc.normalize_maps(maps * 5 + 1)
    assert norm.min() == pytest.approx(0.0) and norm.max() == pytest.approx(1.0)
