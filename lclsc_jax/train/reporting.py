"""Run logging: a progress bar on terminals, plain lines otherwise, JSON lines and TensorBoard.

In a bucket workdir (``gs://``, ``s3://``), where objects cannot be appended to, the metric files
are written to a local folder (the run's earlier ``metrics.jsonl`` fetched first) and uploaded
whole every ``sync_every`` seconds and on close.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from lclsc_jax.data import storage


def log(msg: str, enabled: bool = True) -> None:
    """Print one progress line on stdout (process 0 only; ``enabled=False`` is silent)."""
    if enabled and jax.process_index() == 0:
        print(msg, flush=True)


class MetricWriter:
    """Append metrics to ``WORKDIR/metrics.jsonl`` and TensorBoard event files (process 0 only).

    ``WORKDIR`` may be a bucket URL: then the files are uploaded every ``sync_every`` seconds and on close.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, sync_every: float = 30.0):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        self._remote = None
        self.sync_every = sync_every
        if not self.enabled:
            return
        local = workdir
        if storage.is_url(workdir):
            self._remote, local = workdir, tempfile.mkdtemp(prefix="lclsc-metrics-")
            earlier = storage.join(workdir, "metrics.jsonl")
            if storage.exists(earlier):
                with open(os.path.join(local, "metrics.jsonl"), "w") as f:
                    f.write(storage.read_text(earlier))
        os.makedirs(local, exist_ok=True)
        self._local = local
        self._file = open(os.path.join(local, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:  # in a bucket, a suffix keeps two calls within a second from uploading one file name
            suffix = f".{uuid.uuid4().hex[:8]}" if self._remote else ""
            self._tb = SummaryWriter(os.path.join(local, "tb"), filename_suffix=suffix)
        self._synced = time.monotonic()

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Record scalar ``metrics`` at ``step`` under ``prefix``."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
        self._file.write(json.dumps({"step": int(step), "split": prefix, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
        if self._remote is not None and time.monotonic() - self._synced >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        """Upload ``metrics.jsonl`` and the TensorBoard files to a bucket workdir (no-op for a local one)."""
        if self._remote is None:
            return
        if self._file and not self._file.closed:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        storage.upload_tree(self._remote, self._local)
        self._synced = time.monotonic()

    def close(self) -> None:
        """Flush and close (a bucket workdir: upload, then remove the local copy)."""
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._remote is not None:
            try:
                self.sync()
            finally:
                shutil.rmtree(self._local, ignore_errors=True)
                self._remote = None


def _is_scalar(v: Any) -> bool:
    try:
        return float(v) is not None and getattr(v, "ndim", 0) == 0
    except (TypeError, ValueError):
        return False


class Progress:
    """Steps, loss, img/s and ETA: a tqdm bar on a TTY, a plain line per update otherwise."""

    def __init__(self, total: int, start: int = 0, batch_size: int = 1, stream=None, enabled: bool = True):
        self.total, self.step, self.batch_size = total, start, batch_size
        self.stream = stream or sys.stderr
        self.enabled = enabled and jax.process_index() == 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._t0, self._s0 = time.perf_counter(), start
        self._bar = None
        if self.enabled and self.tty:
            self._bar = tqdm(total=total, initial=start, file=self.stream, unit="step", dynamic_ncols=True)

    def rate(self) -> float:
        """Images per second since the last call to :meth:`reset_clock` (or the start)."""
        dt = time.perf_counter() - self._t0
        return (self.step - self._s0) * self.batch_size / dt if dt > 0 else 0.0

    def reset_clock(self) -> None:
        """Start a new throughput window (e.g. after compilation or evaluation)."""
        self._t0, self._s0 = time.perf_counter(), self.step

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Advance to ``step`` and show ``metrics``."""
        prev, self.step = self.step, step
        if not self.enabled:
            return
        ips = self.rate()
        eta = (self.total - step) * self.batch_size / ips if ips > 0 else float("nan")
        shown = {k: metrics[k] for k in ("loss", "accuracy") if k in metrics}
        if self._bar is not None:
            self._bar.update(step - prev)
            self._bar.set_postfix({**{k: f"{v:.4f}" for k, v in shown.items()}, "img/s": f"{ips:.0f}"})
        else:
            parts = " ".join(f"{k}={v:.4f}" for k, v in shown.items())
            print(f"step {step}/{self.total} {parts} img/s={ips:.1f} eta={_fmt_eta(eta)}",
                  file=self.stream, flush=True)

    def write(self, msg: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
