"""Paths that may be bucket URLs (``gs://``, ``s3://``): one small place for the file operations runs need.

Local paths behave exactly as ``os`` does (atomic writes by rename). URLs go through fsspec
(``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``; the ``cloud`` extra installs both); an S3-compatible
endpoint (MinIO, moto, ...) is taken from ``AWS_ENDPOINT_URL`` as botocore does. Object stores
write whole objects, so a write is atomic there too.
"""

from __future__ import annotations

import os
from typing import IO, Any

#: URL schemes handled as buckets.
SCHEMES = ("gs://", "s3://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bucket URL (``gs://...``, ``s3://...``)."""
    return str(path).startswith(SCHEMES)


def _fs(url: str) -> Any:
    """The fsspec filesystem of ``url``; a clear error when its package is missing."""
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec comes with the required packages
        raise ValueError(f"{url}: bucket URLs need fsspec (pip install 'lclsc-jax[cloud]')") from e
    try:
        fs, _ = fsspec.core.url_to_fs(url, **_options(url))
    except ImportError as e:
        need = "s3fs" if url.startswith("s3://") else "gcsfs"
        raise ValueError(f"{url}: {need} is not installed (pip install 'lclsc-jax[cloud]')") from e
    return fs


def _options(url: str) -> dict[str, Any]:
    """fsspec options: an S3 endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)."""
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths, ``/``-joined for URLs."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    """Whether a file or folder exists at ``path``."""
    return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """Whether ``path`` is a folder (a URL prefix holding objects)."""
    return _fs(path).isdir(path) if is_url(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a folder; ``[]`` if it does not exist."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs = _fs(path)
    if not fs.exists(path):
        return []
    return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)})


def makedirs(path: str) -> None:
    """Create a folder and its parents (a no-op on object stores, where folders are prefixes)."""
    if is_url(path):
        return
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    """The text of a file."""
    with open_file(path, "r") as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (local: a temporary file renamed; a bucket: one object)."""
    if is_url(path):
        _fs(path).pipe_file(path, text.encode())
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def open_file(path: str, mode: str = "r") -> IO:
    """``open`` for local paths and URLs."""
    return _fs(path).open(path, mode) if is_url(path) else open(path, mode)


def remove(path: str) -> None:
    """Delete a file; no error if it is absent."""
    if is_url(path):
        fs = _fs(path)
        if fs.exists(path):
            fs.rm(path)
        return
    if os.path.exists(path):
        os.remove(path)


def absolute(path: str) -> str:
    """``os.path.abspath`` for local paths; URLs unchanged."""
    return str(path) if is_url(path) else os.path.abspath(path)
