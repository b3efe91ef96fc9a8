"""benchmark-cams on volumes: per-volume scoring (Dice/HD95), 3D class-blind maps, orthogonal figures, NIfTI maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from lclsc_jax.explain import volume_figures
from lclsc_jax.protocols import cam_benchmark as cb


def _surface(m: np.ndarray) -> np.ndarray:
    """Voxels of ``m`` with a face neighbour outside it (border = outside), by shifting."""
    pad = np.pad(m, 1)
    inner = np.ones_like(m)
    for ax in range(3):
        for d in (-1, 1):
            inner &= np.roll(pad, d, axis=ax)[1:-1, 1:-1, 1:-1]
    return m & ~inner


def _hd95(p: np.ndarray, g: np.ndarray, spacing) -> float:
    a = np.argwhere(_surface(p)) * spacing
    b = np.argwhere(_surface(g)) * spacing
    d = cdist(a, b)
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


def _topk(m: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(m.size, bool)
    out[np.argsort(-m.ravel(), kind="stable")[:k]] = True
    return out.reshape(m.shape)


def _case(seed: int = 0, n: int = 3, shape=(7, 8, 9)):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n,) + shape, bool)
    for i in range(n):
        c = [rng.integers(2, s - 2) for s in shape]
        masks[i][tuple(slice(v - 2, v + 2) for v in c)] = True
    maps = ndimage.gaussian_filter(rng.random((n,) + shape), (0, 1, 1, 1))
    maps = (maps - maps.min(axis=(1, 2, 3), keepdims=True))
    maps /= maps.max(axis=(1, 2, 3), keepdims=True)
    return maps, masks


def test_localisation_row_volumes_with_hd95():
    maps, masks = _case()
    spacing = np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 0.5], [1.5, 1.5, 3.0]])
    row = cb.localisation_row(maps, masks, thresholds=(0.5,), spacing=spacing)
    d_area, h_area, h_half = [], [], []
    for i in range(len(maps)):
        p = _topk(maps[i], int(masks[i].sum()))
        d_area.append(2 * (p & masks[i]).sum() / (p.sum() + masks[i].sum()))
        h_area.append(_hd95(p, masks[i], spacing[i]))
        q = maps[i] >= 0.5
        h_half.append(_hd95(q, masks[i], spacing[i]))
    assert row["dice@area"] == pytest.approx(np.mean(d_area))
    assert row["hd95@area"] == pytest.approx(np.mean(h_area))
    assert row["hd95@0.5"] == pytest.approx(np.mean(h_half))
    assert row["n_evaluated"] == 3
    # 2D rows gain no HD95 unless asked.
    assert "hd95@area" not in cb.localisation_row(maps[:, 0], masks[:, 3])


def test_columns_for_volumes():
    cols = cb.benchmark_columns((0.5,), volumes=True)
    assert cols.index("hd95@area") == cols.index("dice@area") + 1
    assert "hd95@0.5" in cols and "hd95@otsu" in cols
    assert "hd95@area" not in cb.benchmark_columns((0.5,))
    assert "hd95@area" in cb.FRAME_METRICS


def test_blind_volume_maps():
    rng = np.random.default_rng(1)
    vols = (rng.random((2, 9, 10, 11, 2)) * 255).astype(np.uint8)
    lum = vols.astype(np.float64).mean(-1) / 255.0

    def mm(a):
        a = a - a.min(axis=(1, 2, 3), keepdims=True)
        return a / a.max(axis=(1, 2, 3), keepdims=True)

    std = np.stack([ndimage.generic_filter(v, np.std, size=7, mode="reflect") for v in lum])
    np.testing.assert_allclose(cb.blind_volume_map("local_std", vols), mm(std), atol=1e-5)
    from skimage.filters import difference_of_gaussians

    dog = np.stack([ndimage.gaussian_filter(np.abs(difference_of_gaussians(v, 1.0, 3.0)), 2.0, mode="nearest")
                    for v in lum])
    np.testing.assert_allclose(cb.blind_volume_map("dog", vols), mm(dog), atol=1e-5)
    c = cb.blind_volume_map("centre", vols)
    assert c.shape == (2, 9, 10, 11) and c[0, 4, 4, 5] == c.max() and c[0, 4, 4, 5] == c[0, 4, 5, 5]
    zz, yy, xx = np.meshgrid(np.arange(9) - 4, np.arange(10) - 4.5, np.arange(11) - 5, indexing="ij")
    np.testing.assert_allclose(c[1], mm(np.exp(-(zz**2 + yy**2 + xx**2) / (2 * 2.25**2))[None])[0], atol=1e-6)
    np.testing.assert_allclose(cb.blind_volume_map("random", vols, seed=3),
                               mm(np.random.default_rng(3).random((2, 9, 10, 11))), atol=1e-6)
    with pytest.raises(ValueError, match="unknown class-blind map"):
        cb.blind_volume_map("edges", vols)


def test_orthogonal_figure_and_grid(tmp_path):
    import matplotlib.image as mpimg

    rng = np.random.default_rng(2)
    vol = rng.random((10, 11, 12, 2)).astype(np.float32)
    heat = np.zeros((10, 11, 12))
    heat[3, 7, 5] = 1.0
    heat[6, 2, 9] = 0.5
    assert volume_figures.orthogonal_slices(heat) == (3, 7, 5)
    assert volume_figures.orthogonal_slices(np.zeros((4, 6, 8))) == (2, 3, 4)
    mask = np.zeros((10, 11, 12), bool)
    mask[2:5, 5:9, 3:7] = True
    path = volume_figures.orthogonal_figure(vol, heat, mask, str(tmp_path / "f.png"), "title")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 3 * img.shape[0]
    fig = volume_figures.orthogonal_figure(vol[..., 0], heat)
    assert len(fig.axes) == 8  # 4 panels + 4 colour bars
    grid = volume_figures.orthogonal_grid(vol, [("a", heat), ("failed one", None)], mask, str(tmp_path / "g.png"))
    assert mpimg.imread(grid).shape[0] > 200
    with pytest.raises(ValueError, match="shape"):
        volume_figures.orthogonal_figure(vol, heat[:-1])


def test_write_map_nifti_roundtrip(tmp_path):
    nib = pytest.importorskip("nibabel")
    heat = np.random.default_rng(0).random((5, 6, 7))
    affine = np.array([[0, 0, 2.0, -10], [0, 1.5, 0, 3], [-1.0, 0, 0, 7], [0, 0, 0, 1]])
    path = volume_figures.write_map_nifti(str(tmp_path / "m.nii.gz"), heat, affine)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(np.asarray(img.dataobj), heat.astype(np.float32))
    assert img.get_data_dtype() == np.float32


def test_benchmark_cams_end_to_end_on_volumes(tmp_path, monkeypatch):
    """benchmark_cams on a (fake-loaded) tiny3d run over volumes: table with HD95, 3D blind rows, figures."""
    import json
    import types

    import jax

    from lclsc_jax import models

    size, n = 8, 4
    model = models.create("tiny3d", 2, head="linear", in_channels=1, embed_dim=8)
    variables = model.init(jax.random.key(0), np.zeros((1, size, size, size, 1), np.float32), train=False)
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    recs = []
    for i in range(n):
        mask = np.zeros((size,) * 3, np.uint8)
        mask[2:5, 2 + i % 2:5 + i % 2, 3:6] = 1
        img = (rng.random((size,) * 3 + (1,)) * 120 + 100 * mask[..., None]).astype(np.uint8)
        recs.append({"image": img, "mask": mask, "label": i % 2, "affine": affine})
    run = types.SimpleNamespace(model=model, variables=variables, global_emb=None, step=1, class_names=["a", "b"],
                                cfg=types.SimpleNamespace(loss=types.SimpleNamespace(tau=0.1),
                                                          data=types.SimpleNamespace(source="brain3d")),
                                saliency_options=lambda m: {})
    ds = types.SimpleNamespace(has_masks=True, labels=np.array([r["label"] for r in recs]),
                               patients=np.array([f"p{i}" for i in range(n)]), source=recs)
    monkeypatch.setattr(cb.runs, "load_run", lambda workdir, which: run)
    monkeypatch.setattr(cb.loop, "load_dataset", lambda cfg: ds)
    monkeypatch.setattr(cb.runs, "run_splits", lambda workdir, cfg, d: None)
    monkeypatch.setattr(cb.runs, "split_indices", lambda split, splits, k: np.arange(k))
    out = tmp_path / "bench"
    rows = cb.benchmark_cams(str(tmp_path), methods=("gradcam",), stages=("last",), max_images=None,
                             out_dir=str(out), figure_images=1, faithfulness=True, batch_size=2, progress=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"gradcam", "blind:local_std", "blind:dog", "blind:centre", "blind:random"}
    for r in rows:
        assert r["error"] is None, r
        assert r["n_evaluated"] == n
        # None only where every map is flat (nothing at the mask's area), e.g. a ReLU-zeroed Grad-CAM of a random net
        assert r["hd95@area"] is None or r["hd95@area"] >= 0
    assert all(by[f"blind:{b}"]["hd95@area"] is not None for b in cb.BLIND_VOLUME_MAPS)
    # The centre baseline, scored independently: top-k voxels of the centred Gaussian vs each mask, HD95 in mm.
    c = cb.blind_volume_map("centre", np.stack([r["image"] for r in recs]))
    ref = [_hd95(_topk(c[i], int(recs[i]["mask"].sum())), recs[i]["mask"] > 0, np.array([2.0, 2.0, 2.0]))
           for i in range(n)]
    assert by["blind:centre"]["hd95@area"] == pytest.approx(np.mean(ref))
    meta = json.loads((out / "cam_benchmark.json").read_text())
    assert meta["volumes"] and meta["skipped_faithfulness"] == ["road"]
    assert "hd95@area" in (out / "cam_benchmark.csv").read_text().splitlines()[0]
    assert meta["figures"] and all((out / f).exists() for f in meta["figures"])
    frames = cb.load_frames(str(out / cb.FRAME_FILE))
    assert frames["columns"][("gradcam", model.last_stage, "hd95@area")].shape == (n,)
