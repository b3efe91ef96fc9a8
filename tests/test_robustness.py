"""Corruptions (data.corruptions) against independent references, mCE by hand, `lclsc robustness` end to end."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from scipy import integrate, ndimage, stats
from scipy.spatial import cKDTree
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from lclsc_jax import cli, explain
from lclsc_jax.data import fibre_bundle as fb
from lclsc_jax.data import normalize_images
from lclsc_jax.data import corruptions as K
from lclsc_jax.protocols import runs
from lclsc_jax.train import config as C
from lclsc_jax.train import loop

NAMES = K.CORRUPTION_NAMES
RANDOM = ("noise", "motion_blur", "fibre_pattern", "smeared")  # the ones that draw from the generator


def _disc(h: int, w: int) -> np.ndarray:
    """The inscribed disc (pixel centres), written out independently of the library."""
    cy = (np.arange(h) + 0.5) / h - 0.5
    cx = (np.arange(w) + 0.5) / w - 0.5
    return (cy[:, None] ** 2 + cx[None, :] ** 2) <= 0.25


def _pcle_frames(n: int = 3, size: int = 64, seed: int = 0) -> np.ndarray:
    """pCLE-like uint8 frames ``(n, size, size, 1)``: smooth texture inside the inscribed disc, black corners."""
    rng = np.random.default_rng(seed)
    tex = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), (0, 1.5, 1.5))
    tex = 0.45 + 0.2 * tex / tex.std()
    img = np.rint(np.clip(tex, 0, 1) * 255).astype(np.uint8) * _disc(size, size)[None]
    return img[..., None].astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray, v: np.ndarray) -> float:
    mse = np.mean((a[:, v].astype(float) - b[:, v].astype(float)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------- registry


def test_registry_and_schedule_are_data_with_five_severities():
    assert set(NAMES) == set(K.SEVERITY_SCHEDULE) == set(K.CORRUPTION_FAMILIES)
    assert len(NAMES) == 10
    for name, params in K.SEVERITY_SCHEDULE.items():
        assert params, name
        for key, values in params.items():
            assert len(values) == K.MAX_SEVERITY == 5, (name, key)
    with pytest.raises(ValueError, match="unknown corruption.*'fog'.*noise"):
        K.check_names(["noise", "fog"])
    with pytest.raises(ValueError, match="severity"):
        K.corrupt("noise", _pcle_frames(1), 6)
    with pytest.raises(ValueError, match="uint8"):
        K.corrupt("noise", _pcle_frames(1).astype(np.float32), 1)


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_the_identity_and_corners_stay_black(name):
    x = _pcle_frames()
    v = _disc(64, 64)
    np.testing.assert_array_equal(K.field_of_view(x), v)  # dark corners: the inscribed disc
    same = K.corrupt(name, x, 0, 3)
    np.testing.assert_array_equal(same, x)
    assert same is not x
    for s in (1, 5):
        y = K.corrupt(name, x, s, 3)
        assert y.dtype == np.uint8 and y.shape == x.shape
        np.testing.assert_array_equal(y[:, ~v], x[:, ~v])  # outside the field of view: untouched (black)
        assert not np.array_equal(y[:, v], x[:, v])  # inside: changed


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed(name):
    x = _pcle_frames(2)
    a = K.corrupt(name, x, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(a, K.corrupt(name, x, 3, np.random.default_rng(7)))
    if name in RANDOM:
        assert not np.array_equal(a, K.corrupt(name, x, 3, np.random.default_rng(8)))
    # The protocol's generator depends on (seed, name, severity) only.
    np.testing.assert_array_equal(K.corrupt(name, x, 2, 5), K.corrupt(name, x, 2, K.corruption_rng(5, name, 2)))


@pytest.mark.parametrize("name", NAMES)
def test_psnr_falls_with_severity(name):
    x = _pcle_frames(3, 96, seed=1)
    v = _disc(96, 96)
    p = [_psnr(x, K.corrupt(name, x, s, 0), v) for s in range(1, 6)]
    assert all(a > b for a, b in zip(p, p[1:])), p
    assert K.psnr(x, K.corrupt(name, x, 2, 0), v) == pytest.approx(p[1])


def test_a_frame_without_dark_corners_is_corrupted_whole():
    x = np.full((2, 16, 16, 1), 100, np.uint8)
    assert K.field_of_view(x).all()
    np.testing.assert_array_equal(K.corrupt("gain", x, 2, 0), np.full_like(x, round(100 * 0.5)))


# ----------------------------------------------------------------------------- noise


def _quantised_poisson_gaussian(x: float, photons: float, read: float) -> tuple[float, float]:
    """Exact mean and variance (grey levels) of rint(clip(255 (Poisson(p x) / p + N(0, r^2)), 0, 255)), p photons."""
    lam = photons * x
    ks = np.arange(0, int(lam + 12 * np.sqrt(lam) + 20))
    pk = stats.poisson.pmf(ks, lam)
    edges = (np.arange(-0.5, 256.0, 1.0)) / 255.0  # u8 value v <-> [v - 1/2, v + 1/2) / 255
    edges[0], edges[-1] = -np.inf, np.inf  # clipping
    cdf = stats.norm.cdf((edges[None, :] - ks[:, None] / photons) / read)
    pv = (pk[:, None] * np.diff(cdf, axis=1)).sum(axis=0)
    v = np.arange(256.0)
    mean = float((pv * v).sum())
    return mean, float((pv * (v - mean) ** 2).sum())


@pytest.mark.parametrize("level", [128, 40])
def test_noise_variance_matches_the_poisson_gaussian_model(level):
    x = np.full((1, 256, 256, 1), level, np.uint8)
    whole = np.ones((256, 256), bool)
    for s in range(1, 6):
        y = K.corrupt("noise", x, s, 11, fov=whole).astype(np.float64)
        p = K.SEVERITY_SCHEDULE["noise"]["photons"][s - 1]
        r = K.SEVERITY_SCHEDULE["noise"]["read_noise"][s - 1]
        mean, var = _quantised_poisson_gaussian(level / 255.0, p, r)
        d = y - level
        assert d.var() == pytest.approx(var, rel=0.03), s
        assert y.mean() == pytest.approx(mean, abs=4 * np.sqrt(var / d.size) + 1e-9), s
        if level == 128 and s <= 2:  # far from clipping: the closed form x/p + r^2 (+ 1/12 rounding)
            assert d.var() == pytest.approx(255.0**2 * (level / 255 / p + r**2) + 1 / 12, rel=0.03)


# ----------------------------------------------------------------------------- blurs


def _coverage(radius: float, half: int) -> np.ndarray:
    """Area of each pixel (centres -half..half) inside the disc of ``radius``, integrated with scipy.quad."""
    out = np.zeros((2 * half + 1, 2 * half + 1))
    for i, cy in enumerate(range(-half, half + 1)):
        for j, cx in enumerate(range(-half, half + 1)):
            y0, y1 = cy - 0.5, cy + 0.5

            def chord(x: float, y0: float = y0, y1: float = y1) -> float:
                h = np.sqrt(max(radius**2 - x * x, 0.0))
                return max(0.0, min(y1, h) - max(y0, -h))

            out[i, j] = integrate.quad(chord, cx - 0.5, cx + 0.5, limit=200)[0]
    return out


@pytest.mark.parametrize("radius", [0.64, 1.3, 2.56])
def test_disc_kernel_is_the_pixel_coverage_of_a_disc(radius):
    k = K.disc_kernel(radius)
    half = k.shape[0] // 2
    ref = _coverage(radius, half + 1)[1:-1, 1:-1]  # one ring more: nothing of the disc may be left out
    assert _coverage(radius, half + 1)[[0, -1], :].sum() == 0
    assert ref.sum() == pytest.approx(np.pi * radius**2, rel=1e-6)
    np.testing.assert_allclose(k, ref / ref.sum(), atol=2e-3)
    np.testing.assert_array_equal(K.disc_kernel(0.4), [[1.0]])  # inside one pixel: the identity


def test_defocus_is_a_normalised_disc_convolution_inside_the_fov():
    x = _pcle_frames(2, 64, seed=2)
    v = _disc(64, 64)
    for s in (1, 4):
        radius = K.SEVERITY_SCHEDULE["defocus"]["radius"][s - 1] * 64
        half = int(np.ceil(radius + 0.5))
        ker = _coverage(radius, half)
        ker /= ker.sum()
        y = K.corrupt("defocus", x, s, 0)
        for i in range(2):
            f = x[i, ..., 0] / 255.0
            num = ndimage.convolve(f * v, ker, mode="constant")
            den = ndimage.convolve(v.astype(float), ker, mode="constant")
            ref = np.rint(np.clip(num / np.where(v, den, 1.0), 0, 1) * 255)
            diff = np.abs(y[i, ..., 0].astype(float) - ref)[v]
            assert diff.max() <= 1 and diff.mean() < 0.05, (s, diff.max(), diff.mean())
    # A flat field of view stays flat (no dark rim from the black outside).
    flat = np.where(v[None, ..., None], np.uint8(90), np.uint8(0))
    np.testing.assert_array_equal(K.corrupt("defocus", flat, 5, 0), flat)


def test_motion_kernel_is_a_centred_streak_along_its_angle():
    for length, angle in ((6.0, 0.0), (9.0, 0.7), (12.0, 2.2)):
        k = K.motion_kernel(length, angle)
        assert k.sum() == pytest.approx(1.0)
        c = k.shape[0] // 2
        yy, xx = np.mgrid[-c:c + 1, -c:c + 1]
        assert (k * yy).sum() == pytest.approx(0, abs=1e-9) and (k * xx).sum() == pytest.approx(0, abs=1e-9)
        cov = np.array([[(k * yy * yy).sum(), (k * yy * xx).sum()], [(k * yy * xx).sum(), (k * xx * xx).sum()]])
        w, vec = np.linalg.eigh(cov)
        dy, dx = vec[:, 1]
        assert np.cos(np.arctan2(dy, dx) - angle) ** 2 == pytest.approx(1.0, abs=1e-6)  # major axis along angle
        assert w[1] == pytest.approx(length**2 / 12, rel=0.1)  # a uniform segment's variance


def test_motion_blur_follows_the_drawn_directions():
    rng = np.random.default_rng(0)
    n, size = 4, 96
    white = rng.integers(0, 256, (n, size, size, 1)).astype(np.uint8)
    whole = np.ones((size, size), bool)
    y = K.motion_blur(white, 3, np.random.default_rng(5), fov=whole).astype(float)
    angles = np.random.default_rng(5).uniform(0, np.pi, n)  # documented: the first n draws
    for i in range(n):
        # Blurred white noise: its autocorrelation is the kernel's, elongated along the motion.
        f = np.fft.fft2(y[i, ..., 0] - y[i, ..., 0].mean())
        acf = np.fft.fftshift(np.real(np.fft.ifft2(np.abs(f) ** 2)))
        c, r = size // 2, 10
        win = acf[c - r:c + r + 1, c - r:c + r + 1]
        win = np.where(win > 0.1 * acf[c, c], win, 0.0)  # the peak, not the sampling noise around it
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        cov = np.array([[(win * yy * yy).sum(), (win * yy * xx).sum()], [(win * yy * xx).sum(), (win * xx * xx).sum()]])
        _, vec = np.linalg.eigh(cov)
        dy, dx = vec[:, 1]  # the major axis
        assert abs(np.cos(np.arctan2(dy, dx) - angles[i])) > np.cos(np.deg2rad(5)), i
    # An image that does not vary along the motion is unchanged.
    rows = np.repeat(rng.integers(0, 256, (1, size, 1, 1)), size, axis=2).astype(np.uint8)
    np.testing.assert_array_equal(K.motion_blur(rows, 5, rng, fov=whole, angles=[0.0]), rows)
    np.testing.assert_array_equal(K.smeared(np.swapaxes(rows, 1, 2), 5, rng, fov=whole, angles=[np.pi / 2]),
                                  np.swapaxes(rows, 1, 2))


# ----------------------------------------------------------------------------- intensity


def _all_levels() -> tuple[np.ndarray, np.ndarray]:
    """A frame holding every grey level inside its disc (black corners) and the disc."""
    v = _disc(32, 32)
    img = np.zeros((32, 32), np.uint8)
    img[v] = np.arange(v.sum()) % 256
    return img[None, ..., None], v


@pytest.mark.parametrize("s", range(1, 6))
def test_gamma_gain_saturation_contrast_closed_forms(s):
    x, v = _all_levels()
    u = x.astype(np.float64) / 255.0
    sched = K.SEVERITY_SCHEDULE

    def u8(a: np.ndarray) -> np.ndarray:
        return np.where(v[None, ..., None], np.rint(np.clip(a, 0, 1) * 255), x).astype(np.uint8)

    np.testing.assert_array_equal(K.corrupt("gamma", x, s, 0), u8(u ** sched["gamma"]["gamma"][s - 1]))
    np.testing.assert_array_equal(K.corrupt("gain", x, s, 0), u8(u * sched["gain"]["gain"][s - 1]))
    np.testing.assert_array_equal(K.corrupt("saturated", x, s, 0), u8(u * sched["saturated"]["gain"][s - 1]))
    m = u[0, ..., 0][v].mean()
    np.testing.assert_array_equal(K.corrupt("contrast", x, s, 0), u8(m + sched["contrast"]["factor"][s - 1] * (u - m)))


def test_dark_dims_by_the_schedule():
    x = _pcle_frames(2, 64, seed=3)
    v = _disc(64, 64)
    for s in range(1, 6):
        y = K.corrupt("dark", x, s, 0)
        ratio = y[:, v].astype(float).mean() / x[:, v].astype(float).mean()
        assert ratio == pytest.approx(K.SEVERITY_SCHEDULE["dark"]["dim"][s - 1], abs=0.02)
        assert y[:, v].std() < x[:, v].std() * K.SEVERITY_SCHEDULE["dark"]["dim"][s - 1]  # and defocused


# ----------------------------------------------------------------------------- fibre bundle


def _reimage_reference(image, yx, gains, pitch):
    """Independent re-imaging: bilinear samples at the cores, normalised Gaussian splatting back (NumPy/SciPy)."""
    h, w = image.shape
    pos = yx + (h - 1) / 2.0
    vals = ndimage.map_coordinates(image, pos.T, order=1, mode="nearest") * gains

    def splat(v):
        out = np.zeros((h, w))
        y0, x0 = np.floor(pos[:, 0]).astype(int), np.floor(pos[:, 1]).astype(int)
        fy, fx = pos[:, 0] - y0, pos[:, 1] - x0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                yy, xx = y0 + dy, x0 + dx
                ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                np.add.at(out, (yy[ok], xx[ok]), (v * wy * wx)[ok])
        return out

    s = max(0.5 * pitch, 0.6)
    num, den = ndimage.gaussian_filter(splat(vals), s), ndimage.gaussian_filter(splat(np.ones(len(vals))), s)
    return np.where(den > 1e-3, num / np.maximum(den, 1e-6), 0.0)


def test_fibre_pattern_reimages_through_a_new_bundle_of_the_asked_density():
    size, s = 64, 4
    x = _pcle_frames(2, size, seed=4)
    y = K.corrupt("fibre_pattern", x, s, np.random.default_rng(9))
    n = int(K.SEVERITY_SCHEDULE["fibre_pattern"]["cores"][s - 1])
    sd = K.SEVERITY_SCHEDULE["fibre_pattern"]["transmission"][s - 1]
    # The same draws as the corruption (the simulator's bundle), then an independent re-imaging.
    bundle = fb.make_bundle(np.random.default_rng(9), n, size / 2, crosstalk=0.0, transmission_std=sd,
                            vignetting=0.0, dead_fraction=0.0, calibration_error=0.0)
    assert len(bundle.yx) == pytest.approx(n, rel=0.05)
    six = cKDTree(bundle.yx).query(bundle.yx, k=7)[0][:, 1:]
    assert np.median(six.mean(axis=1)) == pytest.approx(fb.core_pitch(n, size / 2), rel=0.05)
    assert np.std(np.log(bundle.transmission)) == pytest.approx(sd, rel=0.15)  # uncalibrated gains
    c = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size] - c
    inner = np.hypot(yy, xx) <= size / 2 - 1.5  # away from the simulator's soft field-of-view edge
    for i in range(2):
        ref = np.rint(np.clip(_reimage_reference(x[i, ..., 0] / 255.0, bundle.yx, bundle.transmission,
                                                 bundle.pitch), 0, 1) * 255)
        diff = np.abs(y[i, ..., 0].astype(float) - ref)[inner]
        assert diff.max() <= 1, diff.max()
    with pytest.raises(ValueError, match="square"):
        K.corrupt("fibre_pattern", np.zeros((1, 8, 10, 1), np.uint8), 1, np.random.default_rng(0))


# ----------------------------------------------------------------------------- mCE


def test_mean_corruption_error_by_hand():
    err = {"a": [0.2, 0.4], "b": [0.1, 0.1], "c": [0.3, 0.3]}
    ref = {"a": [0.4, 0.4], "b": [0.2, 0.3], "c": [0.0, 0.0]}
    out = K.mean_corruption_error(err, ref, clean=0.05, reference_clean=0.1)
    assert out["ce"]["a"] == pytest.approx(0.6 / 0.8)
    assert out["ce"]["b"] == pytest.approx(0.2 / 0.5)
    assert out["ce"]["c"] is None  # the reference makes no error: undefined, left out of the mean
    assert out["mce"] == pytest.approx((0.75 + 0.4) / 2) and out["n"] == 2
    assert out["relative_ce"]["a"] == pytest.approx((0.15 + 0.35) / (0.3 + 0.3))
    assert out["relative_ce"]["b"] == pytest.approx((0.05 + 0.05) / (0.1 + 0.2))
    assert out["relative_mce"] == pytest.approx((0.5 / 0.6 + 0.1 / 0.3) / 2)
    assert K.mean_corruption_error({"a": [0.1]}, {"a": [0.2]})["relative_ce"] is None
    with pytest.raises(ValueError, match="no errors"):
        K.mean_corruption_error({"a": [0.1]}, {"b": [0.1]})


# ----------------------------------------------------------------------------- the protocol, end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    cfg = C.load("tiny", {"data.cache_dir": str(root / "cache"), "train.steps": 8, "train.eval_every": 8,
                          "train.checkpoint_every": 8})
    loop.train(cfg, str(root / "run"), progress=False)
    return str(root / "run")


def test_cli_robustness_end_to_end(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "rob")
    rc = cli.main(["robustness", "--workdir", tiny_run, "--reference", tiny_run, "--corruptions", "gamma", "noise",
                   "--severities", "5", "1", "--max-images", "4", "--out", out])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "[robustness] gamma" in printed and "[robustness] noise" in printed and "## Accuracy" in printed
    for f in ("robustness.json", "robustness.csv", "robustness.md", "robustness.png", "examples.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    meta = json.load(open(os.path.join(out, "robustness.json")))
    assert meta["corruptions"] == ["gamma", "noise"] and meta["severities"] == [1, 5]
    assert [(r["corruption"], r["severity"]) for r in meta["rows"]] == [
        ("gamma", 0), ("gamma", 1), ("gamma", 5), ("noise", 0), ("noise", 1), ("noise", 5)]
    # Independent: the test frames, gamma in closed form, the run's predictions, sklearn's scores.
    run = runs.load_run(tiny_run)
    ds = loop.load_dataset(run.cfg)
    test_idx = np.asarray(json.load(open(os.path.join(tiny_run, "splits.json")))["indices"]["test"])
    images = np.stack([ds.source[int(i)]["image"] for i in test_idx])
    labels = np.asarray(ds.labels)[test_idx]
    v = _disc(*images.shape[1:3])
    g = K.SEVERITY_SCHEDULE["gamma"]["gamma"][4]
    gam5 = np.where(v[None, ..., None], np.rint(255 * (images / 255.0) ** g), images).astype(np.uint8)
    rows = {(r["corruption"], r["severity"]): r for r in meta["rows"]}
    for key, imgs in ((("gamma", 0), images), (("gamma", 5), gam5)):
        pred = runs.predict(run, imgs)["probs"].argmax(1)
        assert rows[key]["accuracy"] == pytest.approx(accuracy_score(labels, pred))
        assert rows[key]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
        assert rows[key]["error"] == pytest.approx(1 - accuracy_score(labels, pred))
    # Each frame's correctness, for intervals over patients: the same predictions, rows named.
    fr = np.load(os.path.join(out, "frames.npz"))
    assert list(fr["conditions"]) == ["clean/0", "gamma/1", "gamma/5", "noise/1", "noise/5"]
    assert fr["correct"].shape == fr["reference_correct"].shape == (5, len(test_idx))
    np.testing.assert_array_equal(fr["indices"], test_idx)
    np.testing.assert_array_equal(fr["patients"], np.asarray(ds.patients)[test_idx].astype(str))
    np.testing.assert_array_equal(fr["correct"][2], runs.predict(run, gam5)["probs"].argmax(1) == labels)
    assert meta["files"]["frames"] == "frames.npz"
    # Grad-CAM Dice at the mask's area on the clean frames, by hand: top-k of the disc, k = the mask's area.
    sal = np.asarray(meta["saliency_indices"])
    assert 0 < len(sal) <= 4 and set(sal) <= set(test_idx.tolist())
    recs = [ds.source[int(i)] for i in sal]
    x = np.stack([r["image"] for r in recs])
    masks = np.stack([np.asarray(r["mask"]) > 0 for r in recs]) & v
    maps = np.asarray(explain.saliency("gradcam", run.model, run.variables, normalize_images(x),
                                       np.asarray([r["label"] for r in recs], np.int32), stage="last",
                                       global_emb=run.global_emb, tau=run.cfg.loss.tau))
    dices = []
    for m, gt in zip(maps, masks):
        order = np.argsort(-m[v], kind="stable")
        pred = np.zeros(v.sum(), bool)
        pred[order[:gt.sum()]] = True
        t = gt[v]
        dices.append(2 * (pred & t).sum() / (pred.sum() + t.sum()))
    assert rows[("gamma", 0)]["gradcam_dice@area"] == pytest.approx(np.mean(dices), abs=1e-6)
    assert rows[("gamma", 0)]["sc_dice@area"] is not None  # a contrastive run: SC maps too
    # The run as its own reference: every corruption error is 1 (where the reference errs at all).
    ce = meta["corruption_error"]
    for c in ("gamma", "noise"):
        if sum(rows[(c, s)]["error"] for s in (1, 5)) > 0:
            assert ce["ce"][c] == pytest.approx(1.0)
    assert ce["mce"] == pytest.approx(1.0)
    with open(os.path.join(out, "robustness.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and float(table[2]["accuracy"]) == pytest.approx(rows[("gamma", 5)]["accuracy"])
    md = open(os.path.join(out, "robustness.md")).read()
    assert "| corruption | 0 | 1 | 5 | mean 1,5 | CE | rel. CE |" in md and "mCE" in md


@pytest.mark.parametrize("argv, match", [
    (["--corruptions", "noise", "fog"], "unknown corruption(s) 'fog'"),
    (["--severities", "0", "6"], "severities must be in 1..5"),
])
def test_cli_bad_input_is_one_line_with_exit_code_2(tiny_run, capsys, argv, match):
    rc = cli.main(["robustness", "--workdir", tiny_run, *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("lclsc robustness: error:") and match in err


def test_a_reference_that_trained_on_the_test_frames_is_refused(tiny_run, tmp_path, capsys):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_run, ref, ignore=shutil.ignore_patterns("robustness"))
    splits = json.loads((ref / "splits.json").read_text())
    splits["indices"]["train"] += splits["indices"]["test"][:3]
    (ref / "splits.json").write_text(json.dumps(splits))
    rc = cli.main(["robustness", "--workdir", tiny_run, "--reference", str(ref), "--corruptions", "gain",
                   "--severities", "1", "--max-images", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "trained or validated on 3 of the test frames" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
