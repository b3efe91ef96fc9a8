"""The pCLE simulator: fibre-bundle optics, detector noise, probe passes, tissue arrangements, the dataset.

Each physical step is checked against a closed form or an independent NumPy computation; the
dataset against its own invariants (determinism, metadata, masks) and against the property the
simulator exists for: global statistics do not give the class away, a planted shortcut does.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lclsc_jax import data
from lclsc_jax.data import fibre_bundle as fb
from lclsc_jax.data import probe, synthetic, tissue

SMALL = data.SyntheticConfig(num_patients=6, images_per_patient=6, image_size=32, seed=7)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return data.load(synthetic=SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def arrays64():
    """12 patients x 10 frames at 64 px (a few seconds)."""
    return data.generate_arrays(data.SyntheticConfig(num_patients=12, images_per_patient=10, image_size=64, seed=3))


# ----------------------------------------------------------------------------- fibre bundle


def test_hex_lattice_holds_the_requested_number_of_cores():
    rng = np.random.default_rng(0)
    for n in (2_000, 10_000, 30_000):
        b = fb.make_bundle(rng, n, fov_radius=60.0)
        assert abs(len(b.yx) - n) / n < 0.03, (n, len(b.yx))
        assert np.hypot(b.yx[:, 0], b.yx[:, 1]).max() <= 60.0
        # the six neighbours of a core sit one pitch away (jitter 8 %)
        d = np.linalg.norm(b.yx[b.neighbours] - b.yx[:, None], axis=2)
        assert abs(np.median(d) - b.pitch) / b.pitch < 0.05


def test_reconstruction_of_a_uniform_field_is_uniform_inside_the_fov():
    """Normalised convolution is exact for a constant (any core layout, dead cores included)."""
    b = fb.make_bundle(np.random.default_rng(1), 3_000, fov_radius=30.0)
    img = fb.reconstruct(b, np.full(len(b.yx), 0.7, np.float32), 64)
    inner = fb.fov_mask(64, 28.0) == 1.0
    np.testing.assert_allclose(img[inner], 0.7, rtol=1e-4)
    assert (img[fb.fov_mask(64, 30.0) == 0] == 0).all()


def test_raw_honeycomb_peaks_at_the_lattice_frequency():
    """The raw bundle image's spectrum peaks at the first hexagonal order 2 / (sqrt(3) pitch)."""
    size = 256
    b = fb.make_bundle(np.random.default_rng(2), 4_000, fov_radius=120.0, jitter=0.0, transmission_std=0.0,
                       vignetting=0.0, dead_fraction=0.0)
    raw = fb.reconstruct(b, np.ones(len(b.yx), np.float32), size, interpolate=False)
    p = np.abs(np.fft.fftshift(np.fft.fft2(raw - raw[raw > 0].mean() * (raw > 0)))) ** 2
    f = np.fft.fftshift(np.fft.fftfreq(size))
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    bins = np.linspace(0.02, 0.5, 97)
    radial = [p[(fr >= lo) & (fr < hi)].mean() for lo, hi in zip(bins[:-1], bins[1:])]
    peak = 0.5 * (bins[np.argmax(radial)] + bins[np.argmax(radial) + 1])
    expected = 2 / (np.sqrt(3) * b.pitch)
    assert abs(peak - expected) < 0.01, (peak, expected)


def test_crosstalk_is_a_neighbour_average():
    b = fb.make_bundle(np.random.default_rng(3), 1_000, fov_radius=20.0, crosstalk=0.1)
    s = np.random.default_rng(4).uniform(size=len(b.yx)).astype(np.float32)
    ref = np.array([0.9 * s[k] + 0.1 * np.mean(s[b.neighbours[k]]) for k in range(len(s))])
    np.testing.assert_allclose(fb.crosstalk(b, s), ref, rtol=1e-6)
    np.testing.assert_allclose(fb.crosstalk(b, np.ones_like(s)), 1.0, rtol=1e-6)


def test_detector_noise_is_poisson_plus_gaussian():
    """Calibrated values: mean = signal (t/t_cal), variance = (lam + read^2) / (photons t_cal)^2."""
    b = fb.make_bundle(np.random.default_rng(5), 500, fov_radius=12.0, calibration_error=0.0, dead_fraction=0.0)
    rng = np.random.default_rng(6)
    signal = np.full(len(b.yx), 0.5, np.float32)
    draws = np.stack([fb.detect(rng, b, signal, photons=40.0, read_noise=3.0) for _ in range(400)])
    np.testing.assert_allclose(draws.mean(0).mean(), 0.5, rtol=0.02)
    lam = 40.0 * b.transmission * 0.5
    var_ref = (lam + 9.0) / (40.0 * b.calibration) ** 2
    np.testing.assert_allclose(draws.var(0).mean(), var_ref.mean(), rtol=0.05)
    np.testing.assert_array_equal(fb.detect(None, b, signal, 40.0, 3.0), signal)  # noise off: exact


# ----------------------------------------------------------------------------- probe passes


def test_pass_poses_overlap_and_stay_on_the_canvas():
    rng = np.random.default_rng(7)
    ps = probe.probe_pass(rng, 200, canvas=300, fov_radius=60.0, fast_prob=0.0)
    step = np.linalg.norm(np.diff(ps.centres, axis=0), axis=1)
    assert step.max() <= 0.15 * 120 + 1e-6 and step.min() > 0  # moving, by <= 15 % of the diameter
    assert (ps.centres >= 62).all() and (ps.centres <= 238).all()
    assert not ps.blur.any() and ps.diagnostic.all()
    indep = probe.probe_pass(rng, 200, canvas=300, fov_radius=60.0, motion=False)
    assert np.median(np.linalg.norm(np.diff(indep.centres, axis=0), axis=1)) > 30


def test_nondiagnostic_fraction_and_kinds():
    rng = np.random.default_rng(8)
    kinds = [k for _ in range(300) for k in probe.probe_pass(rng, 20, 300, 60.0, nondiagnostic=0.1).kind]
    nd = np.mean([k != "diagnostic" for k in kinds])
    assert abs(nd - 0.1) < 0.02, nd
    assert {k for k in kinds if k != "diagnostic"} == set(probe.NONDIAGNOSTIC_KINDS)


def test_frame_to_canvas_is_a_rotation_plus_shift():
    yx = np.array([[0.0, 1.0], [2.0, 0.0]])
    out = probe.frame_to_canvas(yx, np.array([10.0, 20.0]), np.pi / 2)
    # x -> y: the point one pixel right of the centre lands one pixel below it
    np.testing.assert_allclose(out, [[11.0, 20.0], [10.0, 18.0]], atol=1e-12)


# ----------------------------------------------------------------------------- tissue


def _axial_resultant(theta: np.ndarray) -> float:
    """Mean resultant length of axial angles (1 = all parallel, ~0 = uniformly random)."""
    return float(np.abs(np.mean(np.exp(2j * theta))))


def _params(**kw) -> tissue.TissueParams:
    base = dict(cell_length=8.0, aspect=3.0, cells_per_px2=0.01, round_fraction=0.1, cell_brightness=0.4,
                background=0.2, focus_radius=20.0, orientation_jitter=np.deg2rad(5), vessels=0.0, file_length=1.5,
                fibre_period=4.0, fibre_contrast=2.0, tract_bias=0.0)
    return tissue.TissueParams(**{**base, **kw})


def _grid_lesion(size: int, step: int = 60, radius: float = 20.0) -> tissue.Lesion:
    lesion = tissue.Lesion.empty()
    for cy in range(step, size - step // 2, step):
        for cx in range(step, size - step // 2, step):
            lesion.add(np.array([cy, cx], float), radius)
    return lesion


def test_fibre_directions_have_the_class_order_inside_foci_only():
    rng = np.random.default_rng(9)
    lesion = _grid_lesion(620)
    yx = rng.uniform(0, 620, (60_000, 2))
    inside = lesion.contains(yx)
    _, nearest = tissue.cKDTree(lesion.centres).query(yx)
    for arrangement in ("parallel", "crossing"):
        th = tissue.fibre_directions(np.random.default_rng(1), yx, lesion, arrangement, _params())
        assert _axial_resultant(th[~inside]) < 0.03  # background: no order
        per_focus = [th[inside & (nearest == j)] for j in range(len(lesion.radii))]
        r2 = np.median([_axial_resultant(t) for t in per_focus])  # one direction: |<exp(2i theta)>| ~ 1
        r4 = np.median([abs(np.mean(np.exp(4j * t))) for t in per_focus])  # two at right angles: only 4-fold order
        if arrangement == "parallel":
            assert r2 > 0.95 and r4 > 0.9
        else:
            assert r2 < 0.2 and r4 > 0.9
    biased = tissue.fibre_directions(np.random.default_rng(2), yx, tissue.Lesion.empty(), None, _params(tract_bias=2.0))
    assert _axial_resultant(biased) > 0.5  # tracts: the background leans one way


def test_fibre_texture_statistics_do_not_depend_on_the_arrangement():
    """Histogram and radially averaged power spectrum are the same for random, parallel and crossing fibres."""
    shape = (256, 256)
    lesion = tissue.Lesion.empty()
    lesion.add(np.array([128.0, 128.0]), 400.0)  # one focus covering the whole canvas
    stats = {}
    for arrangement in (None, "parallel", "crossing"):
        texs = [tissue.fibre_texture(np.random.default_rng(s), shape, _params(), lesion, arrangement)
                for s in range(6)]
        x = np.stack(texs)
        p = np.mean([np.abs(np.fft.fft2(t)) ** 2 for t in texs], axis=0)
        f = np.fft.fftfreq(shape[0])
        fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
        edges = np.linspace(0.05, 0.45, 9)
        bands = np.array([p[(fr >= lo) & (fr < hi)].mean() for lo, hi in zip(edges[:-1], edges[1:])])
        stats[arrangement] = (np.percentile(x, [1, 10, 50, 90, 99]), bands / bands.sum())
    for arrangement in ("parallel", "crossing"):
        np.testing.assert_allclose(stats[arrangement][0], stats[None][0], atol=0.08)
        np.testing.assert_allclose(stats[arrangement][1], stats[None][1], rtol=0.1, atol=0.003)


def test_gabor_kernel_runs_along_its_angle():
    """The kernel's spectrum peaks at 1/period, perpendicular to the fibre direction."""
    period, angle = 5.0, np.deg2rad(30)
    g = tissue._gabor(period, angle, 3 * period)
    n = 128
    pad = np.zeros((n, n), np.float32)
    pad[: g.shape[0], : g.shape[1]] = g
    p = np.abs(np.fft.fft2(pad)) ** 2
    iy, ix = np.unravel_index(np.argmax(p), p.shape)
    fy, fx = np.fft.fftfreq(n)[iy], np.fft.fftfreq(n)[ix]
    assert abs(np.hypot(fy, fx) - 1 / period) < 1.5 / n
    direction = np.array([np.sin(angle), np.cos(angle)])  # (y, x) along the fibres
    assert abs(np.dot([fy, fx], direction)) / np.hypot(fy, fx) < 0.1  # the wave vector is across them


def test_render_cells_matches_a_direct_sum_of_gaussians():
    """The binned FFT renderer equals a per-cell sum of anisotropic Gaussians at the bin angles."""
    rng = np.random.default_rng(10)
    n, shape, length, aspect = 30, (48, 48), 9.0, 3.0
    yx = rng.uniform(8, 40, (n, 2))
    k = tissue.ORIENTATION_BINS
    theta = rng.integers(0, k, n) * np.pi / k  # exactly on bin centres
    amp = rng.uniform(0.5, 1.0, n)
    out = tissue.render_cells(shape, yx, theta, amp, np.zeros(n, bool), length, aspect)
    sl, sw = 0.3 * length, 0.3 * length / aspect
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    ref = np.zeros(shape)
    for (cy, cx), t, a in zip(np.rint(yx), theta, amp):  # integer positions: bilinear splat is exact
        u = np.cos(t) * (xx - cx) + np.sin(t) * (yy - cy)
        v = -np.sin(t) * (xx - cx) + np.cos(t) * (yy - cy)
        r = np.ceil(3 * sl)  # the kernel's square support
        ref += a * np.exp(-0.5 * ((u / sl) ** 2 + (v / sw) ** 2)) * (np.abs(xx - cx) <= r) * (np.abs(yy - cy) <= r)
    out_int = tissue.render_cells(shape, np.rint(yx), theta, amp, np.zeros(n, bool), length, aspect)
    np.testing.assert_allclose(out_int, ref, atol=1e-4)
    assert out.shape == shape and np.isfinite(out).all()


# ----------------------------------------------------------------------------- the dataset


def test_generator_is_deterministic_and_seed_dependent():
    a = data.generate_arrays(SMALL)
    b = data.generate_arrays(SMALL)
    for k in ("image", "mask", "label", "patient", "sequence", "frame", "diagnostic"):
        assert a[k].tobytes() == b[k].tobytes(), k
    c = data.generate_arrays(dataclasses.replace(SMALL, seed=8))
    assert a["image"].tobytes() != c["image"].tobytes()


def test_built_dataset_has_the_generated_bytes_and_metadata(built):
    ref = data.generate_arrays(SMALL)
    assert len(built.source) == SMALL.num_images == len(built.labels)
    assert built.has_masks and built.num_classes == 3 and built.channels == 1
    for i in range(SMALL.num_images):
        ex = built.source[i]
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 1)
        assert ex["image"].tobytes() == ref["image"][i].tobytes()
        assert ex["mask"].tobytes() == ref["mask"][i].tobytes()
        assert ex["label"] == ref["label"][i] == built.labels[i]
        assert ex["patient"] == ref["patient"][i] == built.patients[i]
    np.testing.assert_array_equal(built.diagnostic, ref["diagnostic"])
    np.testing.assert_array_equal(built.frame, ref["frame"])
    expected_seq = [f"{p}-s{s}" for p, s in zip(ref["patient"], ref["sequence"])]
    assert built.sequence.tolist() == expected_seq


def test_pass_metadata_predicts_the_rendered_flags():
    cfg = dataclasses.replace(SMALL, nondiagnostic_fraction=0.3, images_per_patient=9)
    for p in range(3):
        meta = synthetic.pass_metadata(cfg, p)
        recs = synthetic.generate_patient(cfg, p)
        assert [(m["sequence"], m["frame"], m["kind"]) for m in meta] == \
            [(r["sequence"], r["frame"], r["kind"]) for r in recs]


def test_patients_have_one_class_and_classes_are_balanced(built):
    for p in np.unique(built.patients):
        assert len(set(built.labels[built.patients == p].tolist())) == 1
    assert np.bincount(built.labels).tolist() == [12, 12, 12]


def test_masks_lesions_and_field_of_view(arrays64):
    a, s = arrays64, 64
    yy, xx = np.mgrid[:s, :s]
    outside = np.hypot(yy - (s - 1) / 2, xx - (s - 1) / 2) > 0.5 * s + 0.5
    assert not (a["mask"][:, outside]).any()
    assert (a["image"][:, outside, 0] == 0).all()  # black corners
    healthy = a["label"] == 0
    assert not a["mask"][healthy].any()  # healthy tissue has no lesion
    assert not a["mask"][~a["diagnostic"]].any()  # nothing to localise in a non-diagnostic frame
    lesion = ~healthy & a["diagnostic"]
    frac = a["mask"][lesion].reshape(lesion.sum(), -1).mean(1) / (np.pi / 4)
    assert frac.min() > 0.02 and 0.1 < frac.mean() < 0.45, (frac.min(), frac.mean())


def test_nondiagnostic_frames_look_the_part():
    cfg = dataclasses.replace(SMALL, image_size=48, nondiagnostic_fraction=0.5, images_per_patient=12)
    recs = [r for p in range(6) for r in synthetic.generate_patient(cfg, p)]
    inside = fb.fov_mask(48, 23.0) == 1.0
    mean = {k: np.mean([r["image"][..., 0][inside].mean() for r in recs if r["kind"] == k])
            for k in ("diagnostic", "out_of_contact", "saturated")}
    sat = np.mean([(r["image"][..., 0][inside] == 255).mean() for r in recs if r["kind"] == "saturated"])
    assert mean["out_of_contact"] < 0.25 * mean["diagnostic"] < mean["diagnostic"] < mean["saturated"]
    assert sat > 0.3


def test_switches_change_the_physics():
    base = dataclasses.replace(SMALL, image_size=48, num_patients=3, images_per_patient=4,
                               nondiagnostic_fraction=0.0, fast_frame_prob=0.0)
    clean = data.generate_arrays(dataclasses.replace(base, noise=False))
    noisy = data.generate_arrays(base)
    assert not np.array_equal(clean["image"], noisy["image"])
    # the noise switch changes nothing but the noise: shot noise std falls as 1/sqrt(photons)
    shot = dataclasses.replace(base, read_noise=(0.0, 0.0), gain=(1.0, 1.0))
    spread = {}
    for photons in (20.0, 2000.0):
        cfg = dataclasses.replace(shot, photons=(photons, photons))
        img = data.generate_arrays(cfg)["image"].astype(float)
        ref = data.generate_arrays(dataclasses.replace(cfg, noise=False))["image"].astype(float)
        inside = (ref > 30) & (ref < 220)  # away from black corners and saturation
        spread[photons] = np.std((img - ref)[inside])
    assert 5 < spread[20.0] / spread[2000.0] < 15, spread  # sqrt(100) = 10, blurred by quantisation
    pixels = data.generate_arrays(dataclasses.replace(base, fibre_bundle=False, noise=False))
    assert pixels["image"].shape == clean["image"].shape and not np.array_equal(pixels["image"], clean["image"])
    names = {base.name(), dataclasses.replace(base, noise=False).name(), dataclasses.replace(base, motion=False).name(),
             dataclasses.replace(base, fibre_bundle=False).name(), dataclasses.replace(base, seed=1).name()}
    assert len(names) == 5
    indep = data.generate_arrays(dataclasses.replace(base, motion=False))
    assert indep["image"].shape == clean["image"].shape


def _global_statistics(images: np.ndarray) -> np.ndarray:
    """Histogram statistics and 8 radial spectrum bands of each frame's field of view (N, 15)."""
    x = images[..., 0].astype(np.float64) / 255
    n, s, _ = x.shape
    c = (s - 1) / 2
    yy, xx = np.mgrid[:s, :s]
    fov = np.hypot(yy - c, xx - c) <= 0.5 * s - 1
    f = np.fft.fftfreq(s)
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    edges = np.geomspace(1 / s, 0.71, 9)
    out = []
    for im in x:
        v = im[fov]
        p = np.abs(np.fft.fft2(np.where(fov, im - v.mean(), 0.0))) ** 2
        bands = np.array([p[(fr >= lo) & (fr < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
        out.append(np.concatenate([[v.mean(), v.std()], np.percentile(v, [5, 25, 50, 75, 95]),
                                   np.log(bands / bands.sum() + 1e-12)]))
    return np.asarray(out)


def _patient_cv_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    cv = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=0)
    return float(cross_val_score(clf, x, y, groups=groups, cv=cv).mean())


@pytest.mark.slow
def test_global_statistics_do_not_give_the_class_away_but_a_planted_shortcut_does():
    cfg = data.SyntheticConfig(num_patients=24, images_per_patient=8, image_size=64, seed=11)
    fair = data.generate_arrays(cfg)
    leaky = data.generate_arrays(dataclasses.replace(cfg, class_gain_shortcut=0.8))
    acc_fair = _patient_cv_accuracy(_global_statistics(fair["image"]), fair["label"], fair["patient"])
    acc_leaky = _patient_cv_accuracy(_global_statistics(leaky["image"]), leaky["label"], leaky["patient"])
    assert acc_fair < 0.5, acc_fair  # chance is 1/3
    assert acc_leaky > 0.8, acc_leaky


def test_export_reads_back_as_the_same_dataset(tmp_path):
    from lclsc_jax.data import export

    cfg = dataclasses.replace(SMALL, num_patients=3, images_per_patient=4)
    manifest = export.export_synthetic(cfg, tmp_path / "out")
    with pytest.raises(FileExistsError):
        export.export_synthetic(cfg, tmp_path / "out")
    ds = data.load(manifest, image_size=32, cache_dir=tmp_path / "cache")
    ref = data.generate_arrays(cfg)
    assert len(ds) == len(ref["label"])
    names = [ds.class_names[i] for i in ds.labels]
    assert names == [cfg.classes[i] for i in ref["label"]]
    for i in range(len(ds)):
        ex = ds.source[i]
        assert ex["image"].tobytes() == ref["image"][i].tobytes()
        assert ex["mask"].tobytes() == ref["mask"][i].tobytes()
        assert ex["patient"] == ref["patient"][i]
    np.testing.assert_array_equal(ds.diagnostic, ref["diagnostic"])
    np.testing.assert_array_equal(ds.frame, ref["frame"])


def test_render_panel_and_examples_write_pngs(built, tmp_path):
    from PIL import Image

    for out in (data.render_examples(built, 6, tmp_path / "grid.png"), data.render_panel(built, tmp_path / "p.png")):
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        data.SyntheticConfig(classes=("healthy", "astrocytoma"))
    with pytest.raises(ValueError, match="lo <= hi"):
        data.SyntheticConfig(photons=(50.0, 10.0))
    with pytest.raises(ValueError, match="nondiagnostic_fraction"):
        data.SyntheticConfig(nondiagnostic_fraction=1.0)


def test_no_tensorflow_imported(tmp_path):
    """Building and reading must never import TensorFlow (it is not a dependency)."""
    code = textwrap.dedent(
        f"""
        import sys
        from lclsc_jax import data
        cfg = data.SyntheticConfig(num_patients=3, images_per_patient=2, image_size=32)
        ds = data.load(synthetic=cfg, cache_dir={str(tmp_path)!r})
        ds.source[0]
        it = data.train_iterator(ds, [0, 1, 2], global_batch_size=2, seed=0,
                                 process_index=0, process_count=1)
        next(it)
        bad = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        assert not bad, bad
        print("OK")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_building_the_cache_prints_no_download_line(tmp_path, capfd):
    data.load(synthetic=dataclasses.replace(SMALL, num_patients=3, images_per_patient=2), cache_dir=tmp_path)
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err and "downloaded and prepared" not in out + err
    assert "building the synthetic_pcle cache" in err
