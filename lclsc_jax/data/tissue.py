"""Tissue canvases for the pCLE simulator: a fibrillary background whose *order* carries the class.

A canvas is a 2-D fluorescence map (larger than the probe's field of view) that a probe pass
sweeps over. Every class is built from the same ingredients with the same statistics:

  * a smooth extracellular background (fluorescence level and its slow variation);
  * fine fluorescent fibres (neuropil, axons, stroma): sparse Gabor noise, one kernel per
    impulse, whose direction follows a local fibre field;
  * cells (round and spindle-shaped nuclei, in short files) at uniformly random places, and
    fluorescent capillaries: class-independent clutter.

The class lives only in the fibre field inside the lesion:

  * ``healthy``    — no lesion: fibres point every way (isotropic, no local order);
  * ``glioma``     — streams: inside each focus the fibres run parallel (tumour cells along a tract);
  * ``meningioma`` — interlacing fascicles: two families of fibres crossing at right angles.

Impulses sit at Poisson positions with random signs, and each kernel is the same Gabor
function turned to its direction, so the intensity histogram and the radially averaged power
spectrum do not depend on the directions: a lesion matches the background in both
(``lclsc audit-data`` measures it), and local contrast (local standard deviation, band-pass
energy) is the same inside and outside, so class-blind texture maps cannot find it. The
background fibres lean towards one direction per canvas by a random amount (tracts), so the
anisotropy of a whole frame does not give a stream away. What differs is the order of the
directions, which a network has to learn from the tissue itself. The lesion mask is the union
of the foci.

Lengths are in canvas pixels; the caller converts from micrometres.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

ARRANGEMENTS = {"healthy": None, "glioma": "parallel", "meningioma": "crossing"}
ORIENTATION_BINS = 16


@dataclasses.dataclass(frozen=True)
class TissueParams:
    """One patient's tissue, in canvas pixels (see ``SyntheticConfig`` for the micrometre ranges)."""

    cell_length: float  # spindle length (px)
    aspect: float  # length / width
    cells_per_px2: float  # cell density
    round_fraction: float  # fraction of cells that are round (orientation-free)
    cell_brightness: float  # mean peak intensity of a cell
    background: float  # extracellular fluorescence level
    focus_radius: float  # radius of one lesion focus (px)
    orientation_jitter: float  # std of a lesion fibre's direction about its field (radians)
    vessels: float  # expected number of capillaries per canvas
    file_length: float  # mean number of cells per file (cells lined up end to end)
    fibre_period: float  # spacing of the fine fibres (px)
    fibre_contrast: float  # fibre modulation, relative to the background level
    tract_bias: float = 0.0  # von Mises concentration of directions round one per canvas (0 = isotropic)


def _kernel(sigma_l: float, sigma_w: float, angle: float) -> np.ndarray:
    """Unit-peak anisotropic Gaussian, long axis at ``angle`` (radians, from +x towards +y); (k, k)."""
    r = int(np.ceil(3.0 * max(sigma_l, sigma_w)))
    c = np.arange(-r, r + 1, dtype=np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    return np.exp(-0.5 * ((u / sigma_l) ** 2 + (v / sigma_w) ** 2)).astype(np.float32)


def splat(shape: tuple[int, ...], yx: np.ndarray, values: np.ndarray, layer: np.ndarray | None = None) -> np.ndarray:
    """Bilinear splat of ``values (n,)`` at sub-pixel ``yx (n, 2)`` into zeros of ``shape`` ((H, W) or (L, H, W) with ``layer (n,)``)."""
    h, w = shape[-2:]
    y0 = np.floor(yx[:, 0]).astype(np.int64)
    x0 = np.floor(yx[:, 1]).astype(np.int64)
    fy = (yx[:, 0] - y0).astype(np.float32)
    fx = (yx[:, 1] - x0).astype(np.float32)
    base = 0 if layer is None else np.asarray(layer, np.int64) * (h * w)
    flat, weights = [], []
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            flat.append(((base + yy * w + xx) if layer is not None else (yy * w + xx))[ok])
            weights.append((values * wy * wx)[ok])
    size = int(np.prod(shape))
    out = np.bincount(np.concatenate(flat), np.concatenate(weights), minlength=size)
    out = out.astype(np.float32).reshape(shape)
    return out


def render_cells(shape: tuple[int, int], yx: np.ndarray, theta: np.ndarray, amp: np.ndarray,
                 is_round: np.ndarray, length: float, aspect: float) -> np.ndarray:
    """Sum of spindle cells (orientation ``theta``) and round cells, peak ``amp``; (H, W) float32.

    Orientations are quantised to ``ORIENTATION_BINS`` bins; each bin is one splat plus one FFT
    convolution, so the cost does not grow with the number of cells.
    """
    sigma_l = max(0.3 * length, 0.5)
    sigma_w = max(0.3 * length / aspect, 0.5)
    sigma_r = float(np.sqrt(sigma_l * sigma_w))
    k = ORIENTATION_BINS
    kernels = [_kernel(sigma_l, sigma_w, b * np.pi / k) for b in range(k)] + [_kernel(sigma_r, sigma_r, 0.0)]
    return _oriented_sum(shape, yx, np.where(is_round, k, _bins(theta)), amp, kernels)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``sigma`` px; (H, W)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-6)


def vessel_layer(rng: np.random.Generator, shape: tuple[int, int], n: int, width: float) -> np.ndarray:
    """``n`` capillaries: smooth random-walk tubes of ``width`` px, peak about 1; (H, W)."""
    h, w = shape
    pts, vals = [], []
    for _ in range(n):
        p = rng.uniform((0, 0), (h, w))
        ang = rng.uniform(0, 2 * np.pi)
        turn = 0.0
        for _ in range(int(2 * (h + w))):
            turn = 0.9 * turn + rng.normal(0, 0.02)
            ang += turn
            p = p + 0.5 * np.array([np.sin(ang), np.cos(ang)])
            if not (0 <= p[0] < h and 0 <= p[1] < w):
                break
            pts.append(p)
            vals.append(1.0)
    if not pts:
        return np.zeros(shape, np.float32)
    sigma = max(width / 2.5, 0.6)
    tube = ndimage.gaussian_filter(splat(shape, np.asarray(pts), np.asarray(vals, np.float32)), sigma)
    return tube * np.float32(np.sqrt(2 * np.pi) * sigma / 0.5)  # line density 2/px -> peak ~1


@dataclasses.dataclass
class Lesion:
    """Foci of one canvas: centres ``(n, 2)`` (y, x) and radii ``(n,)`` in canvas pixels."""

    centres: np.ndarray
    radii: np.ndarray

    @classmethod
    def empty(cls) -> "Lesion":
        """A lesion with no foci (healthy tissue)."""
        return cls(np.zeros((0, 2), np.float64), np.zeros((0,), np.float64))

    def add(self, centre: np.ndarray, radius: float) -> None:
        """Append one focus."""
        self.centres = np.concatenate([self.centres, np.asarray(centre, np.float64)[None]])
        self.radii = np.concatenate([self.radii, [float(radius)]])

    def contains(self, yx: np.ndarray) -> np.ndarray:
        """Which points ``(n, 2)`` lie inside a focus; (n,) bool."""
        if len(self.radii) == 0:
            return np.zeros(len(yx), bool)
        d = np.linalg.norm(yx[:, None, :] - self.centres[None], axis=-1) / self.radii[None]
        return d.min(axis=1) < 1.0

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Rasterised lesion (pixel centres inside a focus); (H, W) bool."""
        yy, xx = np.meshgrid(np.arange(shape[0]) + 0.0, np.arange(shape[1]) + 0.0, indexing="ij")
        return self.contains(np.stack([yy.ravel(), xx.ravel()], 1)).reshape(shape)


def place_foci(rng: np.random.Generator, lesion: Lesion, frame_centres: np.ndarray, fov_radius: float,
               extent: np.ndarray, radius: float, shape: tuple[int, int]) -> Lesion:
    """Grow ``lesion`` along a probe path so each frame's field of view is about ``extent[f]`` lesion.

    For each frame centre ``(F, 2)`` in order, foci of ``radius`` (±20 %) are added at random
    points of that frame's field of view, apart from existing foci, until the lesion covers
    the wanted fraction of the field (or no more fit). Earlier foci stay, so overlapping
    frames share them, as consecutive frames of a real pass do.
    """
    h, w = shape
    probe = _disc_points(fov_radius, step=max(fov_radius / 24.0, 1.0))
    for f, c in enumerate(frame_centres):
        pts = probe + c[None]
        for _ in range(40):
            if lesion.contains(pts).mean() >= extent[f]:
                break
            r = radius * rng.uniform(0.8, 1.2)
            rho = np.sqrt(rng.uniform()) * (fov_radius + 0.3 * r)  # edges as likely as the centre
            phi = rng.uniform(0, 2 * np.pi)
            cand = c + rho * np.array([np.sin(phi), np.cos(phi)])
            if not (r <= cand[0] < h - r and r <= cand[1] < w - r):
                continue
            if len(lesion.radii) and np.min(np.linalg.norm(lesion.centres - cand, axis=1)
                                             - 0.8 * (lesion.radii + r)) < 0:
                continue
            lesion.add(cand, r)
    return lesion


def _disc_points(radius: float, step: float) -> np.ndarray:
    """Grid points (n, 2) inside a disc of ``radius`` centred on the origin."""
    c = np.arange(-radius, radius + step, step)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    keep = yy**2 + xx**2 <= radius**2
    return np.stack([yy[keep], xx[keep]], 1)


def _files(place, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells of files: ``place(k) -> (positions (m, 2), orientations (m,))`` of every file's k-th cell; (n, 2), (n,)."""
    pos, ang = [], []
    for k in range(int(lengths.max(initial=0))):
        p, th = place(k)
        pos.append(p[lengths > k])
        ang.append(th[lengths > k])
    if not pos:
        return np.zeros((0, 2)), np.zeros((0,))
    return np.concatenate(pos), np.concatenate(ang)


def tract_directions(rng: np.random.Generator, n: int, bias: float) -> np.ndarray:
    """``n`` axial directions (radians): von Mises of concentration ``bias`` round a random one (0 = uniform)."""
    return 0.5 * rng.vonmises(0.0, bias, n) + rng.uniform(0, np.pi)  # the doubled-angle law of axial data


def cell_files(rng: np.random.Generator, shape: tuple[int, int], params: TissueParams) -> tuple[np.ndarray, np.ndarray]:
    """Cells in straight files starting at uniformly random places: positions (n, 2), orientations (n,)."""
    mean_len = max(params.file_length, 1.0)
    m = rng.poisson(params.cells_per_px2 * shape[0] * shape[1] / mean_len)
    start = rng.uniform((0, 0), shape, size=(m, 2))
    theta = tract_directions(rng, m, params.tract_bias)
    step = 1.1 * params.cell_length * np.stack([np.sin(theta), np.cos(theta)], 1)
    yx, th = _files(lambda k: (start + k * step, theta), 1 + rng.poisson(mean_len - 1.0, m))
    return np.mod(yx, shape), th  # wrap round, keeping the density uniform


def _gabor(period: float, angle: float, sigma: float) -> np.ndarray:
    """A zero-mean Gabor kernel: fibres running along ``angle`` (radians), ``period`` px apart; (k, k)."""
    r = int(np.ceil(2.5 * sigma))
    c = np.arange(-r, r + 1, dtype=np.float32)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    across = -np.sin(angle) * xx + np.cos(angle) * yy  # distance across the fibres
    g = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2) * np.cos(2 * np.pi * across / period)
    return (g - g.mean()).astype(np.float32)


def fibre_directions(rng: np.random.Generator, yx: np.ndarray, lesion: Lesion, arrangement: str | None,
                     params: TissueParams) -> np.ndarray:
    """Fibre directions (n,) at ``yx``: no local order outside the lesion, the class's order inside.

    ``parallel``: one direction per focus; ``crossing``: two families at right angles per focus;
    ``whorl``: concentric round the focus centre.
    """
    theta = tract_directions(rng, len(yx), params.tract_bias)
    if arrangement is None or len(lesion.radii) == 0:
        return theta
    inside = lesion.contains(yx)
    if not inside.any():
        return theta
    _, nearest = cKDTree(lesion.centres).query(yx[inside])
    field = rng.uniform(0, np.pi, len(lesion.radii))[nearest]
    if arrangement == "crossing":
        field = field + np.where(rng.uniform(size=len(field)) < 0.5, 0.0, np.pi / 2)
    elif arrangement == "whorl":
        d = yx[inside] - lesion.centres[nearest]
        field = np.arctan2(d[:, 0], d[:, 1]) + np.pi / 2
    elif arrangement != "parallel":
        raise ValueError(f"unknown arrangement {arrangement!r}; expected 'parallel', 'crossing' or 'whorl'")
    theta[inside] = field + rng.normal(0, params.orientation_jitter, len(field))
    return theta


def _oriented_sum(shape: tuple[int, int], yx: np.ndarray, layer: np.ndarray, values: np.ndarray,
                  kernels: list[np.ndarray]) -> np.ndarray:
    """Sum over impulses of ``values`` times ``kernels[layer]`` centred at ``yx``: one splat + FFT per kernel; (H, W)."""
    size = max(k.shape[0] for k in kernels)
    stack = np.zeros((len(kernels), size, size), np.float32)
    for i, kern in enumerate(kernels):
        o = (size - kern.shape[0]) // 2
        stack[i, o:o + kern.shape[0], o:o + kern.shape[0]] = kern
    grid = splat((len(kernels), *shape), yx, values.astype(np.float32), layer)
    return signal.fftconvolve(grid, stack, mode="same", axes=(1, 2)).sum(0).astype(np.float32)


def _bins(theta: np.ndarray) -> np.ndarray:
    """Orientation bin (0..ORIENTATION_BINS-1) of axial directions (n,)."""
    k = ORIENTATION_BINS
    return np.round(np.mod(theta, np.pi) / np.pi * k).astype(np.int64) % k


def fibre_texture(rng: np.random.Generator, shape: tuple[int, int], params: TissueParams, lesion: Lesion,
                  arrangement: str | None) -> np.ndarray:
    """Fine fluorescent fibres (sparse Gabor noise, zero mean, unit std); (H, W) float32.

    Gabor impulses of random sign at uniformly random places, each turned to the local fibre
    direction: the histogram and the radially averaged power spectrum do not depend on the
    directions, only the arrangement of the directions does.
    """
    period = params.fibre_period
    n = rng.poisson(6.0 * shape[0] * shape[1] / period**2)
    yx = rng.uniform((0, 0), shape, size=(n, 2))
    theta = fibre_directions(rng, yx, lesion, arrangement, params)
    kernels = [_gabor(period, b * np.pi / ORIENTATION_BINS, 0.9 * period) for b in range(ORIENTATION_BINS)]
    tex = _oriented_sum(shape, yx, _bins(theta), rng.choice([-1.0, 1.0], n), kernels)
    return tex / np.float32(tex.std() + 1e-6)


def render_tissue(rng: np.random.Generator, shape: tuple[int, int], params: TissueParams, lesion: Lesion,
                  arrangement: str | None) -> np.ndarray:
    """A fluorescence canvas (H, W) float32 >= 0 of one patient's tissue, ``lesion`` ordered as the class says."""
    fibres = fibre_texture(rng, shape, params, lesion, arrangement)
    yx, theta = cell_files(rng, shape, params)  # cells: class-independent clutter
    is_round = rng.uniform(size=len(yx)) < params.round_fraction
    amp = params.cell_brightness * rng.uniform(0.6, 1.4, len(yx)).astype(np.float32)
    cells = render_cells(shape, yx, theta, amp, is_round, params.cell_length, params.aspect)
    bg = params.background * np.clip(1.0 + 0.35 * smooth_field(rng, shape, 2.0 * params.cell_length), 0.2, None)
    n_vessels = rng.poisson(params.vessels)
    vessels = vessel_layer(rng, shape, n_vessels, params.cell_length / params.aspect) if n_vessels else 0.0
    fibre = params.background * params.fibre_contrast * fibres
    return np.maximum(bg + fibre + cells + 0.6 * params.cell_brightness * vessels, 0.0).astype(np.float32)
