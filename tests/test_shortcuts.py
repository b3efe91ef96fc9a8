"""Global statistics and class-blind maps against independent computations (SciPy, scikit-image, loops)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats
from skimage.filters import difference_of_gaussians

from lclsc_jax.evaluate import shortcuts as S


def _disc(h: int, w: int) -> np.ndarray:
    c_y = (np.arange(h) + 0.5) / h - 0.5
    c_x = (np.arange(w) + 0.5) / w - 0.5
    return (c_y[:, None] ** 2 + c_x[None, :] ** 2) <= 0.25


def _feature(feats: np.ndarray, names: tuple[str, ...], name: str) -> np.ndarray:
    return feats[:, names.index(name)]


def test_luminance_scales_by_dtype_and_weights_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    expect = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(S.to_luminance(rgb), expect)
    g16 = rng.integers(0, 65536, (2, 5, 4, 1), dtype=np.uint16)
    np.testing.assert_allclose(S.to_luminance(g16), g16[..., 0] / 65535.0)
    f = rng.random((2, 5, 4))
    np.testing.assert_array_equal(S.to_luminance(f), f)
    with pytest.raises(ValueError, match="shape"):
        S.to_luminance(np.zeros((4, 4)))


def test_names_and_groups():
    names = S.feature_names()
    assert len(names) == 11 + 9 + 2 and len(set(names)) == len(names)
    assert [S.feature_group(n) for n in names].count("histogram") == 11
    assert "spectrum.band8" in names and "gradient.coherence" in names
    with pytest.raises(ValueError):
        S.feature_group("colour.hue")


def test_histogram_statistics_match_scipy_and_numpy_inside_the_fov():
    rng = np.random.default_rng(1)
    x = (rng.gamma(2.0, 30.0, (3, 20, 24, 1))).clip(0, 255).astype(np.uint8)
    v = _disc(20, 24)
    feats, names = S.global_statistics(x, v)
    assert feats.shape == (3, len(names)) and feats.dtype == np.float64
    for i in range(3):
        vals = x[i, ..., 0][v] / 255.0
        assert _feature(feats, names, "histogram.mean")[i] == pytest.approx(vals.mean())
        assert _feature(feats, names, "histogram.std")[i] == pytest.approx(vals.std())
        assert _feature(feats, names, "histogram.skewness")[i] == pytest.approx(stats.skew(vals))
        assert _feature(feats, names, "histogram.kurtosis")[i] == pytest.approx(stats.kurtosis(vals))
        for q in (1, 5, 25, 50, 75, 95, 99):
            assert _feature(feats, names, f"histogram.p{q:02d}")[i] == pytest.approx(np.percentile(vals, q))
    # Pixels outside the FOV do not matter.
    y = x.copy()
    y[:, ~v] = 255
    np.testing.assert_allclose(S.global_statistics(y, v)[0], feats)
    flat = S.global_statistics(np.full((1, 8, 8), 0.3))[0]
    assert np.all(np.isfinite(flat)) and _feature(flat, names, "histogram.skewness")[0] == 0.0


def _loop_spectrum_fractions(img: np.ndarray, valid: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, float]:
    """Band fractions and total energy of a directly summed DFT of ``(img - mean_valid) * valid``."""
    h, w = img.shape
    xw = (img - img[valid].mean()) * valid
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    energy = np.zeros(len(edges) - 1)
    for u in range(h):
        for k in range(w):
            coef = np.sum(xw * np.exp(-2j * np.pi * (u * rows / h + k * cols / w)))
            fu = u / h if u <= h // 2 else u / h - 1  # frequency in cycles/px
            fk = k / w if k <= w // 2 else k / w - 1
            r = np.hypot(fu, fk)
            if r == 0:
                continue
            b = min(max(int(np.sum(edges <= r)) - 1, 0), len(edges) - 2)
            energy[b] += abs(coef) ** 2
    return energy / energy.sum(), energy.sum()


def test_radial_spectrum_matches_a_direct_dft():
    rng = np.random.default_rng(2)
    img = ndimage.gaussian_filter(rng.random((16, 16)), 1.0)
    v = _disc(16, 16)
    edges = np.geomspace(1 / 16, np.sqrt(0.5), 9)
    np.testing.assert_allclose(S.spectrum_band_edges(16, 16), edges)
    feats, names = S.global_statistics(img[None], v)
    frac, total = _loop_spectrum_fractions(img, v, edges)
    got = np.array([_feature(feats, names, f"spectrum.band{b}")[0] for b in range(1, 9)])
    np.testing.assert_allclose(got, frac, atol=1e-10)
    assert got.sum() == pytest.approx(1.0)
    assert _feature(feats, names, "spectrum.log_energy")[0] == pytest.approx(np.log(total / (16 * 16 * v.sum())))
    assert total / (16 * 16 * v.sum()) == pytest.approx(img[v].var())  # Parseval


def test_a_sinusoid_lands_in_its_band():
    n = 32
    yy, xx = np.mgrid[0:n, 0:n]
    edges = np.geomspace(1 / n, np.sqrt(0.5), 9)
    for f in (2 / n, 4 / n, 8 / n):  # whole numbers of cycles: no leakage on the full frame
        img = 0.5 + 0.3 * np.cos(2 * np.pi * f * xx + 0.3)
        feats, names = S.global_statistics(img[None])
        band = int(np.searchsorted(edges, f, side="right"))  # 1-based band index
        assert _feature(feats, names, f"spectrum.band{band}")[0] == pytest.approx(1.0, abs=1e-9), (f, band)
    # Diagonal frequency (fx, fy) = (4, 4) / 32: radius 0.177 cycles/px.
    img = np.cos(2 * np.pi * 4 * (xx + yy) / n)
    feats, names = S.global_statistics(img[None])
    band = int(np.searchsorted(edges, np.hypot(4 / n, 4 / n), side="right"))
    assert _feature(feats, names, f"spectrum.band{band}")[0] == pytest.approx(1.0, abs=1e-9)


def test_gradient_magnitude_and_coherence_match_loops_and_eigenvalues():
    rng = np.random.default_rng(3)
    img = rng.random((14, 12))
    v = _disc(14, 12)
    feats, names = S.global_statistics(img[None], v)
    mags, gxs, gys = [], [], []
    for r in range(14):
        for c in range(12):
            if r in (0, 13) or c in (0, 11) or not v[r - 1:r + 2, c - 1:c + 2].all():
                continue
            gy = (img[r + 1, c] - img[r - 1, c]) / 2
            gx = (img[r, c + 1] - img[r, c - 1]) / 2
            mags.append(np.hypot(gx, gy))
            gxs.append(gx)
            gys.append(gy)
    gxs, gys = np.array(gxs), np.array(gys)
    assert _feature(feats, names, "gradient.magnitude_mean")[0] == pytest.approx(np.mean(mags))
    tensor = np.array([[np.sum(gxs * gxs), np.sum(gxs * gys)], [np.sum(gxs * gys), np.sum(gys * gys)]])
    lo, hi = np.linalg.eigvalsh(tensor)
    assert _feature(feats, names, "gradient.coherence")[0] == pytest.approx((hi - lo) / (hi + lo))
    yy, xx = np.mgrid[0:32, 0:32]
    stripes = np.sin(2 * np.pi * (xx * np.cos(0.4) + yy * np.sin(0.4)) / 6)
    coh = S.global_statistics(np.stack([stripes, rng.random((32, 32))]))[0][:, names.index("gradient.coherence")]
    assert coh[0] > 0.95 and coh[1] < 0.2


def test_local_std_matches_generic_filter_and_masks_the_fov():
    rng = np.random.default_rng(4)
    img = rng.random((2, 15, 13))
    got = S.blind_map("local_std", img)
    for i in range(2):
        ref = ndimage.generic_filter(img[i], np.std, size=7, mode="reflect")
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        np.testing.assert_allclose(got[i], ref, atol=1e-9)
    # With a field of view only valid pixels enter a window (loop reference, reflected borders).
    v = _disc(15, 13)
    got = S.local_std_map(img, v)
    pad_x = np.pad(img[0], 3, mode="symmetric")
    pad_v = np.pad(v, 3, mode="symmetric")
    ref = np.zeros((15, 13))
    for r in range(15):
        for c in range(13):
            win, ok = pad_x[r:r + 7, c:c + 7], pad_v[r:r + 7, c:c + 7]
            ref[r, c] = win[ok].std() if ok.any() else 0.0
    ref = np.where(v, (ref - ref[v].min()) / (ref[v].max() - ref[v].min()), 0.0)
    np.testing.assert_allclose(got[0], ref, atol=1e-9)
    assert np.all(got[:, ~v] == 0)


def test_dog_matches_skimage_and_ignores_pixels_outside_the_fov():
    rng = np.random.default_rng(5)
    img = rng.random((2, 24, 20))
    got = S.blind_map("dog", img, sigma_low=1.0, sigma_high=3.0, smooth=2.0)
    for i in range(2):
        band = np.abs(difference_of_gaussians(img[i], 1.0, 3.0))
        ref = ndimage.gaussian_filter(band, 2.0, mode="nearest")
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        np.testing.assert_allclose(got[i], ref, atol=1e-9)
    v = _disc(24, 20)
    a = S.dog_map(img, v)
    other = img.copy()
    other[:, ~v] = rng.random(((~v).sum(),))
    np.testing.assert_allclose(S.dog_map(other, v), a, atol=1e-12)
    np.testing.assert_allclose(S.local_std_map(other, v), S.local_std_map(img, v), atol=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        S.dog_map(img, sigma_low=3.0, sigma_high=1.0)


def test_centre_and_random_maps():
    v = _disc(21, 21)
    c = S.blind_map("centre", np.zeros((2, 21, 21, 1), np.uint8), v, sigma=0.25)
    yy, xx = np.mgrid[0:21, 0:21] - 10.0
    g = np.exp(-(yy**2 + xx**2) / (2 * (0.25 * 21) ** 2))
    ref = np.where(v, (g - g[v].min()) / (g[v].max() - g[v].min()), 0.0)
    np.testing.assert_allclose(c[1], ref, atol=1e-12)
    assert c[0, 10, 10] == 1.0
    r1 = S.blind_map("random", np.zeros((3, 21, 21)), v, seed=1)
    np.testing.assert_array_equal(r1, S.blind_map("random", np.zeros((3, 21, 21)), v, seed=1))
    assert not np.allclose(r1, S.blind_map("random", np.zeros((3, 21, 21)), v, seed=2))
    assert np.all(r1[:, ~v] == 0) and abs(r1[:, v].mean() - 0.5) < 0.05
    with pytest.raises(ValueError, match="unknown class-blind map"):
        S.blind_map("saliency", np.zeros((1, 4, 4)))


@pytest.mark.parametrize("name", S.BLIND_MAPS)
def test_every_blind_map_is_in_unit_range_with_zero_outside(name):
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (3, 18, 18, 3), dtype=np.uint8)
    v = _disc(18, 18)
    m = S.blind_map(name, img, v)
    assert m.shape == (3, 18, 18)
    assert np.all(m[:, ~v] == 0)
    for i in range(3):
        assert m[i][v].min() == pytest.approx(0.0) and m[i][v].max() == pytest.approx(1.0)
    if name in ("local_std", "dog"):
        assert np.all(S.blind_map(name, np.full((1, 18, 18), 0.4), v) == 0)  # flat frame -> 0


def test_inscribed_disc_closed_form_and_detection():
    np.testing.assert_array_equal(S.inscribed_disc(4, 4), [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
    assert S.inscribed_disc(1, 1).all() and S.inscribed_disc(2, 2).all()
    for h, w in ((64, 64), (15, 21)):
        yy, xx = np.mgrid[:h, :w]
        want = ((yy + 0.5) / h - 0.5) ** 2 + ((xx + 0.5) / w - 0.5) ** 2 <= 0.25
        np.testing.assert_array_equal(S.inscribed_disc(h, w), want)
        d = S.inscribed_disc(h, h)
        assert all(np.array_equal(d, np.rot90(d, k)) for k in range(4)) and np.array_equal(d, d[::-1])
    rng = np.random.default_rng(7)
    img = rng.integers(40, 256, (20, 32, 32, 1), dtype=np.uint8)
    disc = img * _disc(32, 32)[None, :, :, None]
    assert S.detect_circular_fov(disc)["circular"]
    assert not S.detect_circular_fov(img)["circular"]
    mixed = disc.copy()
    mixed[:3] = img[:3]  # 15% of frames with bright corners: not "almost every frame"
    det = S.detect_circular_fov(mixed)
    assert not det["circular"] and det["dark_fraction"] == pytest.approx(0.85)


def test_estimate_fov_measures_a_disc_smaller_than_the_inscribed_one():
    rng = np.random.default_rng(8)
    n, size = 12, 64
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    true = np.hypot(yy, xx) <= 0.44 * size  # radius 28.2 px, inscribed 32
    img = (rng.uniform(0.2, 0.9, (n, size, size)) * true).astype(np.float64)
    img[:2] = 0.0  # two dark (non-diagnostic) frames do not move the median much
    est = S.estimate_fov(img)
    assert est["circular"] and 28 <= est["radius_px"] <= 29.5
    v = est["valid"]
    assert not (v & ~true).any() and v.sum() > 0.85 * true.sum()
    # A blind map computed inside the measured disc has no ring at the dark rim.
    m = S.local_std_map(img[2:], v)
    rim = true & ~v
    assert m[:, rim].max() == 0.0
    assert S.estimate_fov(rng.random((4, 32, 32)))["valid"] is None  # bright corners: not circular
    full = S.estimate_fov(rng.uniform(0.2, 1, (4, 32, 32)) * _disc(32, 32))
    assert full["radius_px"] == 16 and full["valid"].sum() >= 0.8 * _disc(32, 32).sum()
