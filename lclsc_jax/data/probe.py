"""Probe passes over the tissue: smooth translation and rotation, fast frames, non-diagnostic frames.

A pass is a sequence of poses ``(cy, cx, angle)`` on a tissue canvas. The probe glides with a
smoothly varying velocity (an AR(1) process) and slowly turning angle, so consecutive frames
overlap, as in a pCLE video; some frames move fast and are motion-blurred over the exposure.
Some frames are non-diagnostic: the probe loses contact (dark, defocused), the detector
saturates, or the probe is dragged (heavily smeared).
"""

from __future__ import annotations

import dataclasses

import numpy as np

NONDIAGNOSTIC_KINDS = ("out_of_contact", "saturated", "smeared")


@dataclasses.dataclass(frozen=True)
class Pass:
    """Poses of one probe pass: centres ``(F, 2)`` (y, x) and angles ``(F,)`` on the canvas, blur vectors ``(F, 2)``, kinds ``(F,)``."""

    centres: np.ndarray
    angles: np.ndarray
    blur: np.ndarray  # displacement during the exposure (px); zero for still frames
    kind: tuple[str, ...]  # "diagnostic" or one of NONDIAGNOSTIC_KINDS

    @property
    def diagnostic(self) -> np.ndarray:
        """(F,) bool: frames a clinician could read."""
        return np.asarray([k == "diagnostic" for k in self.kind])


def probe_pass(rng: np.random.Generator, n_frames: int, canvas: int, fov_radius: float, *, motion: bool = True,
               speed: tuple[float, float] = (0.06, 0.15), fast_prob: float = 0.12,
               fast_speed: tuple[float, float] = (0.1, 0.2), exposure: float = 0.5,
               nondiagnostic: float = 0.0, motion_blur: bool = True) -> Pass:
    """Poses of ``n_frames`` frames on a square canvas of ``canvas`` px (speeds are fractions of the FOV diameter).

    ``motion=False`` draws independent poses (no overlap between frames). ``nondiagnostic`` is the
    expected fraction of frames that are non-diagnostic.
    """
    d = 2.0 * fov_radius
    lo, hi = fov_radius + 2.0, canvas - fov_radius - 2.0
    if hi <= lo:
        raise ValueError(f"canvas of {canvas} px cannot hold a field of view of radius {fov_radius} px")
    centres = np.zeros((n_frames, 2))
    blur = np.zeros((n_frames, 2))
    angles = np.zeros(n_frames)
    p = rng.uniform(lo, hi, 2)
    heading = rng.uniform(0, 2 * np.pi)
    angle = rng.uniform(0, 2 * np.pi)
    spin = 0.0
    for f in range(n_frames):
        if not motion:
            p, angle = rng.uniform(lo, hi, 2), rng.uniform(0, 2 * np.pi)
            centres[f], angles[f] = p, angle
            continue
        fast = rng.uniform() < fast_prob
        v = d * rng.uniform(*(fast_speed if fast else speed))
        heading += rng.normal(0, 0.5)
        step = v * np.array([np.sin(heading), np.cos(heading)])
        q = p + step
        for ax in range(2):  # reflect at the canvas edge and turn round
            if q[ax] < lo or q[ax] > hi:
                step[ax] = -step[ax]
                heading = np.arctan2(step[0], step[1])
        p = np.clip(p + step, lo, hi)
        spin = 0.8 * spin + rng.normal(0, 0.03)
        angle += spin
        centres[f], angles[f] = p, angle
        if motion_blur and fast:
            blur[f] = exposure * step
    kind = ["diagnostic"] * n_frames
    n_nd = int(np.floor(nondiagnostic * n_frames + rng.uniform()))  # the expected count, unbiased
    for f in rng.choice(n_frames, size=min(n_nd, n_frames), replace=False):
        kind[int(f)] = NONDIAGNOSTIC_KINDS[int(rng.integers(len(NONDIAGNOSTIC_KINDS)))]
        if kind[int(f)] == "smeared":
            ang = rng.uniform(0, 2 * np.pi)
            blur[f] = d * rng.uniform(0.4, 0.8) * np.array([np.sin(ang), np.cos(ang)])
    return Pass(centres=centres, angles=angles, blur=blur, kind=tuple(kind))


def frame_to_canvas(yx: np.ndarray, centre: np.ndarray, angle: float) -> np.ndarray:
    """Points ``(n, 2)`` (y, x) relative to the field centre -> canvas coordinates for a pose; (n, 2)."""
    ca, sa = np.cos(angle), np.sin(angle)
    y, x = yx[:, 0], yx[:, 1]
    return np.stack([sa * x + ca * y + centre[0], ca * x - sa * y + centre[1]], 1)
