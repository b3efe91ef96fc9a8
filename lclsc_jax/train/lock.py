"""One training process per workdir: ``WORKDIR/train.lock`` names the holder's process id and host.

A second ``lclsc train`` on a held workdir is refused with :class:`WorkdirLocked`. A lock left
by a process that no longer runs on this host (killed, machine rebooted) is taken over with a
notice; a lock held from another host cannot be checked and is refused, saying which file to
delete once that process is known to be gone. The lock is released when its ``with`` block
ends, by an error or Ctrl-C too. Standard library only (``data.storage`` loads its bucket
backends only when a URL is used), so it costs nothing to import.

A bucket workdir (``gs://``, ``s3://``) is locked the same way with a conditional put of the
lock object (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``: created only if absent), read
back to check that it is ours, for stores that ignore the condition. Taking over a stale lock
there is a delete and a new conditional put, not one atomic step.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from typing import Any, Iterator

from lclsc_jax.data import storage

LOCK_NAME = "train.lock"


class WorkdirLocked(ValueError):
    """Another live process holds the workdir's lock."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str]:
    """Hold ``workdir``'s lock for the ``with`` block (creating the folder); yields the lock file's path.

    A folder this call created is removed again on release if nothing but the lock was written
    to it, so a run that fails at start (bad data) leaves no workdir behind.
    """
    if storage.is_url(workdir):
        with _hold_url(workdir) as path:
            yield path
        return
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    me = _me()
    try:
        _acquire(path, me)
        yield path
    finally:
        _release(path, me)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(workdir)  # only succeeds if empty


def holder(workdir: str) -> dict[str, Any] | None:
    """The lock's content (``pid``, ``host``, ``since``), or None if the workdir is not locked."""
    return _read(storage.join(workdir, LOCK_NAME))


@contextlib.contextmanager
def _hold_url(workdir: str) -> Iterator[str]:
    """:func:`hold` for a bucket workdir: the lock object is created by a conditional put."""
    storage.check_bucket(workdir)
    path = storage.join(workdir, LOCK_NAME)
    me = _me()
    for _ in range(5):
        if storage.create_exclusive(path, json.dumps(me)) and _read(path) == me:
            break
        other = _read(path)
        if other is None:
            continue
        if _alive(other):
            raise WorkdirLocked(_held_message(workdir, other))
        print(f"lclsc: note: {workdir} was locked by process {other.get('pid')} on {other.get('host')}, which no "
              "longer runs; taking over its stale lock", file=sys.stderr, flush=True)
        storage.remove(path)
    else:
        raise WorkdirLocked(f"{workdir}: could not take the lock {path} (another process keeps creating it); "
                            "try again")
    try:
        yield path
    finally:
        if _read(path) == me:
            storage.remove(path)


def _me() -> dict[str, Any]:
    """This process's identity as written to a lock file."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _acquire(path: str, me: dict[str, Any]) -> None:
    """Create the lock file, taking over a stale one; raise :class:`WorkdirLocked` if it is held."""
    for _ in range(5):
        if _create(path, me):
            return
        other = _read(path)
        if other is None:
            continue  # released between our two looks
        if _alive(other):
            raise WorkdirLocked(_held_message(os.path.dirname(path), other))
        _take_over(path, other)
    raise WorkdirLocked(f"{os.path.dirname(path)}: could not take the lock {path} (another process keeps "
                        "creating it); try again")


def _create(path: str, me: dict[str, Any]) -> bool:
    """Atomically create ``path`` holding ``me`` (complete when it appears); False if it exists."""
    tmp = f"{path}.{me['pid']}.tmp"
    with open(tmp, "w") as f:
        json.dump(me, f)
    try:
        os.link(tmp, path)  # atomic, fails if the lock exists, and never shows a half-written file
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        return _create_exclusive(path, me)
    finally:
        os.remove(tmp)


def _create_exclusive(path: str, me: dict[str, Any]) -> bool:
    """``O_EXCL`` fallback of :func:`_create`."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


def _read(path: str) -> dict[str, Any] | None:
    """The lock file's content; None if it does not exist; a placeholder if it is unreadable."""
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": "?", "since": "?"}


def _alive(other: dict[str, Any]) -> bool:
    """Whether the lock's holder may still run (a holder on another host always may)."""
    pid = other.get("pid")
    if other.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    recorded = other.get("start")
    return recorded is None or _start_time(pid) in (None, recorded)  # a reused pid is another process


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _take_over(path: str, other: dict[str, Any]) -> None:
    """Remove a stale lock, with a notice on stderr (the caller then creates its own)."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != other:  # someone else's fresh lock replaced the stale one meanwhile: put it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
    else:
        print(f"lclsc: note: {os.path.dirname(path)} was locked by process {other.get('pid')} on "
              f"{other.get('host')}, which no longer runs; taking over its stale lock", file=sys.stderr, flush=True)
    os.remove(aside)


def _release(path: str, me: dict[str, Any]) -> None:
    """Remove the lock if it is still ours."""
    if _read(path) == me:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _held_message(workdir: str, other: dict[str, Any]) -> str:
    """The refusal: who holds the workdir, since when, and what to do."""
    where = other.get("host")
    local = where == socket.gethostname()
    hint = ("wait for it to finish or stop it" if local else
            f"wait for it to finish or stop it; if it no longer runs, delete {os.path.join(workdir, LOCK_NAME)}")
    return (f"{workdir} is in use by process {other.get('pid')} on host {where} (since {other.get('since')}); "
            f"{hint}, or train in another --workdir")
