"""Live overlay frames (``explain.frame_overlay``): heat only inside the field of view, banner, panel, shapes."""

import numpy as np
import pytest
from matplotlib import colormaps

from lclsc_jax.explain import frame_overlay as fo


def _disc(h, w, r):
    yy, xx = np.mgrid[:h, :w]
    return np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) < r


@pytest.fixture
def frame():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (24, 20, 1), dtype=np.uint8)
    sal = rng.random((24, 20))
    return img, sal, _disc(24, 20, 9)


def test_shape_and_pixels_outside_the_fov_are_the_input(frame):
    img, sal, fov = frame
    for scale in (1, 3):
        out = fo.overlay_frame(img, sal, fov, label="tumour", confidence=0.9, diagnostic=True, window_label="tumour",
                               scale=scale)
        assert out.shape == (24 * scale, 20 * scale + fo.PANEL_PX * scale, 3) and out.dtype == np.uint8
        pic = out[:, :20 * scale]
        grey = np.repeat(np.repeat(img[..., 0], scale, 0), scale, 1)
        outside = ~np.repeat(np.repeat(fov, scale, 0), scale, 1)
        for c in range(3):
            np.testing.assert_array_equal(pic[..., c][outside], grey[outside])
        assert (pic[~outside] != np.repeat(grey[~outside, None], 3, 1)).any(axis=1).mean() > 0.9


def test_heat_inside_the_fov_is_the_jet_blend_of_the_fov_normalised_map(frame):
    img, sal, fov = frame
    out = fo.overlay_frame(img, sal, fov, label="a", confidence=0.5, diagnostic=None, window_label=None, scale=1)
    s = (sal - sal[fov].min()) / (sal[fov].max() - sal[fov].min())  # min-max over the field of view only
    jet = np.round(colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255)[np.round(s * 255).astype(int)]
    ref = np.round(0.55 * img.astype(np.float64) + 0.45 * jet)
    np.testing.assert_array_equal(out[:, :20][fov], ref[fov].astype(np.uint8))


def test_non_diagnostic_frame_gets_a_banner_and_no_heat(frame):
    img, sal, fov = frame
    scale = 4
    out = fo.overlay_frame(img, sal, fov, label="tumour", confidence=0.9, diagnostic=False, window_label=None,
                           scale=scale)
    pic = out[:, :20 * scale].astype(np.int64)
    red = (pic[..., 0] == fo.BANNER_RGB[0]) & (pic[..., 1] == fo.BANNER_RGB[1]) & (pic[..., 2] == fo.BANNER_RGB[2])
    rows = red.mean(axis=1)
    assert rows.max() > 0.5  # a band of banner rows across the frame (text inside it)
    band = np.flatnonzero(rows > 0.3)
    assert band.min() > 0 and band.max() < 24 * scale - 1  # a band, not the whole frame
    grey = np.repeat(np.repeat(img[..., 0], scale, 0), scale, 1)
    above = np.arange(24 * scale) < band.min()
    for c in range(3):  # no heat map anywhere outside the banner, even inside the field of view
        np.testing.assert_array_equal(pic[above][..., c], grey[above])
    kept = fo.overlay_frame(img, sal, fov, label="tumour", confidence=0.9, diagnostic=True, window_label=None,
                            scale=scale)[:, :20 * scale]
    assert not (((kept[..., 0] == 200) & (kept[..., 1] == 20) & (kept[..., 2] == 20)).mean(axis=1) > 0.5).any()


def test_panel_has_a_colour_bar_and_no_map_means_the_plain_frame(frame):
    img, sal, fov = frame
    out = fo.overlay_frame(img, sal, None, label="x", confidence=0.1, diagnostic=None, window_label="x", scale=4)
    col = out[8:-8, -6].astype(np.int64)  # a column through the colour bar at the panel's right edge
    assert col[0, 0] > 100 and col[0, 2] < 60  # top: red (high)
    assert col[-1, 2] > 100 and col[-1, 0] < 60  # bottom: blue (low)
    plain = fo.overlay_frame(np.repeat(img, 3, -1), None, fov, label="x", confidence=0.1, diagnostic=True,
                             window_label="x", scale=2)
    np.testing.assert_array_equal(plain[:, :40], np.repeat(np.repeat(np.repeat(img, 3, -1), 2, 0), 2, 1))
    with pytest.raises(ValueError, match="saliency must be"):
        fo.overlay_frame(img, sal[:5], fov, label="x", confidence=0.1, diagnostic=None, window_label=None)
    with pytest.raises(ValueError, match="uint8"):
        fo.overlay_frame(img.astype(np.float32), sal, fov, label="x", confidence=0.1, diagnostic=None,
                         window_label=None)
