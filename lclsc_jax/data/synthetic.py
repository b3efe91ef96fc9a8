"""A pCLE simulator with ground-truth evidence masks (NumPy/SciPy, deterministic).

Each patient has one class, its own tissue (cell size, shape, density, brightness,
background), its own probe (a fibre bundle of 10-30 thousand cores with its own lattice,
transmissions and cross-talk) and its own acquisition (gain, photon budget, read noise).
A patient's frames come from one or more probe passes over a tissue canvas: consecutive
frames overlap, fast frames are motion-blurred, and some frames are non-diagnostic (flagged).
A frame is formed as a pCLE device forms it: the tissue is sampled at the fibre cores, with
cross-talk, shot and read noise, calibrated and interpolated onto the pixel grid inside the
circular field of view.

The class evidence (``settings.EVIDENCE``) is the *arrangement* of the same cells inside a
lesion — parallel streams (glioma) or crossing fascicles (meningioma); healthy tissue has no
lesion — so the intensity histogram and the radial power spectrum of a frame do not depend on
the class. The ``mask`` is the lesion inside the field of view (empty for healthy and for
non-diagnostic frames). See docs/data.md for the parameters and where their ranges come from.

Everything is drawn from ``numpy.random.default_rng`` seeded by (seed, patient, pass): the
same config gives the same bytes on any machine.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from lclsc_jax.data import fibre_bundle as fb
from lclsc_jax.data.probe import Pass, frame_to_canvas, probe_pass
from lclsc_jax.data.settings import FOV_FRACTION, SyntheticConfig, parse_value
from lclsc_jax.data.tissue import ARRANGEMENTS, Lesion, TissueParams, place_foci, render_tissue

DISPLAY_SCALE = 0.7  # unit fluorescence at unit gain -> 70 % of the 8-bit range
BLUR_SAMPLES = 5
SMEAR_SAMPLES = 15


def config_from_options(options: Sequence[str] = (), cls: type = SyntheticConfig, **fields: Any) -> Any:
    """A SyntheticConfig (or ``cls``, e.g. ``BrainConfig``) from ``fields`` and ``KEY=VALUE`` strings.

    E.g. ``noise=false``, ``photons=5,20``. Values are parsed by the field's type: bool
    (true/false/1/0/yes/no), int, float, a pair ``lo,hi`` for ranges, comma-separated names for
    ``classes``. An unknown key names the closest valid ones.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values = dict(fields)
    for opt in options:
        key, sep, raw = opt.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"synthetic option {opt!r}: expected KEY=VALUE")
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(defaults)}"
            raise ValueError(f"unknown synthetic option {key!r}{hint}")
        values[key] = parse_value(f"synthetic option {key}", raw.strip(), defaults[key])
    return cls(**values)


def patient_ids(config: SyntheticConfig) -> list[str]:
    """Patient id strings ``P000``... (num_patients,)."""
    return [f"P{p:03d}" for p in range(config.num_patients)]


def patient_label(config: SyntheticConfig, p: int) -> int:
    """Class of patient ``p``: patients are dealt round-robin over the classes."""
    return p % len(config.classes)


def sequence_lengths(config: SyntheticConfig) -> list[int]:
    """Frames of each pass of a patient (sum = images_per_patient; earlier passes take the remainder)."""
    n, s = config.images_per_patient, min(config.sequences_per_patient, config.images_per_patient)
    return [n // s + (1 if i < n % s else 0) for i in range(s)]


@dataclasses.dataclass(frozen=True)
class PatientParams:
    """Everything drawn once per patient: tissue, probe and acquisition."""

    label: int
    tissue: TissueParams
    extent: tuple[float, float]  # lesion fraction of the field of view: this patient's range
    n_cores: int
    crosstalk: float
    photons: float
    read_noise: float
    gain: float


def patient_params(config: SyntheticConfig, p: int) -> PatientParams:
    """Draw patient ``p``'s parameters (midpoints of every range without ``patient_variation``)."""
    rng = np.random.default_rng([config.seed, 1, p])

    def draw(lo_hi: tuple[float, float]) -> float:
        lo, hi = lo_hi
        u = rng.uniform()  # always consume, so switching variation off keeps other draws aligned
        return float(lo + (hi - lo) * (u if config.patient_variation else 0.5))

    upx = config.um_per_px
    length = draw(config.cell_length_um) / upx
    aspect = draw(config.cell_aspect)
    coverage = draw(config.cell_coverage)
    tissue = TissueParams(
        cell_length=length, aspect=aspect,
        cells_per_px2=coverage / (np.pi / 4 * length * length / aspect),
        round_fraction=draw(config.round_fraction), cell_brightness=config.cell_brightness, background=draw(config.background),
        focus_radius=draw(config.focus_radius_cells) * length,
        orientation_jitter=np.deg2rad(config.orientation_jitter_deg), vessels=config.vessels_per_pass,
        file_length=config.file_length, tract_bias=draw(config.tract_bias),
        fibre_period=draw(config.fibre_period_um) / upx,
        fibre_contrast=draw(config.fibre_contrast))
    e_mid = draw(config.lesion_extent)  # focal ... diffuse patients
    half = 0.25 * (config.lesion_extent[1] - config.lesion_extent[0])
    extent = (max(config.lesion_extent[0], e_mid - half), min(config.lesion_extent[1], e_mid + half))
    label = patient_label(config, p)
    gain = draw(config.gain) * (1.0 + config.class_gain_shortcut * (label - (len(config.classes) - 1) / 2))
    return PatientParams(label=label, tissue=tissue, extent=extent, n_cores=int(round(draw(config.fibre_cores))),
                         crosstalk=draw(config.crosstalk), photons=draw(config.photons),
                         read_noise=draw(config.read_noise), gain=gain)


def _pixel_bundle(size: int, fov_radius: float) -> fb.FibreBundle:
    """A 'bundle' of one ideal core per pixel (no lattice, cross-talk or transmission error)."""
    c = (size - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    keep = np.hypot(yy, xx) <= fov_radius + 0.5
    yx = np.stack([yy[keep], xx[keep]], 1).astype(np.float32)
    ones = np.ones(len(yx), np.float32)
    nb = np.repeat(np.arange(len(yx))[:, None], 6, 1)
    return fb.FibreBundle(yx=yx, transmission=ones, calibration=ones, neighbours=nb, crosstalk=0.0, pitch=1.0,
                          fov_radius=fov_radius)


def make_probe(config: SyntheticConfig, params: PatientParams, p: int) -> fb.FibreBundle:
    """Patient ``p``'s probe: a fibre bundle, or ideal pixel sampling without ``fibre_bundle``."""
    radius = FOV_FRACTION * config.image_size
    if not config.fibre_bundle:
        return _pixel_bundle(config.image_size, radius)
    return fb.make_bundle(np.random.default_rng([config.seed, 3, p]), params.n_cores, radius,
                          crosstalk=params.crosstalk)


def _image(config: SyntheticConfig, bundle: fb.FibreBundle, values: np.ndarray) -> np.ndarray:
    """Core values -> image (S, S): the bundle's reconstruction, or direct placement for pixel sampling."""
    s = config.image_size
    if config.fibre_bundle:
        return fb.reconstruct(bundle, values, s, interpolate=config.interpolate)
    img = np.zeros((s, s), np.float32)
    c = (s - 1) / 2.0
    img[np.rint(bundle.yx[:, 0] + c).astype(int), np.rint(bundle.yx[:, 1] + c).astype(int)] = values
    return img * fb.fov_mask(s, bundle.fov_radius)


def _sample(canvas: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``canvas`` at canvas points (n, 2); (n,)."""
    return ndimage.map_coordinates(canvas, pts.T, order=1, mode="nearest").astype(np.float32)


def render_pass(config: SyntheticConfig, p: int, s: int, n_frames: int, params: PatientParams | None = None,
                bundle: fb.FibreBundle | None = None) -> list[dict]:
    """Frames of patient ``p``'s pass ``s``: dicts of image uint8 (S, S, 1), mask uint8 (S, S), diagnostic, kind."""
    params = params or patient_params(config, p)
    bundle = bundle or make_probe(config, params, p)
    size = config.image_size
    radius = FOV_FRACTION * size
    rng = np.random.default_rng([config.seed, 2, p, s])  # _passes must stay its first consumer (pass_metadata)
    canvas_px = _canvas_px(config)
    shape = (canvas_px, canvas_px)
    arrangement = ARRANGEMENTS[config.classes[params.label]]
    passes = _passes(config, rng, n_frames, canvas_px, radius)
    extent = rng.uniform(*params.extent, size=n_frames)
    frames: list[dict] = []
    for poses in passes:  # one canvas per pass (per frame without motion)
        lesion = Lesion.empty()
        if arrangement is not None:
            wanted = extent[len(frames):len(frames) + len(poses.kind)]
            lesion = place_foci(rng, lesion, poses.centres, radius, wanted, params.tissue.focus_radius, shape)
        canvas = render_tissue(rng, shape, params.tissue, lesion, arrangement)
        frames += _frames(config, rng, params, bundle, canvas, lesion.mask(shape), poses)
    return frames


def _canvas_px(config: SyntheticConfig) -> int:
    """Side of a pass's square tissue canvas: room for the field of view to travel 1.2 diameters."""
    return int(np.ceil(2 * FOV_FRACTION * config.image_size * 2.2)) + 4


def pass_metadata(config: SyntheticConfig, p: int) -> list[dict]:
    """Sequence, frame index, kind and diagnostic flag of patient ``p``'s frames, without rendering them."""
    radius = FOV_FRACTION * config.image_size
    out = []
    for s, n in enumerate(sequence_lengths(config)):
        rng = np.random.default_rng([config.seed, 2, p, s])  # the stream render_pass starts with
        kinds = [k for poses in _passes(config, rng, n, _canvas_px(config), radius) for k in poses.kind]
        out += [{"sequence": s, "frame": f, "kind": k, "diagnostic": k == "diagnostic"} for f, k in enumerate(kinds)]
    return out


def _passes(config: SyntheticConfig, rng: np.random.Generator, n_frames: int, canvas_px: int,
            radius: float) -> list[Pass]:
    """One pass over one canvas; without ``motion``, one single-frame pass (own canvas) per frame."""
    kw = dict(nondiagnostic=config.nondiagnostic_fraction, motion_blur=config.motion_blur,
              fast_prob=config.fast_frame_prob)
    if config.motion:
        return [probe_pass(rng, n_frames, canvas_px, radius, **kw)]
    nd = probe_pass(rng, n_frames, canvas_px, radius, motion=False, **kw).kind  # which frames are non-diagnostic
    out = []
    for k in nd:
        one = probe_pass(rng, 1, canvas_px, radius, motion=False, motion_blur=False)
        out.append(dataclasses.replace(one, kind=(k,)))
    return out


def _frames(config: SyntheticConfig, rng: np.random.Generator, params: PatientParams, bundle: fb.FibreBundle,
            canvas: np.ndarray, lesion_mask: np.ndarray, poses: Pass) -> list[dict]:
    """Image every pose of a pass over ``canvas``."""
    size = config.image_size
    radius = FOV_FRACTION * size
    c = (size - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    pix = np.stack([yy.ravel(), xx.ravel()], 1)
    in_fov = (np.hypot(yy, xx) <= radius).astype(np.uint8)
    defocused = None
    out = []
    for f, kind in enumerate(poses.kind):
        centre, angle = poses.centres[f], poses.angles[f]
        src = canvas
        if kind == "out_of_contact":
            if defocused is None:
                defocused = ndimage.gaussian_filter(canvas, 2.0 * params.tissue.cell_length)
            src = defocused * np.float32(rng.uniform(0.03, 0.1))
        n_sub = SMEAR_SAMPLES if kind == "smeared" else BLUR_SAMPLES
        offsets = np.linspace(-0.5, 0.5, n_sub)[:, None] * poses.blur[f][None] if poses.blur[f].any() else [0.0]
        tissue = np.mean([_sample(src, frame_to_canvas(bundle.yx, centre + o, angle)) for o in offsets], axis=0)
        signal = fb.crosstalk(bundle, tissue)
        values = fb.detect(rng, bundle, signal, params.photons, params.read_noise, noise=config.noise)
        img = _image(config, bundle, values)
        gain = params.gain * rng.uniform(0.9, 1.1) * (rng.uniform(3.0, 6.0) if kind == "saturated" else 1.0)
        image = np.rint(np.clip(img * gain * DISPLAY_SCALE, 0.0, 1.0) * 255.0).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if kind == "diagnostic" and lesion_mask.any():
            on_canvas = frame_to_canvas(pix, centre, angle)
            mask = ndimage.map_coordinates(lesion_mask.astype(np.uint8), on_canvas.T, order=0, mode="constant")
            mask = mask.reshape(size, size).astype(np.uint8) * in_fov
        out.append({"image": image[..., None], "mask": mask, "diagnostic": kind == "diagnostic", "kind": kind})
    return out


def generate_patient(config: SyntheticConfig, p: int) -> list[dict]:
    """All frames of patient ``p`` in order: dicts with image, mask, label, patient, sequence, frame, diagnostic."""
    params = patient_params(config, p)
    bundle = make_probe(config, params, p)
    pid = patient_ids(config)[p]
    out = []
    for s, n in enumerate(sequence_lengths(config)):
        for f, rec in enumerate(render_pass(config, p, s, n, params, bundle)):
            out.append({**rec, "label": params.label, "patient": pid, "sequence": s, "frame": f})
    return out


def generate(config: SyntheticConfig) -> Iterator[tuple[int, dict]]:
    """Yield (key, record) in order; record i is patient i // images_per_patient."""
    for p in range(config.num_patients):
        for f, rec in enumerate(generate_patient(config, p)):
            yield p * config.images_per_patient + f, {k: rec[k] for k in RECORD_KEYS}


RECORD_KEYS = ("image", "mask", "label", "patient", "sequence", "frame", "diagnostic")


def generate_arrays(config: SyntheticConfig) -> dict[str, np.ndarray]:
    """The whole dataset in memory: image (N,S,S,1), mask (N,S,S), label, patient, sequence, frame, diagnostic (N,)."""
    recs = [r for _, r in generate(config)]
    out = {k: np.stack([r[k] for r in recs]) for k in ("image", "mask")}
    out["label"] = np.array([r["label"] for r in recs], np.int32)
    out["patient"] = np.array([r["patient"] for r in recs])
    out["sequence"] = np.array([r["sequence"] for r in recs], np.int32)
    out["frame"] = np.array([r["frame"] for r in recs], np.int32)
    out["diagnostic"] = np.array([r["diagnostic"] for r in recs], bool)
    return out
