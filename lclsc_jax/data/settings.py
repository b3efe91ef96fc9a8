"""Settings of the data layer as plain dataclasses (standard library only, so ``train.config`` nests them cheaply).

``AugmentConfig`` (training augmentation) and ``SyntheticConfig`` (the pCLE simulator) are the
``augment.*`` and ``synthetic.*`` sections of a run's config; ``parse_value`` reads a value of
either from a command-line string.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

GENERATOR_VERSION = "2.0.0"
FOV_FRACTION = 0.5  # radius of the field of view / image size: the inscribed disc, as benchmark-cams scores

#: The class evidence of the simulator: what distinguishes the classes inside a lesion.
EVIDENCE = {
    "healthy": "no lesion: fine fibres in every direction (no local order)",
    "glioma": "streams: inside each focus the fibres run parallel (tumour cells migrating along a tract)",
    "meningioma": "interlacing fascicles: inside each focus two families of fibres cross at right angles",
}


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation; every op has an on/off switch and a strength."""

    enabled: bool = True
    flips: bool = True  # random horizontal flip (with rot90: the 8 dihedral transforms)
    rot90: bool = True  # random quarter turns
    affine: bool = True
    rotation_degrees: float = 10.0  # uniform in [-r, r]
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05  # fraction of the image size, uniform in [-t, t] per axis
    intensity: bool = True
    brightness: float = 0.1  # additive, in [0, 1] intensity units
    contrast: float = 0.15  # multiplicative about the image mean, in [1 - c, 1 + c]

    def __post_init__(self):
        if self.scale[0] <= 0 or self.scale[0] > self.scale[1]:
            raise ValueError(f"AugmentConfig.scale must be 0 < lo <= hi, got {self.scale}")
        if min(self.rotation_degrees, self.translate, self.brightness, self.contrast) < 0:
            raise ValueError("AugmentConfig strengths must be >= 0")


@dataclasses.dataclass(frozen=True)
class ViewsConfig:
    """The views of ``lclsc pretrain``, drawn on the device (``data.device_augment``); each op has a probability.

    Intensities act on ``[0, 1]`` images (``x01``); sizes of 0 follow the data (global: the image
    size; local: 3/7 of the global size, DINO's 96/224). Ranges ``(lo, hi)`` are drawn uniformly per view.
    """

    n_global: int = 2
    global_size: int = 0  # 0: data.image_size
    global_scale: tuple[float, float] = (0.25, 1.0)  # random resized crop: fraction of the image area
    n_local: int = 0  # DINO's multi-crop (e.g. 6); SimCLR uses none
    local_size: int = 0  # 0: 3/7 of the global size (at least 8)
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (0.75, 1.3333)  # crop aspect ratio (log-uniform)
    d4: bool = True  # one of the 8 flips/quarter turns (pCLE has no canonical orientation)
    jitter_prob: float = 0.8  # gain, gamma and contrast together (SimCLR's colour jitter, grey)
    gain: tuple[float, float] = (0.7, 1.4)
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)  # about the view's mean
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output view
    noise_prob: float = 0.5  # Poisson-Gaussian: shot noise at a peak of `noise_photons`, read noise `noise_read`
    noise_photons: tuple[float, float] = (20.0, 200.0)
    noise_read: tuple[float, float] = (0.0, 0.03)
    fibre_prob: float = 0.3  # re-image through another fibre bundle (hexagonal cores of pitch `fibre_spacing` px)
    fibre_spacing: tuple[float, float] = (2.0, 4.0)
    fov_prob: float = 0.5  # black outside a centred disc of radius `fov_radius` x half the view side
    fov_radius: tuple[float, float] = (0.7, 1.0)

    def __post_init__(self):
        if self.n_global < 1 or self.n_local < 0 or self.global_size < 0 or self.local_size < 0:
            raise ValueError("ViewsConfig: n_global must be >= 1, n_local, global_size and local_size >= 0")
        for name in ("jitter_prob", "blur_prob", "noise_prob", "fibre_prob", "fov_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ViewsConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("global_scale", "local_scale", "ratio", "gain", "gamma", "contrast", "blur_sigma",
                     "noise_photons", "fibre_spacing", "fov_radius"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"ViewsConfig.{name} must be a range 0 < lo <= hi, got {(lo, hi)}")
        for name in ("global_scale", "local_scale", "fov_radius"):
            if getattr(self, name)[1] > 1.0:
                raise ValueError(f"ViewsConfig.{name} must be fractions <= 1, got {getattr(self, name)}")
        lo, hi = self.noise_read
        if not 0 <= lo <= hi:
            raise ValueError(f"ViewsConfig.noise_read must be a range 0 <= lo <= hi, got {(lo, hi)}")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the simulated pCLE benchmark; every field changes the generated bytes.

    Ranges ``(lo, hi)`` are drawn per patient (uniformly) unless ``patient_variation=False``,
    which uses their midpoints for every patient. Each physical effect has a switch, for
    ablations: ``fibre_bundle``, ``interpolate``, ``noise``, ``motion``, ``motion_blur``,
    ``nondiagnostic_fraction=0``, ``patient_variation``.
    """

    num_patients: int = 24
    images_per_patient: int = 40
    image_size: int = 128
    seed: int = 0
    classes: tuple[str, ...] = ("healthy", "glioma", "meningioma")
    sequences_per_patient: int = 5  # probe passes per patient (frames are split between them)
    # optics
    fov_um: float = 240.0  # field-of-view diameter
    fibre_bundle: bool = True  # False: the tissue is sampled at the pixel centres instead of fibre cores
    fibre_cores: tuple[int, int] = (10_000, 30_000)
    crosstalk: tuple[float, float] = (0.02, 0.08)
    interpolate: bool = True  # False: the raw honeycomb (cores on dark cladding) instead of the device's interpolation
    # detector
    noise: bool = True  # Poisson shot noise + Gaussian read noise
    photons: tuple[float, float] = (15.0, 80.0)  # photons per core at unit fluorescence and transmission
    read_noise: tuple[float, float] = (1.0, 4.0)  # photons (std)
    gain: tuple[float, float] = (0.75, 1.3)  # display gain per patient (x a 10 % per-frame jitter)
    # motion
    motion: bool = True  # False: independent poses, no overlap between frames
    motion_blur: bool = True
    fast_frame_prob: float = 0.1
    nondiagnostic_fraction: float = 0.08
    # tissue
    patient_variation: bool = True
    cell_length_um: tuple[float, float] = (14.0, 20.0)
    cell_aspect: tuple[float, float] = (2.5, 3.5)
    cell_coverage: tuple[float, float] = (0.3, 0.45)  # fraction of the area covered by cells
    round_fraction: tuple[float, float] = (0.03, 0.1)
    background: tuple[float, float] = (0.12, 0.3)
    vessels_per_pass: float = 0.7
    focus_radius_cells: tuple[float, float] = (2.5, 3.5)  # radius of a lesion focus, in cell lengths
    lesion_extent: tuple[float, float] = (0.1, 0.3)  # fraction of the field of view that is lesion
    orientation_jitter_deg: float = 5.0  # spread of a lesion fibre's direction about its field
    file_length: float = 1.5  # mean cells per file (nuclei lined up end to end)
    tract_bias: tuple[float, float] = (0.0, 0.0)  # von Mises concentration of background directions (tracts); off
    fibre_period_um: tuple[float, float] = (12.0, 16.0)  # spacing of the fine fluorescent fibres
    fibre_contrast: tuple[float, float] = (1.8, 2.2)  # fibre modulation relative to the background level
    cell_brightness: float = 0.4  # peak fluorescence of a cell (the background is 0.12-0.3)
    class_gain_shortcut: float = 0.0  # > 0 plants a class-dependent brightness (to test audits); 0 = none

    def __post_init__(self):
        unknown = [c for c in self.classes if c not in EVIDENCE]
        if unknown:
            raise ValueError(f"SyntheticConfig.classes: unknown {unknown}; known {list(EVIDENCE)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"SyntheticConfig.classes must be >= 2 distinct names, got {self.classes}")
        if self.num_patients < len(self.classes):
            raise ValueError(f"SyntheticConfig.num_patients={self.num_patients} < {len(self.classes)} classes")
        if self.image_size < 32:
            raise ValueError(f"SyntheticConfig.image_size must be >= 32, got {self.image_size}")
        if self.images_per_patient < 1 or self.sequences_per_patient < 1:
            raise ValueError("SyntheticConfig: images_per_patient and sequences_per_patient must be >= 1")
        if not 0.0 <= self.nondiagnostic_fraction < 1.0:
            raise ValueError(f"SyntheticConfig.nondiagnostic_fraction must be in [0, 1), got "
                             f"{self.nondiagnostic_fraction}")
        for name in ("fibre_cores", "crosstalk", "photons", "read_noise", "gain", "cell_length_um", "cell_aspect",
                     "cell_coverage", "round_fraction", "background", "focus_radius_cells", "lesion_extent",
                     "fibre_period_um", "fibre_contrast",
                     "tract_bias"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"SyntheticConfig.{name}: need lo <= hi, got {(lo, hi)}")

    @property
    def num_images(self) -> int:
        """Total number of frames."""
        return self.num_patients * self.images_per_patient

    @property
    def um_per_px(self) -> float:
        """Micrometres per pixel."""
        return self.fov_um / (2 * FOV_FRACTION * self.image_size)

    def fingerprint(self) -> str:
        """Short hash of all fields (and the generator version), for cache keys."""
        blob = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def name(self) -> str:
        """Readable, unique config name, e.g. ``128px_24p_40i_seed0_<hash>``."""
        return (f"{self.image_size}px_{self.num_patients}p_{self.images_per_patient}i_"
                f"seed{self.seed}_{self.fingerprint()}")


BRAIN_GENERATOR_VERSION = "1.0.0"

#: The class evidence of the 3D brain benchmark (``data.brain3d``): how the same lesion intensities are arranged.
EVIDENCE_3D = {
    "ring": "ring enhancement: a bright rim around a dark necrotic core",
    "solid": "solid enhancement: a bright centre fading to a dark margin",
    "diffuse": "infiltrative: bright and dark patches mixed through the lesion, no radial order",
}


@dataclasses.dataclass(frozen=True)
class BrainConfig:
    """Parameters of the synthetic 3D MRI-like brain tumour benchmark (``data.brain3d``); every field changes the bytes.

    One volume per subject (``volumes_per_subject`` > 1: repeat scans of the subject's same
    anatomy and lesion, with their own noise, bias field and intensity scaling). Ranges ``(lo, hi)``
    are drawn per subject uniformly. Intensity units: white matter of the T1c-like channel = 1
    before the per-subject gain/offset. The classes differ only in how the lesion's intensities
    are arranged (``EVIDENCE_3D``): every lesion has the same intensity distribution (by rank) and
    its size is drawn from one class-independent range.
    """

    classes: tuple[str, ...] = ("ring", "solid", "diffuse")
    n_subjects: int = 60
    volumes_per_subject: int = 1
    size: int = 32  # voxels per side (cube); 64 or 96 for experiments
    channels: int = 1  # 1: T1c-like; 2: + FLAIR-like (oedema bright)
    seed: int = 0
    noise: float = 0.03  # Rician noise sigma, relative to white matter
    bias_strength: float = 0.2  # std of the log bias field
    gain: tuple[float, float] = (0.8, 1.25)  # per-volume multiplicative intensity scaling
    offset: tuple[float, float] = (0.0, 0.1)  # per-volume additive offset (inside the head)
    lesion_radius: tuple[float, float] = (0.16, 0.26)  # fraction of the half-size of the volume
    lesion_irregularity: float = 0.15  # relative amplitude of the smooth boundary deformation
    oedema_width: tuple[float, float] = (0.3, 0.6)  # FLAIR halo width, fraction of the lesion radius
    fold_amplitude: float = 0.12  # grey/white boundary folding (fraction of the brain radius)

    def __post_init__(self):
        unknown = [c for c in self.classes if c not in EVIDENCE_3D]
        if unknown:
            raise ValueError(f"BrainConfig.classes: unknown {unknown}; known {list(EVIDENCE_3D)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"BrainConfig.classes must be >= 2 distinct names, got {self.classes}")
        if self.n_subjects < len(self.classes):
            raise ValueError(f"BrainConfig.n_subjects={self.n_subjects} < {len(self.classes)} classes")
        if self.size < 16:
            raise ValueError(f"BrainConfig.size must be >= 16, got {self.size}")
        if self.channels not in (1, 2):
            raise ValueError(f"BrainConfig.channels must be 1 or 2, got {self.channels}")
        if self.volumes_per_subject < 1:
            raise ValueError("BrainConfig.volumes_per_subject must be >= 1")
        if self.noise < 0 or self.bias_strength < 0 or not 0 <= self.lesion_irregularity <= 0.3:
            raise ValueError("BrainConfig: noise and bias_strength must be >= 0, lesion_irregularity in [0, 0.3]")
        for name in ("gain", "offset", "lesion_radius", "oedema_width"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"BrainConfig.{name}: need lo <= hi, got {(lo, hi)}")
        if not (0 < self.lesion_radius[0] and self.lesion_radius[1] <= 0.35):
            raise ValueError(f"BrainConfig.lesion_radius must lie in (0, 0.35], got {self.lesion_radius}")

    @property
    def num_volumes(self) -> int:
        """Total number of volumes."""
        return self.n_subjects * self.volumes_per_subject

    def fingerprint(self) -> str:
        """Short hash of all fields (and the generator version), for cache keys."""
        blob = json.dumps({"v": BRAIN_GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def name(self) -> str:
        """Readable, unique config name, e.g. ``32vox_60s_1v_1c_seed0_<hash>``."""
        return (f"{self.size}vox_{self.n_subjects}s_{self.volumes_per_subject}v_{self.channels}c_"
                f"seed{self.seed}_{self.fingerprint()}")


def parse_value(what: str, raw: str, default: Any) -> Any:
    """Parse the string ``raw`` like ``default``: bool (true/false/1/0/yes/no/on/off), int, float, str,
    a pair ``lo,hi`` (one value ``v`` means ``(v, v)``) or comma-separated names; ``what`` names it in errors."""
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, tuple):
            parts = [p.strip() for p in raw.split(",") if p.strip()]
            if default and isinstance(default[0], str):
                return tuple(parts)
            kind = type(default[0])
            if len(parts) == 1:
                parts = parts * 2  # a single value: a fixed (lo, lo) range
            if len(parts) != 2:
                raise ValueError
            return tuple(kind(float(p)) if kind is int else kind(p) for p in parts)
        return type(default)(float(raw)) if isinstance(default, int) else type(default)(raw)
    except ValueError:
        raise ValueError(f"{what}={raw!r}: expected {type(default).__name__} like {default!r}") from None
