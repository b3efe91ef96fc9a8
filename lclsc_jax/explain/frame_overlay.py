"""One frame of a live overlay video: the frame, its saliency heat map inside the field of view, and a side panel.

The panel shows the frame's class and confidence, the windowed (causal) decision, the filter's verdict
and a colour bar of the heat map. A frame the filter rejects gets a red NON-DIAGNOSTIC banner and no
heat map. Pure NumPy + Pillow (``ImageFont.load_default(size=...)``, no font files).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Heat map opacity inside the field of view.
HEAT_ALPHA = 0.45
#: Side panel width in frame pixels (multiplied by ``scale``).
PANEL_PX = 48
BANNER_RGB = (200, 20, 20)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (a scalable one with FreeType, else the bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


@functools.lru_cache(maxsize=1)
def _jet_lut() -> np.ndarray:
    """``(256, 3)`` uint8 jet colour table."""
    from matplotlib import colormaps

    return np.round(colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.uint8)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] ``(...)`` -> jet RGB uint8 ``(..., 3)``."""
    idx = np.clip(np.rint(np.nan_to_num(np.asarray(values, np.float64)) * 255.0), 0, 255).astype(np.int64)
    return _jet_lut()[idx]


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` / ``(H, W, 1)`` / ``(H, W, 3)`` -> uint8 ``(H, W, 3)`` (grey repeated)."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def _upscale(x: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of the first two axes by ``scale``."""
    return np.repeat(np.repeat(x, scale, axis=0), scale, axis=1)


def _normalise_map(saliency: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    """``(H, W)`` map rescaled to [0, 1] over the field of view (min 0 / max 1 inside), 0 outside."""
    s = np.nan_to_num(np.asarray(saliency, np.float64))
    inside = np.ones(s.shape, bool) if fov is None else np.asarray(fov, bool)
    if not inside.any():
        return np.zeros_like(s)
    lo, hi = s[inside].min(), s[inside].max()
    out = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)
    return np.where(inside, np.clip(out, 0.0, 1.0), 0.0)


def blend_heat(image: np.ndarray, saliency: np.ndarray, fov: np.ndarray | None, alpha: float = HEAT_ALPHA,
               scale: int = 1) -> np.ndarray:
    """``image (H, W[, C])`` uint8, upscaled by ``scale``, with the jet heat of ``saliency (H, W)`` inside ``fov``.

    Returns uint8 ``(H*scale, W*scale, 3)``; pixels outside ``fov`` are the (upscaled) input pixels unchanged.
    """
    rgb = to_rgb(image)
    h, w = rgb.shape[:2]
    s = np.asarray(saliency)
    if s.shape != (h, w):
        raise ValueError(f"saliency must be ({h}, {w}) like the image, got {s.shape}")
    if fov is not None and np.asarray(fov).shape != (h, w):
        raise ValueError(f"fov must be ({h}, {w}) like the image, got {np.asarray(fov).shape}")
    heat = _normalise_map(s, fov)
    if scale > 1:
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w * scale, h * scale),
                                                                                     Image.Resampling.BILINEAR))
    inside = _upscale(np.ones((h, w), bool) if fov is None else np.asarray(fov, bool), scale)
    base = _upscale(rgb, scale)
    mixed = np.rint((1.0 - alpha) * base + alpha * heat_colours(heat).astype(np.float64))
    return np.where(inside[..., None], np.clip(mixed, 0, 255).astype(np.uint8), base)


def _colour_bar(draw: ImageDraw.ImageDraw, x0: int, y0: int, width: int, height: int) -> None:
    """A vertical jet colour bar at ``(x0, y0)``: top = 1 (most salient), bottom = 0."""
    col = heat_colours(np.linspace(1.0, 0.0, height))
    for k in range(height):
        draw.line([(x0, y0 + k), (x0 + width - 1, y0 + k)], fill=tuple(int(v) for v in col[k]))
    draw.rectangle([x0, y0, x0 + width - 1, y0 + height - 1], outline=(255, 255, 255))


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, size: int, width: float) -> ImageFont.ImageFont:
    """The built-in font at ``size`` px or smaller, so that ``text`` fits ``width`` px."""
    while size > 6 and draw.textlength(text, font=_font(size)) > width:
        size -= 1
    return _font(size)


def overlay_frame(image: np.ndarray, saliency: np.ndarray | None, fov: np.ndarray | None, *, label: str,
                  confidence: float, diagnostic: bool | None, window_label: str | None, scale: int = 4,
                  time_s: float | None = None) -> np.ndarray:
    """The frame ``(H, W[, C])`` uint8 with heat map and panel: uint8 ``(H*scale, W*scale + PANEL_PX*scale, 3)``.

    ``saliency (H, W)`` (any range; rescaled to [0, 1] inside ``fov``) is drawn as a jet heat map only
    inside ``fov (H, W)`` bool (everywhere when None; nothing when ``saliency`` is None). ``diagnostic``
    False: a red NON-DIAGNOSTIC banner across the frame and no heat map; None: no filter. The panel
    lists the class and ``confidence``, the windowed decision ``window_label`` (None: undecided), the
    filter's verdict, ``time_s`` and a colour bar.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    rgb = to_rgb(image)
    h, w = rgb.shape[:2]
    rejected = diagnostic is False
    if saliency is not None and not rejected:
        frame = blend_heat(rgb, saliency, fov, scale=scale)
    else:
        frame = _upscale(rgb, scale)
    hs, ws, pw = h * scale, w * scale, PANEL_PX * scale
    canvas = Image.new("RGB", (ws + pw, hs), (24, 24, 24))
    canvas.paste(Image.fromarray(frame), (0, 0))
    draw = ImageDraw.Draw(canvas)
    fs = max(8, min(hs // 11, 6 * scale))
    if rejected:
        band = max(fs + 6, hs // 7)
        y0 = (hs - band) // 2
        draw.rectangle([0, y0, ws - 1, y0 + band], fill=BANNER_RGB)
        text = "NON-DIAGNOSTIC"
        font = _fitting_font(draw, text, fs, 0.92 * ws)
        tw = draw.textlength(text, font=font)
        draw.text(((ws - tw) / 2, y0 + (band - font.size) / 2), text, fill=(255, 255, 255), font=font)
    margin = max(2, scale)
    bar_w = max(4, 2 * scale) if saliency is not None else 0
    text_w = pw - bar_w - 3 * margin
    white, grey = (255, 255, 255), (170, 170, 170)
    rows = [("frame", grey), (f"{label} {confidence:.2f}", grey if rejected else white), ("window", grey),
            (window_label if window_label is not None else "undecided", white)]
    if diagnostic is not None:
        rows += [("filter", grey), ("non-diagnostic" if rejected else "diagnostic",
                                    BANNER_RGB if rejected else (90, 200, 90))]
    if time_s is not None:
        rows.append((f"t = {time_s:.2f} s", grey))
    step = min(fs + margin, (hs - 2 * margin) // len(rows))
    y = margin
    for text, colour in rows:
        font = _fitting_font(draw, text, min(fs, step - 1), text_w)
        draw.text((ws + margin, y), text, fill=colour, font=font)
        y += step
    if saliency is not None:
        _colour_bar(draw, ws + pw - bar_w - margin, margin, bar_w, hs - 2 * margin)
    return np.asarray(canvas, dtype=np.uint8)
