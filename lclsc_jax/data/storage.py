"""Paths that may be bucket URLs (``gs://``, ``s3://``): one small place for the file operations runs need.

Local paths behave exactly as ``os`` does (atomic writes by rename). URLs go through fsspec
(``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``; the ``cloud`` extra installs both) rather than
``etils.epath``: epath hands URLs to the same fsspec backends but hides their options, and
these need two - an S3-compatible endpoint (MinIO, moto, ...) taken from ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) as botocore does, and no listing cache, so that a listing always
shows what another process wrote. ``gcsfs`` reads ``STORAGE_EMULATOR_HOST`` by itself.

Object stores write whole objects, so a write is atomic there too; :func:`create_exclusive` is
a conditional put (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``). A backend's own
exception (no credentials, an unreachable endpoint) becomes an ``OSError`` naming the URL;
a missing bucket or object a ``FileNotFoundError`` naming it.

:func:`local_mirror` copies a bucket folder (or a manifest and the files it names) to local
disk once, keyed by the objects' ETags, so the data loader reads local files as for any folder.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
from typing import IO, Any, Callable, Iterator, TypeVar

#: URL schemes handled as buckets.
SCHEMES = ("gs://", "s3://")

#: The extra that installs the bucket backends.
EXTRA_HINT = "pip install 'lclsc-jax[cloud]'"

_F = TypeVar("_F", bound=Callable[..., Any])


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bucket URL (``gs://...``, ``s3://...``)."""
    return str(path).startswith(SCHEMES)


def bucket_of(url: str) -> str:
    """The bucket URL (``s3://bucket``) of a bucket URL; a ``ValueError`` when it names none."""
    scheme, _, rest = str(url).partition("://")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{url}: a bucket URL needs a bucket name ({scheme}://BUCKET/path)")
    return f"{scheme}://{bucket}"


def _fs(url: str) -> Any:
    """The fsspec filesystem of ``url``; a clear error when its package is missing."""
    bucket_of(url)
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec comes with the required packages
        raise ValueError(f"{url}: bucket URLs need fsspec ({EXTRA_HINT})") from e
    try:
        fs, _ = fsspec.core.url_to_fs(url, **_options(url))
    except ImportError as e:
        need = "s3fs" if url.startswith("s3://") else "gcsfs"
        raise ValueError(f"{url}: {need} is not installed ({EXTRA_HINT})") from e
    return fs


def _options(url: str) -> dict[str, Any]:
    """fsspec options: no listing cache; for S3 an endpoint from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``)."""
    opts: dict[str, Any] = {"use_listings_cache": False}
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


@contextlib.contextmanager
def _url_errors(url: str) -> Iterator[None]:
    """Re-raise a backend's failure on ``url`` as an ``OSError`` (``FileNotFoundError``, ...) naming the URL."""
    try:
        yield
    except FileExistsError:
        raise
    except FileNotFoundError as e:
        msg = str(e)
        raise FileNotFoundError(msg if url in msg else f"{url}: {msg or 'no such object'}") from e
    except PermissionError as e:
        raise PermissionError(f"{url}: permission denied ({e})") from e
    except (OSError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/google-auth errors (no credentials, endpoint unreachable)
        raise OSError(f"{url}: {type(e).__name__}: {e}") from e


def _on_urls(fn: _F) -> _F:
    """Decorate a function whose first argument is a path: for URLs, its errors name the URL (:func:`_url_errors`)."""
    @functools.wraps(fn)
    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_url(path):
            return fn(path, *args, **kwargs)
        with _url_errors(str(path)):
            return fn(path, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def join(base: str, *parts: str) -> str:
    """``os.path.join`` for local paths, ``/``-joined for URLs."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """``os.path.dirname`` for local paths; the URL one level up (``s3://b/a/x.csv`` -> ``s3://b/a``)."""
    if is_url(path):
        head, _, _ = str(path).rstrip("/").rpartition("/")
        return head if "://" in head and head.split("://", 1)[1] else bucket_of(path)
    return os.path.dirname(path)


def absolute(path: str) -> str:
    """``os.path.abspath`` for local paths; URLs unchanged."""
    return str(path) if is_url(path) else os.path.abspath(path)


@_on_urls
def exists(path: str) -> bool:
    """Whether a file or folder exists at ``path`` (a URL in a missing bucket does not)."""
    return _fs(path).exists(path) if is_url(path) else os.path.exists(path)


@_on_urls
def isdir(path: str) -> bool:
    """Whether ``path`` is a folder (a URL prefix holding objects)."""
    return _fs(path).isdir(path) if is_url(path) else os.path.isdir(path)


@_on_urls
def isfile(path: str) -> bool:
    """Whether ``path`` is a file (an object)."""
    return _fs(path).isfile(path) if is_url(path) else os.path.isfile(path)


@_on_urls
def bucket_exists(url: str) -> bool:
    """Whether the bucket of ``url`` exists and is reachable with the credentials at hand (local paths: True)."""
    if not is_url(url):
        return True
    bucket = bucket_of(url)
    return bool(_fs(url).exists(bucket))


def check_bucket(url: str) -> None:
    """Raise ``FileNotFoundError`` naming the bucket when ``url``'s bucket does not exist (no-op for local paths)."""
    if is_url(url) and not bucket_exists(url):
        raise FileNotFoundError(f"{url}: bucket {bucket_of(url)} does not exist (or these credentials cannot see "
                                "it); create it or fix the URL")


@_on_urls
def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a folder; ``[]`` if it does not exist."""
    if not is_url(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs = _fs(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    own = _strip(path)
    return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in entries if p.rstrip("/") != own})


def _strip(url: str) -> str:
    """``url`` without its scheme and trailing slash, as fsspec names objects."""
    return str(url).split("://", 1)[1].rstrip("/")


def makedirs(path: str) -> None:
    """Create a folder and its parents (a no-op on object stores, where folders are prefixes)."""
    if is_url(path):
        return
    os.makedirs(path, exist_ok=True)


@_on_urls
def read_text(path: str) -> str:
    """The text of a file."""
    if is_url(path):
        return _fs(path).cat_file(path).decode("utf-8")
    with open(path) as f:
        return f.read()


@_on_urls
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


@_on_urls
def create_exclusive(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` only if it does not exist; False if it does.

    Local: ``O_EXCL``. Buckets: a conditional put (S3 ``If-None-Match: *``, GCS
    ``ifGenerationMatch=0``), atomic on AWS S3, GCS and stores that honour the condition.
    """
    if not is_url(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    try:
        _fs(path).pipe_file(path, text.encode(), mode="create")
    except FileExistsError:
        return False
    return True


def open_file(path: str, mode: str = "r") -> IO:
    """``open`` for local paths and URLs (a bucket object is written whole when the file closes)."""
    if not is_url(path):
        return open(path, mode)
    with _url_errors(path):
        return _fs(path).open(path, mode)


@_on_urls
def remove(path: str) -> None:
    """Delete a file; no error if it is absent."""
    if is_url(path):
        with contextlib.suppress(FileNotFoundError):
            _fs(path).rm_file(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@_on_urls
def remove_tree(path: str) -> None:
    """Delete a folder and everything under it; no error if it is absent."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = _fs(path)
    with contextlib.suppress(FileNotFoundError):
        if fs.exists(path):
            fs.rm(path, recursive=True)


@_on_urls
def upload_tree(url: str, local_dir: str, last: tuple[str, ...] = ()) -> None:
    """Copy every file under ``local_dir`` to the prefix ``url``; the files named in ``last`` (relative) go last.

    ``last``: commit markers, so a reader never sees a marker before what it commits.
    """
    fs = _fs(url)
    first, final = [], []
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
            (final if rel in last else first).append(rel)
    for group in (first, final):
        if group:
            fs.put([os.path.join(local_dir, r) for r in group], [join(url, r) for r in group])


@_on_urls
def download_tree(url: str, local_dir: str, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Copy the objects under the prefix ``url`` to ``local_dir``; returns their relative paths.

    ``keep(relative_path)`` selects the objects (default: all). A local file of the same size
    is taken as already there. Each file is written under a temporary name and renamed.
    """
    objects = _find(url)
    todo = []
    for rel, info in objects.items():
        if keep is not None and not keep(rel):
            continue
        dest = os.path.join(local_dir, *rel.split("/"))
        if not (os.path.isfile(dest) and os.path.getsize(dest) == info.get("size")):
            todo.append((rel, dest))
    _get(url, todo)
    return [rel for rel in objects if keep is None or keep(rel)]


def _find(url: str) -> dict[str, dict[str, Any]]:
    """The objects under the prefix ``url``: relative path -> fsspec info (``size``, ``ETag``, ...)."""
    fs = _fs(url)
    prefix = _strip(url) + "/"
    try:
        found = fs.find(url, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(prefix):]: info for p, info in found.items()
            if p.startswith(prefix) and info.get("type", "file") == "file" and not p.endswith("/")}


def _get(url: str, todo: list[tuple[str, str]]) -> None:
    """Download ``(relative path, local destination)`` pairs of the prefix ``url`` (temporary names, then renamed)."""
    if not todo:
        return
    fs = _fs(url)
    parts = [f"{dest}.part{os.getpid()}" for _, dest in todo]
    for p in parts:
        os.makedirs(os.path.dirname(p), exist_ok=True)
    try:
        fs.get([join(url, rel) for rel, _ in todo], parts)
        for (_, dest), p in zip(todo, parts):
            os.replace(p, dest)
    finally:
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)


def _fingerprint(info: dict[str, Any]) -> str:
    """What changes when an object changes: its ETag / GCS generation or md5, else size and modification time."""
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return f"{key}:{info[key]}"
    return f"size:{info.get('size')}:{info.get('LastModified') or info.get('updated') or info.get('mtime')}"


MIRROR_DIR = "mirror"


def local_mirror(url: str, cache_dir: str) -> str:
    """A local copy of the bucket folder or CSV manifest ``url``; returns the local folder or manifest path.

    A folder (``s3://b/data``, layout as for a local folder) is copied whole; a manifest
    (``s3://b/data/manifest.csv``) with the images and masks it names, which must lie in its
    folder (relative paths, resolved against the bucket folder). The copy lives in
    ``CACHE/mirror/<folder name>-<hash of its URL>/`` and is kept up to date by the objects'
    ETags: only new or changed objects are fetched, local files whose object is gone are
    deleted (a folder). Raises ``FileNotFoundError`` naming the URL when there is nothing there.
    """
    url = str(url).rstrip("/")
    check_bucket(url)
    manifest = url.lower().endswith(".csv")
    root = parent(url) if manifest else url
    name = root.rstrip("/").rsplit("/", 1)[-1] or "data"
    key = hashlib.sha256(root.encode()).hexdigest()[:12]
    local_root = os.path.join(str(cache_dir), MIRROR_DIR, f"{name}-{key}")
    state_file = f"{local_root}.json"
    with _url_errors(url):
        objects = _find(root)
        if manifest:
            rel_manifest = url[len(root) + 1:]
            if rel_manifest not in objects:
                raise FileNotFoundError(f"{url}: manifest does not exist")
            _sync(root, local_root, state_file, {rel_manifest: objects[rel_manifest]}, prune=False)
            local_manifest = os.path.join(local_root, *rel_manifest.split("/"))
            named = _manifest_files(local_manifest, url, rel_manifest)
            _sync(root, local_root, state_file, {r: objects[r] for r in named if r in objects}, prune=False)
            return local_manifest
        if not objects:
            raise FileNotFoundError(f"{url}: no such folder (no objects under it)")
        _sync(root, local_root, state_file, objects, prune=True)
        return local_root


def _sync(root: str, local_root: str, state_file: str, objects: dict[str, dict[str, Any]], prune: bool) -> None:
    """Fetch the ``objects`` (relative path -> info) of ``root`` whose fingerprint changed; ``prune``: drop the rest."""
    try:
        with open(state_file) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    todo = []
    for rel, info in objects.items():
        dest = os.path.join(local_root, *rel.split("/"))
        if state.get(rel) != _fingerprint(info) or not os.path.isfile(dest):
            todo.append((rel, dest))
    _get(root, todo)
    state.update({rel: _fingerprint(objects[rel]) for rel, _ in todo})
    if prune:
        for rel in [r for r in state if r not in objects]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(local_root, *rel.split("/")))
            del state[rel]
    os.makedirs(os.path.dirname(state_file), exist_ok=True)
    tmp = f"{state_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, state_file)


def _manifest_files(local_manifest: str, url: str, rel_manifest: str) -> list[str]:
    """The bucket-relative paths of the images and masks a manifest names; ``DataError`` for one outside its folder."""
    from lclsc_jax.data.io import DataError

    with open(local_manifest, newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    base = posixpath.dirname(rel_manifest)
    named = []
    for row in reader:
        for col in ("path", "mask"):
            value = (row.get(col) or "").strip()
            if not value:
                continue
            rel = posixpath.normpath(posixpath.join(base, value))
            if "://" in value or value.startswith("/") or rel.startswith("../") or rel == "..":
                raise DataError(f"{url} line {reader.line_num}: '{value}' is outside the manifest's folder; a bucket "
                                "manifest names files relative to its folder")
            named.append(rel)
    return named
