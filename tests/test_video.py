"""Video input/output (``data.video``): MP4/AVI round trips through PyAV, numbered frame folders, clear errors."""

import os

import av
import numpy as np
import pytest
from PIL import Image

from lclsc_jax import data
from lclsc_jax.data import video
from lclsc_jax.data.io import DataError


def _frames(n=10, size=48):
    """Smooth moving grey gradients (codec friendly) ``(n, size, size)`` uint8."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    return [np.clip(40 + 3 * xx + 1.5 * yy + 6 * k, 0, 255).astype(np.uint8) for k in range(n)]


@pytest.mark.parametrize("ext", ["mp4", "avi"])
def test_video_round_trip_keeps_count_fps_and_pixels(tmp_path, ext):
    frames = _frames()
    path = str(tmp_path / f"clip.{ext}")
    assert video.write_video(path, frames, fps=15) == len(frames)
    with av.open(path) as c:  # an independent look at the file: codec, pixel format, rate
        st = c.streams.video[0]
        assert st.codec_context.pix_fmt == "yuv420p"
        assert float(st.average_rate) == pytest.approx(15.0)
    s = video.read_frames(path, image_size=48, channels=1)
    got = list(s)
    assert s.fps == pytest.approx(15.0)
    assert len(got) == len(frames)
    assert s.n_frames in (None, len(frames))
    for g, f in zip(got, frames):
        assert g.shape == (48, 48, 1) and g.dtype == np.uint8
        diff = np.abs(g[..., 0].astype(np.int64) - f)
        assert diff.mean() < 2.0 and diff.max() <= 12  # lossy codec, chroma subsampling
    assert video.read_frames(path, 48, 1, fps=30).fps == 30.0  # --fps overrides the stream's rate


def test_video_frames_are_resized_and_coloured_like_training_images(tmp_path):
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(30, 220, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # blocky RGB 64x64
    path = str(tmp_path / "rgb.mp4")
    video.write_video(path, [base] * 3, fps=12)
    rgb = list(video.read_frames(path, 32, channels=3))
    assert len(rgb) == 3 and rgb[0].shape == (32, 32, 3)
    png = tmp_path / "ref.png"
    Image.fromarray(base).save(png)
    ref = data.load_image_file(str(png), 32, 3).astype(np.int64)  # the training path on the same pixels
    assert np.abs(rgb[0].astype(np.int64) - ref).mean() < 6.0
    grey = next(iter(video.read_frames(path, 32, channels=1)))
    lum = np.round(base.astype(np.float64) @ [0.299, 0.587, 0.114])  # ITU-R 601, as data.io
    ref_grey = np.asarray(Image.fromarray(lum.astype(np.float32), mode="F").resize((32, 32), Image.BILINEAR))
    assert np.abs(grey[..., 0] - ref_grey).mean() < 6.0


def test_odd_sized_frames_are_padded_to_even(tmp_path):
    path = str(tmp_path / "odd.mp4")
    video.write_video(path, [np.full((31, 33, 3), 128, np.uint8)] * 2, fps=10)
    with av.open(path) as c:
        st = c.streams.video[0]
        assert (st.codec_context.width, st.codec_context.height) == (34, 32)
    with pytest.raises(ValueError, match="is 20x20"):
        with video.VideoWriter(str(tmp_path / "x.mp4"), 10) as w:
            w.write(np.zeros((32, 32), np.uint8))
            w.write(np.zeros((20, 20), np.uint8))


def test_frame_folder_natural_sort_and_default_fps(tmp_path):
    folder = tmp_path / "seq"
    folder.mkdir()
    for k in (10, 2, 1, 11):
        Image.fromarray(np.full((40, 40), 20 * k, np.uint8)).save(folder / f"frame{k}.png")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not a frame")
    s = video.read_frames(str(folder), 16, 1)
    assert [os.path.basename(n) for n in s.names] == ["frame1.png", "frame2.png", "frame10.png", "frame11.png"]
    assert s.fps == video.DEFAULT_FPS == 12.0 and s.n_frames == 4
    values = [int(f[0, 0, 0]) for f in s]
    assert values == [20, 40, 200, 220]
    assert video.read_frames(str(folder), 16, 1, fps=25).fps == 25.0
    assert sorted(["f10.tif", "f9.tif", "f100.tif"], key=video.natural_key) == ["f9.tif", "f10.tif", "f100.tif"]


def test_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match="no such"):
        video.read_frames(str(tmp_path / "missing.mp4"), 32)
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video\n")
    with pytest.raises(DataError, match="fake.mp4: not a readable video"):
        video.read_frames(str(fake), 32)
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    with pytest.raises(DataError, match="not a video"):
        video.read_frames(str(txt), 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no frames"):
        video.read_frames(str(empty), 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(bad / "f1.png")
    (bad / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    frames = video.read_frames(str(bad), 32)
    next(frames)
    with pytest.raises(DataError, match="f2.png"):
        next(frames)
    with pytest.raises(ValueError, match="fps"):
        video.read_frames(str(bad), 32, fps=0)
    assert video.is_video("A.MP4") and video.is_video("b.avi") and not video.is_video("c.png")
