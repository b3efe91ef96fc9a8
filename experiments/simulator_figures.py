"""Figures of the pCLE simulator for the README and docs/data.md.

    python experiments/simulator_figures.py --out docs/figures

Writes
  * ``pcle_panel.png``: simulated frames of the default benchmark at 128 px (every class, non-diagnostic
    frames, a short sequence), masks outlined in red;
  * ``pcle_bundle.png``: one frame at 512 px as the probe sees it (raw honeycomb of fibre cores) and as the
    device shows it (interpolated), with a zoom;
  * ``pcle_spectrum.png``: the radially averaged power spectrum of that frame, raw and interpolated, with
    the hexagonal lattice's first order ``2 / (sqrt(3) pitch)`` marked: the fibre-pitch peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lclsc_jax import data
from lclsc_jax.data import fibre_bundle as fb
from lclsc_jax.data import synthetic


def radial_spectrum(img: np.ndarray, fov: np.ndarray, bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of ``img`` (H, W) inside ``fov``, mean removed: (freq (bins,), power (bins,))."""
    x = np.where(fov, img - img[fov].mean(), 0.0)
    p = np.abs(np.fft.fftshift(np.fft.fft2(x))) ** 2
    f = np.fft.fftshift(np.fft.fftfreq(img.shape[0]))
    fr = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    edges = np.linspace(0.0, 0.5, bins + 1)
    idx = np.digitize(fr.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < bins)
    power = np.bincount(idx[ok], p.ravel()[ok], bins) / np.maximum(np.bincount(idx[ok], minlength=bins), 1)
    return 0.5 * (edges[:-1] + edges[1:]), power


def bundle_frames(size: int = 512, patient: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """One frame at ``size`` px, raw (honeycomb) and interpolated; returns (raw, interpolated, pitch px)."""
    base = synthetic.SyntheticConfig(image_size=size, num_patients=3, images_per_patient=2, seed=seed,
                                     nondiagnostic_fraction=0.0, fast_frame_prob=0.0)
    raw = synthetic.generate_patient(dataclasses.replace(base, interpolate=False), patient)[0]["image"][..., 0]
    interp = synthetic.generate_patient(base, patient)[0]["image"][..., 0]
    params = synthetic.patient_params(base, patient)
    pitch = fb.core_pitch(params.n_cores, synthetic.FOV_FRACTION * size)
    return raw, interp, pitch


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    """Write the three figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--size", type=int, default=128, help="image size of the panel (default 128)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    with tempfile.TemporaryDirectory() as cache:
        cfg = data.SyntheticConfig(image_size=args.size, num_patients=12, images_per_patient=40)
        ds = data.load(synthetic=cfg, cache_dir=cache)
        print(data.render_panel(ds, os.path.join(args.out, "pcle_panel.png"), per_class=6, sequence_frames=6))

    raw, interp, pitch = bundle_frames()
    size = raw.shape[0]
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 3)
    z = slice(size // 2 - 48, size // 2 + 48)
    for ax, img, title in ((axes[0], raw, "raw: fibre cores on dark cladding"),
                           (axes[1], interp, "interpolated (what the device shows)"),
                           (axes[2], raw[z, z], "raw, zoomed 5x")):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    print(_save(fig, os.path.join(args.out, "pcle_bundle.png")))

    fov = fb.fov_mask(size, synthetic.FOV_FRACTION * size - 4) == 1.0
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for img, label in ((raw, "raw bundle image"), (interp, "interpolated frame")):
        f, p = radial_spectrum(img.astype(np.float64) / 255, fov)
        ax.semilogy(f[1:], p[1:] / p[1:].max(), label=label)
    peak = 2 / (np.sqrt(3) * pitch)
    ax.axvline(peak, color="k", ls="--", lw=0.8)
    ax.text(peak, 0.3, f"  fibre pitch {pitch:.2f} px:\n  2/(sqrt(3) pitch) = {peak:.3f} cyc/px", fontsize=8)
    ax.set_xlabel("spatial frequency (cycles / pixel)")
    ax.set_ylabel("radially averaged power (normalised)")
    ax.set_title(f"power spectrum of a simulated frame ({size} px)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    print(_save(fig, os.path.join(args.out, "pcle_spectrum.png")))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
