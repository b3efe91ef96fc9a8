"""A procedural, seeded, MRI-like 3D brain tumour benchmark with ground-truth lesion masks (NumPy/SciPy).

Each subject has its own head (an ellipsoid with a skull shell and a CSF rim), grey and white
matter with a smoothly folded boundary, two ventricles, and one tumour of its class. Each volume
of a subject is its own acquisition: per-volume intensity gain and offset, a smooth
multiplicative bias field and Rician noise.

The class evidence (``settings.EVIDENCE_3D``) is the *arrangement* of the lesion's intensities,
not their distribution: every lesion takes the same intensity profile by rank (the voxel of rank
``r`` of ``n`` gets ``profile((r + 0.5) / n)``), and only the ordering field differs — the
distance to the centre (``ring``: the bright voxels form the rim, the dark ones the necrotic core),
minus that distance (``solid``: bright centre, dark margin) or a smooth random field
(``diffuse``: patches, no radial order). Lesion size and position are drawn from
class-independent ranges, so the intensity histogram, the count of bright voxels and the mask
volume do not depend on the class (``protocols.audit`` checks it). The channel 2 (FLAIR-like)
shows an oedema halo of class-independent width around every lesion.

``mask`` (the scored ground truth) is the whole lesion (rim + core); ``oedema`` the halo (not
part of the mask). Everything is drawn from ``numpy.random.default_rng`` seeded by (seed,
subject[, volume]): the same config gives the same bytes on any machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

from lclsc_jax.data.settings import BrainConfig

HEAD_MM = 200.0  # field of view of a volume (mm), for the affine
# T1c-like and FLAIR-like tissue intensities (white matter = 1 in the T1c-like channel)
_T1C = {"wm": 1.0, "gm": 0.75, "csf": 0.25, "skull": 0.55}
_FLAIR = {"wm": 0.7, "gm": 0.85, "csf": 0.1, "skull": 0.4}
OEDEMA_FLAIR = 1.25
OEDEMA_T1C_FACTOR = 0.9
# Blobs of the diffuse ordering field per side of the volume, times the lesion radius (1.0: patches about the
# lesion's diameter). This and the linear profile below keep the 3D power spectrum nearly class-blind.
DIFFUSE_CELLS_PER_RADIUS = 1.0


def subject_ids(config: BrainConfig) -> list[str]:
    """Subject id strings ``S000``... (n_subjects,)."""
    return [f"S{s:03d}" for s in range(config.n_subjects)]


def subject_label(config: BrainConfig, s: int) -> int:
    """Class of subject ``s``: subjects are dealt round-robin over the classes."""
    return s % len(config.classes)


def affine(config: BrainConfig) -> np.ndarray:
    """The volumes' affine (4, 4): isotropic ``HEAD_MM / size`` mm voxels, centred on the origin."""
    sp = HEAD_MM / config.size
    a = np.diag([sp, sp, sp, 1.0])
    a[:3, 3] = -sp * (config.size - 1) / 2.0
    return a


def lesion_profile(u: np.ndarray, channel: int = 0) -> np.ndarray:
    """Lesion intensity at rank fraction ``u`` in [0, 1] (n,): linear from dark necrosis (0) to enhancement (1).

    Linear, not a step: sharp internal edges would give the classes different high-frequency energy.
    """
    u = np.asarray(u, np.float64)
    return (0.3 + 1.1 * u) if channel == 0 else (0.5 + 0.6 * u)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (size, size, size) of zero mean and unit std; about ``cells`` blobs per side."""
    n = max(2, int(cells)) * 2
    low = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.0, mode="wrap")
    f = ndimage.zoom(low, size / n, order=1, mode="nearest", grid_mode=True)[:size, :size, :size]
    f = f - f.mean()
    return (f / (f.std() + 1e-12)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in (-1, 1), each (S, S, S) (open mesh broadcast)."""
    g = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return g[:, None, None], g[None, :, None], g[None, None, :]


def _rank_fill(order: np.ndarray, channel: int) -> np.ndarray:
    """Intensities (n,) for lesion voxels ordered by ``order`` (n,): ``lesion_profile`` of their rank fraction."""
    ranks = np.empty(len(order), np.int64)
    ranks[np.argsort(order, kind="stable")] = np.arange(len(order))
    return lesion_profile((ranks + 0.5) / len(order), channel)


def ordering_field(kind: str, d: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The field whose ranks order a lesion's intensities (S, S, S), from the deformed radial distance ``d``
    (1 on the lesion's edge) and a smooth random field ``noise``: ``ring`` brightest at the edge, ``solid``
    brightest at the centre (both with a little of ``noise``), ``diffuse`` the random field."""
    return {"ring": d + 0.1 * noise, "solid": -d + 0.1 * noise, "diffuse": noise}[kind]


def subject_anatomy(config: BrainConfig, s: int) -> dict[str, np.ndarray]:
    """Noise-free tissue of subject ``s``: ``t1c``/``flair`` float32 (S, S, S), masks ``brain``, ``lesion``,
    ``oedema``, ``head`` bool (S, S, S), and ``label``."""
    size = config.size
    rng = np.random.default_rng([config.seed, 1, s])
    label = subject_label(config, s)
    x, y, z = _grid(size)
    radii = np.array([0.8, 0.76, 0.86]) * rng.uniform(0.93, 1.05, 3)
    hc = rng.uniform(-0.03, 0.03, 3)
    rn = np.sqrt(((x - hc[0]) / radii[0]) ** 2 + ((y - hc[1]) / radii[1]) ** 2 + ((z - hc[2]) / radii[2]) ** 2)
    head = rn < 1.0
    skull = head & (rn >= 0.89)
    brain = rn < 0.86
    fold = smooth_noise(rng, size, 6)
    wm = brain & (rn < 0.6 + config.fold_amplitude * np.clip(fold, -2.0, 2.0))
    texture = 0.03 * smooth_noise(rng, size, 10)
    vr = np.array([0.2, 0.07, 0.13]) * rng.uniform(0.8, 1.2, 3)
    vent = np.zeros((size,) * 3, bool)
    for side in (-1.0, 1.0):
        vc = hc + np.array([0.05, side * 0.11, 0.05])
        vent |= (((x - vc[0]) / vr[0]) ** 2 + ((y - vc[1]) / vr[1]) ** 2 + ((z - vc[2]) / vr[2]) ** 2) < 1.0
    vent &= brain

    # the lesion: class-independent size and position
    radius = rng.uniform(*config.lesion_radius)
    while True:
        c = hc + rng.uniform(-0.6, 0.6, 3) * radii
        reach = radius / (1.0 - 2.0 * config.lesion_irregularity)  # the farthest a deformed lesion voxel can be
        if np.sqrt((((c - hc) / radii) ** 2).sum()) + reach / radii.min() < 0.8:
            break
    shape_noise = smooth_noise(rng, size, 5)
    order_noise = smooth_noise(rng, size, max(2, int(round(DIFFUSE_CELLS_PER_RADIUS / radius))))
    d = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / radius
    d = d * (1.0 + config.lesion_irregularity * np.clip(shape_noise, -2.0, 2.0))
    lesion = (d < 1.0) & brain
    width = rng.uniform(*config.oedema_width)
    oedema = (d >= 1.0) & (d < 1.0 + width) & brain
    kind = config.classes[label]
    field = ordering_field(kind, d, order_noise)

    out = {}
    for name, tab in (("t1c", _T1C), ("flair", _FLAIR)):
        v = np.zeros((size,) * 3, np.float32)
        v[head] = tab["csf"]  # the CSF between brain and skull
        v[skull] = tab["skull"]
        v[brain] = tab["gm"]
        v[wm] = tab["wm"]
        v[brain] += texture[brain]
        v[vent] = tab["csf"]
        if name == "t1c":
            v[oedema] *= OEDEMA_T1C_FACTOR
        else:
            v[oedema] = OEDEMA_FLAIR + texture[oedema]
        v[lesion] = _rank_fill(field[lesion], 0 if name == "t1c" else 1)
        out[name] = v
    out.update(brain=brain, lesion=lesion, oedema=oedema, head=head, label=np.int32(label))
    return out


def acquire(config: BrainConfig, anatomy: dict[str, np.ndarray], s: int, v: int) -> np.ndarray:
    """Volume ``v`` of subject ``s``: gain, offset, bias field and Rician noise -> float32 (S, S, S, C)."""
    rng = np.random.default_rng([config.seed, 2, s, v])
    size = config.size
    bias = np.exp(config.bias_strength * smooth_noise(rng, size, 2)).astype(np.float32)
    gain, offset = rng.uniform(*config.gain), rng.uniform(*config.offset)
    names = ("t1c", "flair")[:config.channels]
    chans = []
    for name in names:
        clean = (anatomy[name] * gain + offset * anatomy["head"]) * bias
        n1 = rng.standard_normal(clean.shape).astype(np.float32)
        n2 = rng.standard_normal(clean.shape).astype(np.float32)
        sig = np.float32(config.noise)
        chans.append(np.sqrt((clean + sig * n1) ** 2 + (sig * n2) ** 2))  # Rician magnitude
    return np.stack(chans, axis=-1).astype(np.float32)


def generate_subject(config: BrainConfig, s: int) -> list[dict]:
    """Volumes of subject ``s``: dicts of image float32 (S, S, S, C), mask/oedema/brain uint8 (S, S, S),
    label, patient, volume index."""
    anat = subject_anatomy(config, s)
    pid = subject_ids(config)[s]
    return [{"image": acquire(config, anat, s, v), "mask": anat["lesion"].astype(np.uint8),
             "oedema": anat["oedema"].astype(np.uint8), "brain": anat["brain"].astype(np.uint8),
             "label": int(anat["label"]), "patient": pid, "volume": v}
            for v in range(config.volumes_per_subject)]


def generate(config: BrainConfig) -> Iterator[tuple[int, dict]]:
    """Yield (key, record) in order; record i is subject i // volumes_per_subject."""
    for s in range(config.n_subjects):
        for rec in generate_subject(config, s):
            yield s * config.volumes_per_subject + rec["volume"], rec


def generate_arrays(config: BrainConfig) -> dict[str, np.ndarray]:
    """Everything in memory: image (N, S, S, S, C), mask/oedema/brain (N, S, S, S), label (N,), patient (N,)."""
    recs = [r for _, r in generate(config)]
    out = {k: np.stack([r[k] for r in recs]) for k in ("image", "mask", "oedema", "brain")}
    out["label"] = np.array([r["label"] for r in recs], np.int32)
    out["patient"] = np.array([r["patient"] for r in recs])
    return out
