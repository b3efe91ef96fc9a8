"""All checkpoint code: an Orbax ``CheckpointManager`` holding the train state and the data iterator.

Layout: ``WORKDIR/checkpoints/<step>/{state,data_iter}``. Kept: the last ``keep_last`` and the
best by a validation metric. Saves are asynchronous; :meth:`Checkpointer.close` waits for them.
A save that fails for lack of space or permission raises ``OSError`` (Orbax's TensorStore
reports it as a ``ValueError`` carrying ``os_error_code``), whichever call notices it.

Buckets. ``gs://`` goes to Orbax natively (TensorStore's ``gcs`` driver; a step is complete
once its ``commit_success.txt`` exists). ``s3://`` cannot: Orbax 0.12.8 builds a TensorStore
kvstore only for ``gs://`` and local paths (an ``s3://`` path fails its "Checkpoint path should
be absolute" check), although TensorStore's ``s3`` driver itself works (with ``endpoint`` in its
spec). So for ``s3://`` Orbax writes to a local staging folder (``$LCLSC_STAGING_DIR`` or the
system's temporary folder, removed on close) and each finished step is uploaded before the
next save starts (or on :meth:`Checkpointer.wait` / :meth:`Checkpointer.close`), its
``commit_success.txt`` last, so a half-uploaded step never counts; steps the keep policy drops
are deleted from the bucket after the new one is up. Opening a staged checkpointer fetches the
steps' metadata (not their arrays); :meth:`Checkpointer.restore` fetches the step it restores.
Staging is for one process: a multi-host run checkpoints to ``gs://`` or a shared filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import weakref
from types import TracebackType
from typing import Any, Callable, Iterator

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from lclsc_jax.data import storage

#: Orbax's marker of a finished step (its own on ``gs://``; ours, uploaded last, on ``s3://``).
COMMIT_FILE = "commit_success.txt"

#: Bucket schemes whose checkpoints are staged on local disk (Orbax cannot write them natively).
STAGED_SCHEMES = ("s3://",)


class _DropNoMetricsWarning(logging.Filter):
    """Checkpoints between validations carry no metrics by design; Orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in str(record.msg)


class _DropReRaisedSaveErrors(logging.Filter):
    """Orbax logs a failed background save with a traceback per thread, then re-raises it in the caller."""

    _RERAISED = ("raised an exception", "Failed to run", "Save Finalize thread")

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("orbax" in record.pathname and any(p in str(record.msg) for p in self._RERAISED))


logging.getLogger("absl").addFilter(_DropNoMetricsWarning())
logging.getLogger("absl").addFilter(_DropReRaisedSaveErrors())


def _quiet_late_write_callbacks(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``sys.excepthook`` without the dozens of tracebacks TensorStore prints after a failed save.

    When one write fails (a full disk), Orbax closes its event loop while TensorStore still
    completes the other writes, and each completion callback prints "Event loop is closed". The
    failure itself is raised in the caller; these late callbacks carry nothing more.
    """
    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> Any:
        late = kind is RuntimeError and str(value) == "Event loop is closed" and "call_soon_threadsafe" in _frames(tb)
        return None if late else hook(kind, value, tb)
    return excepthook


def _frames(tb: TracebackType | None) -> list[str]:
    """The function names along a traceback."""
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


sys.excepthook = _quiet_late_write_callbacks(sys.excepthook)


def saved_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (Orbax renames a step's folder when done).

    In a bucket, a step is complete once its ``commit_success.txt`` exists.
    """
    if storage.is_url(directory):
        return sorted(int(n) for n in storage.listdir(directory)
                      if n.isdigit() and storage.exists(storage.join(directory, n, COMMIT_FILE)))
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _is_array_data(relative: str) -> bool:
    """Whether a file of a step (path relative to it) holds array data (TensorStore/OCDBT ``d/`` files)."""
    return "d" in relative.split("/")[:-1]


@contextlib.contextmanager
def _os_errors(directory: str) -> Iterator[None]:
    """Re-raise a write failure reported by TensorStore (``ValueError ... [os_error_code='28']``) as ``OSError``."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - only OS-level failures are translated, the rest re-raised
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, f"{os.strerror(n)} (writing a checkpoint)", directory) from None


class Checkpointer:
    """Save / restore ``(state, data iterator)`` pairs in ``directory``."""

    def __init__(self, directory: str, keep_last: int = 2, best_metric: str | None = "accuracy",
                 best_mode: str = "max", async_save: bool = True):
        policies: list[Any] = [ocm.LatestN(n=keep_last)]
        if best_metric:
            policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                      n=1, keep_checkpoints_without_metrics=False))
        self.best_metric = best_metric
        # best_fn makes Orbax store the metrics with each checkpoint and rank them in best_step();
        # without it best_step() silently returned the latest step.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
            enable_async_checkpointing=async_save, create=True)
        self.directory = storage.absolute(directory)
        self.remote: str | None = None  # the bucket folder of a staged (s3://) checkpointer
        local = self.directory
        if storage.is_url(directory):
            storage.check_bucket(directory)
        if self.directory.startswith(STAGED_SCHEMES):
            local = self._stage(self.directory)
        self.manager = ocp.CheckpointManager(local, options=options, item_names=("state", "data_iter"))

    def _stage(self, remote: str) -> str:
        """Make a local staging folder for ``remote`` holding its complete steps' metadata; returns its path."""
        if jax.process_count() > 1:
            raise ValueError(f"{remote}: s3:// checkpoints are staged on one machine's disk and cannot be written "
                             "by a multi-host run; use a gs:// workdir or a shared filesystem")
        self.remote = remote.rstrip("/")
        staging = tempfile.mkdtemp(prefix="lclsc-ckpt-", dir=os.environ.get("LCLSC_STAGING_DIR") or None)
        self._cleanup = weakref.finalize(self, shutil.rmtree, staging, True)
        self._uploaded = set(saved_steps(self.remote))
        for step in self._uploaded:
            storage.download_tree(storage.join(self.remote, str(step)), os.path.join(staging, str(step)),
                                  keep=lambda rel: not _is_array_data(rel))
        self._staging = staging
        return staging

    def _push(self) -> None:
        """Staged: wait for Orbax, upload its new complete steps (marker last), delete those it dropped."""
        if self.remote is None:
            return
        with _os_errors(self.directory):
            self.manager.wait_until_finished()
        local = set(saved_steps(self._staging))
        for step in sorted(local - self._uploaded):
            url, folder = storage.join(self.remote, str(step)), os.path.join(self._staging, str(step))
            storage.remove_tree(url)  # the remains of an upload that was cut off
            storage.upload_tree(url, folder, last=(COMMIT_FILE,))
            if not os.path.exists(os.path.join(folder, COMMIT_FILE)):
                storage.write_text(storage.join(url, COMMIT_FILE), f"Checkpoint step {step} uploaded")
            self._uploaded.add(step)
        for step in sorted(self._uploaded - local):
            url = storage.join(self.remote, str(step))
            storage.remove(storage.join(url, COMMIT_FILE))  # incomplete first, then gone
            storage.remove_tree(url)
            self._uploaded.discard(step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step of the best checkpoint by the metric (falls back to the latest)."""
        try:
            best = self.manager.best_step()
        except Exception:  # noqa: BLE001 - no metrics recorded yet
            best = None
        return best if best is not None else self.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None = None,
             metrics: dict[str, float] | None = None) -> None:
        """Save ``state`` (and the iterator's position) at ``step``; asynchronous."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._push()  # staged: the previous save is finished by now; upload it before the next starts
        with _os_errors(self.directory):
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restore the state at ``step`` into ``abstract_state``'s shapes and shardings.

        When ``data_iter`` is given, its position is restored in place too.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        if self.remote is not None and step in self._uploaded:
            storage.download_tree(storage.join(self.remote, str(step)), os.path.join(self._staging, str(step)))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (staged: uploaded to the bucket)."""
        with _os_errors(self.directory):
            self.manager.wait_until_finished()
        self._push()

    def close(self, quiet: bool = False) -> None:
        """Wait for pending saves and release resources; ``quiet``: ignore a failed save (already failing)."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001
            if not quiet:
                raise
        try:
            with contextlib.suppress(Exception) if quiet else contextlib.nullcontext():
                self.manager.close()
        finally:
            if self.remote is not None:
                self._cleanup()


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
    """``ShapeDtypeStruct`` tree of ``state`` (arrays or shapes) carrying ``sharding``."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
