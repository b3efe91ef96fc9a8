"""Video input and output: frames of a video file (PyAV) or a folder of numbered frames; writing MP4 videos.

Frames are prepared as ``data.load_image_file`` prepares images (bit depth, luminance / channel
repetition, bilinear resize to ``image_size``), so a model sees a video frame as it saw training images.
PyAV (the ``video`` extra: ``pip install 'lclsc-jax[video]'``) is imported only when a video is read or written.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from lclsc_jax.data.io import IMAGE_EXTENSIONS, DataError, _read_raw, _resize, _to_channels, _to_unit_float

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm")
DEFAULT_FPS = 12.0  # a pCLE device's typical frame rate; frame folders carry none
_NUMBER = re.compile(r"(\d+)")


def _av() -> Any:
    """The ``av`` module, or an ImportError naming the extra to install."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError("reading or writing videos needs PyAV: pip install 'lclsc-jax[video]'") from e
    return av


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video file by its extension (``.mp4``, ``.avi``, ``.mkv``, ``.mov``, ...)."""
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def is_frame_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a video file name or an existing folder (a sequence of numbered frames)."""
    return is_video(path) or os.path.isdir(str(path))


def natural_key(name: str) -> tuple:
    """Sort key of a file name by its numbers: ``frame2.png`` before ``frame10.png``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in _NUMBER.split(name) if t)


def prepare_frame(arr: np.ndarray, image_size: int, channels: int, where: str = "frame") -> np.ndarray:
    """A decoded frame ``(H, W[, C])`` (any bit depth) -> uint8 ``(image_size, image_size, channels)``."""
    x = _to_channels(_to_unit_float(np.asarray(arr), where), channels)
    planes = [_resize(x[..., c], image_size, 1) for c in range(x.shape[-1])]  # 1 = PIL bilinear
    return np.clip(np.rint(np.stack(planes, axis=-1) * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class FrameStream:
    """An iterator of uint8 frames ``(H, W, C)`` with ``fps``, ``n_frames`` (None if unknown) and ``names``."""

    source: str
    fps: float
    n_frames: int | None
    names: list[str]
    _frames: Iterator[np.ndarray]

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._frames

    def __next__(self) -> np.ndarray:
        return next(self._frames)


def list_frames(folder: str) -> list[str]:
    """The image files of ``folder`` in natural order (hidden files skipped); ``DataError`` when there are none."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    files = [f for f in os.listdir(folder) if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(folder, f))]
    if not files:
        raise DataError(f"{folder}: no frames (expected numbered {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)")
    return [os.path.join(folder, f) for f in sorted(files, key=natural_key)]


def _folder_frames(paths: list[str], image_size: int, channels: int) -> Iterator[np.ndarray]:
    for p in paths:
        yield prepare_frame(_read_raw(p), image_size, channels, p)


def _open_video(path: str) -> tuple[Any, Any]:
    """``(container, video stream)`` of a video file; ``DataError`` naming it when it is not one."""
    av = _av()
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except Exception as e:  # av.error.InvalidDataError and friends
        raise DataError(f"{path}: not a readable video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: has no video stream")
    return container, container.streams.video[0]


def _video_frames(path: str, container: Any, stream: Any, image_size: int, channels: int) -> Iterator[np.ndarray]:
    try:
        for k, frame in enumerate(container.decode(stream)):
            try:
                arr = frame.to_ndarray(format="gray" if channels == 1 else "rgb24")
            except Exception as e:
                raise DataError(f"{path}: frame {k} cannot be decoded ({type(e).__name__}: {e})") from e
            yield prepare_frame(arr, image_size, channels, f"{path} frame {k}")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: decoding failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def check_source(source: str | os.PathLike) -> None:
    """Raise ``DataError`` naming ``source`` unless it is a readable video file or a folder with frames (cheap)."""
    src = str(source)
    if os.path.isdir(src):
        list_frames(src)
        return
    if not os.path.exists(src):
        raise DataError(f"{src}: no such video file or frame folder")
    if not is_video(src):
        raise DataError(f"{src}: not a video ({'/'.join(e[1:] for e in VIDEO_EXTENSIONS)}) or a folder of frames")
    container, _ = _open_video(src)
    container.close()


def read_frames(source: str | os.PathLike, image_size: int, channels: int = 1,
                fps: float | None = None) -> FrameStream:
    """Frames of a video file or a folder of numbered frames, prepared as training images: uint8 ``(H, W, C)``.

    A video's rate is its stream's average rate unless ``fps`` is given; a folder's is ``fps`` (default
    :data:`DEFAULT_FPS`). ``names``: the frame files (folder) or ``frame_000000``... (video).
    """
    src = str(source)
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if os.path.isdir(src):
        paths = list_frames(src)
        return FrameStream(src, float(fps or DEFAULT_FPS), len(paths), paths,
                           _folder_frames(paths, image_size, channels))
    if not os.path.exists(src):
        raise DataError(f"{src}: no such video file or frame folder")
    if not is_video(src):
        raise DataError(f"{src}: not a video ({'/'.join(e[1:] for e in VIDEO_EXTENSIONS)}) or a folder of frames")
    container, stream = _open_video(src)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    own_fps = float(rate) if rate else DEFAULT_FPS
    n = int(stream.frames) if stream.frames else None
    names = [f"frame_{k:06d}" for k in range(n)] if n else []
    return FrameStream(src, float(fps or own_fps), n, names,
                       _video_frames(src, container, stream, image_size, channels))


def _codec(av: Any) -> str:
    """``libx264`` when this FFmpeg build can encode it, else ``mpeg4``."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # pragma: no cover - depends on the wheel
        return "mpeg4"


class VideoWriter:
    """Write RGB uint8 frames ``(H, W, 3)`` (or grey ``(H, W[, 1])``) to a video file at ``fps``.

    H.264 (``libx264``) when available, else MPEG-4 part 2; pixel format yuv420p, so odd sizes are
    padded by one black row/column. A context manager; ``close()`` flushes the encoder.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, crf: int = 18) -> None:
        self.av = _av()
        self.path = str(path)
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self.fps = float(fps)
        self.crf = crf
        self.container = self.av.open(self.path, mode="w")
        self.stream: Any = None
        self.n_frames = 0

    def _open_stream(self, h: int, w: int) -> None:
        from fractions import Fraction

        rate = Fraction(self.fps).limit_denominator(1001)
        codec = _codec(self.av)
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = w + (w % 2), h + (h % 2)
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": str(self.crf)}
        else:
            self.stream.bit_rate = 8_000_000

    def write(self, frame: np.ndarray) -> None:
        """Append one frame ``(H, W, 3)`` / ``(H, W)`` uint8; every frame must have the first one's size."""
        f = np.asarray(frame)
        if f.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {f.dtype}")
        if f.ndim == 3 and f.shape[-1] == 1:
            f = f[..., 0]
        if f.ndim == 2:
            f = np.repeat(f[..., None], 3, axis=-1)
        if f.ndim != 3 or f.shape[-1] != 3:
            raise ValueError(f"frames must be (H, W, 3) or (H, W), got {frame.shape}")
        h, w = f.shape[:2]
        if self.stream is None:
            self._open_stream(h, w)
        elif (h + h % 2, w + w % 2) != (self.stream.height, self.stream.width):
            raise ValueError(f"frame {self.n_frames} is {w}x{h}, the video is {self.stream.width}x{self.stream.height}")
        if h % 2 or w % 2:
            f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)))
        vf = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
        for packet in self.stream.encode(vf):
            self.container.mux(packet)
        self.n_frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        if self.container is None:
            return
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
        self.container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float) -> int:
    """Write ``frames`` (each ``(H, W, 3)`` or ``(H, W)`` uint8) to ``path`` at ``fps``; returns the frame count."""
    with VideoWriter(path, fps) as w:
        for f in frames:
            w.write(f)
        return w.n_frames
