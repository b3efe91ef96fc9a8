"""The training loop: data -> sharded steps -> checkpoints, resumable at any step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import accuracy_score, recall_score

from lclsc_jax import data, interop, models
from lclsc_jax.data import storage
from lclsc_jax.train import lock
from lclsc_jax.train import predict as predict_lib
from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as steps_lib
from lclsc_jax.train.checkpoint import Checkpointer, saved_steps
from lclsc_jax.train.config import (
    Config,
    brain_config,
    flatten,
    from_dict,
    input_shape,
    override,
    spatial_ndim,
    synthetic_config,
    to_dict,
    uses_gei,
)
from lclsc_jax.train.reporting import MetricWriter, Progress, log
from lclsc_jax.train.state import TrainState, create_state, learning_rate, make_optimizer, state_sharding


class TrainingStopped(RuntimeError):
    """Training stopped before its last step (it diverged, or a write failed); the message says what is on disk."""

    exit_code = 1  # ``lclsc`` prints the message as one line and exits with this code


class TrainingDiverged(TrainingStopped):
    """The loss or gradient became NaN/Inf at ``step``; nothing of the failing steps was saved."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training; the message says from which step the workdir resumes."""

    exit_code = 130  # 128 + SIGINT; ``lclsc`` exits with it


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a cluster's preemption or time limit) during :func:`train`: stops like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_stops_cleanly() -> Iterator[None]:
    """While training, SIGTERM raises :class:`Terminated` in the main thread (the handler before is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Pieces shared by train / evaluate / predict / explain
# ---------------------------------------------------------------------------------------------

def load_dataset(cfg: Config, source: str | None = None) -> Any:
    """The dataset a config names (or ``source`` instead of ``cfg.data.source``).

    ``source``: ``"synthetic"`` (built from the ``synthetic.*`` section), a folder
    ``ROOT/<class>/<patient>/<frame>`` or a CSV manifest (converted to ``data.image_size`` and
    ``data.channels``). Returns a ``lclsc_jax.data.Dataset`` (relabelled as a frame filter's with
    ``data.target=diagnostic``); bad input raises ``data.DataError`` naming the file (and CSV line).
    """
    d = cfg.data
    source = source or d.source
    # The synthetic and brain sections mean nothing for a user's folder or manifest.
    synthetic = synthetic_config(cfg) if source == "synthetic" else None
    volumes = spatial_ndim(cfg) == 3
    ds = data.load(source, image_size=d.image_size, channels=d.channels,
                   cache_dir=d.cache_dir or None, synthetic=synthetic,
                   allow_outside_root=d.allow_outside_root, labelled=d.labelled, volumes=True if volumes else None,
                   brain=brain_config(cfg) if source == "brain3d" else None,
                   spacing=(d.spacing or None) if volumes else None)
    if is_volumes(ds) and not volumes:
        raise data.DataError(f"{source} holds volumes, and model.arch={cfg.model.arch} takes 2D frames: set "
                             "model.arch to a 3D arch (tiny3d, resnet18_3d, resnet34_3d), e.g. --config tiny3d")
    return data.with_target(ds, d.target)


def is_volumes(ds: Any) -> bool:
    """Whether a ``data.Dataset`` holds volumes ``(S, S, S, C)`` rather than frames ``(S, S, C)``."""
    from lclsc_jax.data.volume_builders import VolumeRecordSource

    return isinstance(ds.source, VolumeRecordSource)


def make_splits(cfg: Config, ds: Any) -> dict[str, np.ndarray]:
    """Patient-wise train/val/test record indices, fixed by ``cfg.data.split_seed``.

    With ``data.label_fraction < 1`` the training split keeps the records of that fraction of its
    patients (``data.splits.label_subset``, drawn with ``cfg.seed``); val and test are unchanged.
    """
    d = cfg.data
    splits = data.splits_for(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.split_seed)
    if d.label_fraction < 1.0:
        from lclsc_jax.data.splits import label_subset

        splits = {**splits, "train": label_subset(ds.patients, ds.labels, splits["train"], d.label_fraction, cfg.seed)}
    return splits


def check_training_classes(ds: Any, splits: dict[str, np.ndarray], source: str | None = None) -> None:
    """Raise ``DataError`` if a class has no training record (e.g. a manifest ``split`` column put all its rows in val/test).

    ``ds``: a ``lclsc_jax.data.Dataset`` with ``labels (N,)``; ``splits``: record indices per split.
    For a CSV ``source`` the message names the manifest line of the class's first row.
    """
    labels = np.asarray(ds.labels)
    present = set(labels[np.asarray(splits["train"], np.int64)].tolist())
    missing = [c for c in range(len(ds.class_names)) if c not in present]
    if not missing:
        return
    c = missing[0]
    where = str(source or "the data")
    if source and str(source).lower().endswith(".csv") and os.path.isfile(source):
        _, records = data.read_manifest(source)
        first = int(np.flatnonzero(labels == c)[0])
        if len(records) == len(labels):
            where = records[first].where
    names = [ds.class_names[m] for m in missing]
    raise data.DataError(f"{where}: label '{ds.class_names[c]}' has no training rows: the split puts every patient "
                         f"of class(es) {names} in val/test, so the model could never predict them "
                         "(move a patient of each to 'train', or drop the class)")


def build_model(cfg: Config, num_classes: int) -> Any:
    """The Flax module a config names."""

    return models.create(cfg.model.arch, num_classes, head="gei" if uses_gei(cfg) else "linear",
                         embed_dim=cfg.model.embed_dim, in_channels=cfg.data.channels,
                         dtype=jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32,
                         remat=cfg.model.remat, projection_layers=cfg.model.projection_layers,
                         **({"drop_path_rate": cfg.model.drop_path_rate} if cfg.model.drop_path_rate else {}))


def init_state(cfg: Config, model: Any, num_classes: int, mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh train state from ``cfg.seed``, sharded by ``state_sharding`` (replicated unless ``train.fsdp > 1``)."""
    tx = make_optimizer(cfg)
    shape = input_shape(cfg)
    create = lambda key: create_state(model, tx, num_classes, cfg.model.embed_dim, shape, key)  # noqa: E731
    fn = jax.jit(create, out_shardings=state_sharding(jax.eval_shape(create, jax.random.PRNGKey(0)), mesh))
    return fn(jax.random.PRNGKey(cfg.seed))


def abstract_state(cfg: Config, model: Any, num_classes: int, mesh: jax.sharding.Mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, without allocating it (for restoring)."""
    tx = make_optimizer(cfg)
    shape = input_shape(cfg)
    shapes = jax.eval_shape(lambda key: create_state(model, tx, num_classes, cfg.model.embed_dim, shape, key),
                            jax.random.PRNGKey(0))
    return shd.with_shardings(shapes, state_sharding(shapes, mesh))


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically from process 0 only."""
    if jax.process_index() != 0:
        return
    storage.write_text(path, json.dumps(obj, indent=2, default=_json_default))  # a local path or a bucket URL


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


#: Keys a resumed run may change: how long it trains, how often it logs, evaluates and saves, and
#: the learning-rate schedule (to resume a run that diverged with other settings).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_last",
                  "train.eval_batch_size", "train.lr", "train.warmup_steps", "train.fsdp")

#: Settings a run that diverged must change before it resumes (training is deterministic).
DIVERGENCE_KEYS = ("train.lr", "train.warmup_steps")

#: Written by a run that diverged: the step and the :data:`DIVERGENCE_KEYS` it diverged with.
DIVERGED_FILE = "diverged.json"


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds at least one complete checkpoint."""
    return bool(saved_steps(os.path.join(workdir, "checkpoints")))


def resolve_config(workdir: str, cfg: Config | None, overrides: dict[str, Any] | None = None) -> Config:
    """The config of a run: the workdir's saved one when resuming, else ``cfg``; overrides applied.

    Resuming (``workdir/config.json`` exists, written once training started) accepts the command
    that started the run again (same ``cfg`` and overrides) or no ``cfg`` at all; either may
    change only :data:`RESUMABLE_KEYS` (e.g. a higher ``train.steps``, a lower ``train.lr``).
    Anything else (another data source, image size, model, loss, ...) is an error naming the
    differing keys. A workdir with a config but no checkpoint has nothing to resume: a given
    ``cfg`` replaces its config (with a notice).
    """

    path = storage.join(workdir, "config.json")
    if storage.exists(path) and cfg is not None and not has_checkpoint(workdir):
        log(f"{workdir} has a config but no checkpoint (a start that failed or stopped before its first "
            "save): starting it afresh with the config given")
    elif storage.exists(path):
        saved = from_dict(json.loads(storage.read_text(path)))
        _check_resumable(workdir, saved, cfg, overrides)
        cfg = saved
    cfg = cfg or Config()
    return override(cfg, overrides) if overrides else cfg


def _check_resumable(workdir: str, saved: Config, cfg: Config | None, overrides: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` naming the keys outside :data:`RESUMABLE_KEYS` that differ from the saved run."""

    given = cfg if cfg is not None else saved
    given = override(given, overrides) if overrides else given
    a, b = flatten(saved), flatten(given)
    diff = sorted(k for k in a if a[k] != b[k] and k not in RESUMABLE_KEYS)
    if diff:
        shown = ", ".join(f"{k}: {a[k]!r} -> {b[k]!r}" for k in diff[:6]) + (" ..." if len(diff) > 6 else "")
        raise ValueError(f"{workdir} holds a run with a different config ({shown}); resume it with the command "
                         "that started it (only " + ", ".join(RESUMABLE_KEYS) + " may change) or without "
                         "--config, or pick a new --workdir")


def _refuse_repeated_divergence(workdir: str, cfg: Config) -> None:
    """Raise ``ValueError`` if the run diverged before with the same :data:`DIVERGENCE_KEYS` (it would again)."""

    path = storage.join(workdir, DIVERGED_FILE)
    if not storage.exists(path):
        return
    diverged = json.loads(storage.read_text(path))
    flat = flatten(cfg)
    if any(flat[k] != v for k, v in diverged.get("settings", {}).items()):
        return
    settings = " ".join(f"{k}={v}" for k, v in diverged.get("settings", {}).items())
    raise ValueError(f"{workdir}: this run diverged at step {diverged.get('step')} with {settings} and would "
                     f"diverge again; resume with other settings, e.g. {_resume_hint(workdir, cfg)}, "
                     f"or delete {path} to retry as is")


def _resume_hint(workdir: str, cfg: Config) -> str:
    """A command that resumes ``workdir`` with a ten times lower learning rate."""
    return f"`lclsc train --workdir {workdir} --set train.lr={cfg.train.lr / 10:g}`"


def _on_disk(workdir: str) -> str:
    """What a rerun of ``workdir`` starts from, truthfully."""
    steps = saved_steps(os.path.join(workdir, "checkpoints"))
    if not steps:
        return "no checkpoint has been saved yet, so a rerun starts from step 0"
    return f"the latest checkpoint, step {steps[-1]}, is intact and a rerun resumes from it"


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Run:
    """Everything the step loop reads and advances."""

    cfg: Config
    workdir: str
    model: Any
    mesh: jax.sharding.Mesh
    ds: Any
    splits: dict[str, np.ndarray]
    state: TrainState
    train_it: Any
    ckpt: Checkpointer
    step: int
    end: int
    start: int = 0
    writer: Any = None
    bar: Any = None
    last_val: dict[str, float] = dataclasses.field(default_factory=dict)


def train(cfg: Config, workdir: str, *, init_from: str | None = None, num_devices: int | None = None,
          stop_after: int | None = None, progress: bool = True,
          splits: dict[str, np.ndarray] | None = None, dataset: Any = None) -> dict[str, Any]:
    """Train (or resume) the run in ``workdir``; returns a summary with final step and metrics.

    ``splits`` (record indices per ``train``/``val``/``test``) replaces the config's fixed
    patient-wise split, e.g. for a cross-validation fold; ``dataset`` skips re-loading the data.
    ``stop_after`` ends the loop after that many steps of this call (tests of resumption).
    The workdir is locked for the call (:mod:`lclsc_jax.train.lock`); ``config.json`` is written
    only once the data loaded and the state is built. Divergence, a failed write and Ctrl-C (or
    SIGTERM, e.g. a cluster's preemption) raise :class:`TrainingDiverged`, :class:`TrainingStopped`
    and :class:`TrainingInterrupted`, whose messages say what is on disk and how to resume.
    """
    with _sigterm_stops_cleanly(), lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        _refuse_repeated_divergence(workdir, cfg)
        ds, splits, info = _prepare_data(cfg, workdir, dataset, splits)
        run = _build(cfg, workdir, ds, splits, init_from, num_devices, stop_after)
        _run_to_end(run, progress, info)
    return {"step": run.step, "val": run.last_val, "workdir": workdir}


def _prepare_data(cfg: Config, workdir: str, dataset: Any,
                  splits: dict[str, np.ndarray] | None) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Load and split the data; raise if it differs from the data the run in ``workdir`` started on."""
    ds = dataset if dataset is not None else load_dataset(cfg)
    if splits is None:
        splits = make_splits(cfg, ds)
        check_training_classes(ds, splits, cfg.data.source)
    else:
        data.check_disjoint(ds.patients, splits)
    info = split_info(ds, splits)
    _check_same_data(workdir, info)
    return ds, splits, info


def split_info(ds: Any, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """What ``splits.json`` records of a run's data: record indices, class names, patients and counts per split."""
    return {"indices": {k: np.asarray(v).tolist() for k, v in splits.items()},
            "class_names": list(ds.class_names),
            "patients": {k: sorted(set(map(str, ds.patients[v]))) for k, v in splits.items()},
            "counts": {k: int(len(v)) for k, v in splits.items()}}


def _build(cfg: Config, workdir: str, ds: Any, splits: dict[str, np.ndarray], init_from: str | None,
           num_devices: int | None, stop_after: int | None) -> _Run:
    """Mesh, model, state (fresh, from ``init_from``, or restored from the latest checkpoint) and data iterator."""
    mesh = shd.make_mesh(num_devices, fsdp=cfg.train.fsdp)
    shd.check_batch_size(cfg.train.batch_size, mesh)
    model = build_model(cfg, ds.num_classes)
    state = init_state(cfg, model, ds.num_classes, mesh)
    if init_from and not has_checkpoint(workdir):  # before any checkpoint folder: a bad file leaves no run
        state = _init_backbone(cfg, state, init_from, mesh)
    train_it = data.train_iterator(
        ds, splits["train"], global_batch_size=cfg.train.batch_size, seed=cfg.seed,
        augment=cfg.augment,
        num_workers=cfg.data.num_workers)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=cfg.train.keep_last,
                        best_metric=f"val_{cfg.train.best_metric}")
    start = ckpt.latest_step()
    try:
        if start is not None:
            state = ckpt.restore(start, abstract_state(cfg, model, ds.num_classes, mesh), train_it)
            log(f"resuming {workdir} from its checkpoint at step {start} (training to step {cfg.train.steps})")
    except BaseException:
        ckpt.close(quiet=True)
        raise
    start = start or 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    return _Run(cfg, workdir, model, mesh, ds, splits, state, train_it, ckpt, start, end, start)


def _init_backbone(cfg: Config, state: TrainState, init_from: str, mesh: jax.sharding.Mesh) -> TrainState:
    """``state`` with its backbone loaded from PyTorch weights or a pretraining run's encoder (the heads stay fresh)."""
    from lclsc_jax.train import pretrain_state

    if pretrain_state.is_pretrain_run(init_from):
        variables, report = pretrain_state.init_from_run(shd.to_host(state.variables), init_from, cfg)
    else:
        variables, report = interop.init_backbone_from(shd.to_host(state.variables), init_from, cfg.model.arch,
                                                        return_report=True)
    state = jax.device_put(state.replace(params=variables["params"], batch_stats=variables.get("batch_stats", {})),
                           shd.shardings_of(state))
    log(f"initialised backbone from {init_from}: {report}")
    return state


def _record_start(run: _Run, split_info: dict[str, Any]) -> None:
    """Training starts: write the run's config and splits; forget an earlier divergence (other settings now)."""
    write_json(os.path.join(run.workdir, "config.json"), to_dict(run.cfg))
    write_json(os.path.join(run.workdir, "splits.json"), split_info)
    if jax.process_index() == 0:
        storage.remove(storage.join(run.workdir, DIVERGED_FILE))  # no error when absent


def _run_to_end(run: _Run, progress: bool, split_info: dict[str, Any]) -> None:
    """Record the start, run the steps, close; a stop (divergence, failed write, Ctrl-C) is re-raised explained."""
    try:
        _record_start(run, split_info)
        run.writer = MetricWriter(run.workdir)
        run.bar = Progress(run.cfg.train.steps, run.step, run.cfg.train.batch_size, enabled=progress)
        _run_steps(run)
        run.ckpt.wait()  # a failed last save surfaces here
    except BaseException as e:
        _close(run, quiet=True)
        if isinstance(e, (TrainingDiverged, KeyboardInterrupt, OSError)):
            raise _explained(e, run) from None
        raise
    _close(run, quiet=False)


def _run_steps(run: _Run) -> None:
    """Advance ``run`` from ``run.step`` to ``run.end``: train, log, validate, save."""
    cfg, start = run.cfg, run.step
    tx = make_optimizer(cfg)
    placed = shd.shardings_of(run.state)
    train_step = steps_lib.jit_train_step(steps_lib.make_train_step(run.model, tx, cfg), run.mesh,
                                          state_sharding=placed)
    eval_step = steps_lib.jit_eval_step(steps_lib.make_eval_step(run.model, cfg), run.mesh, placed)
    pending: list[dict[str, jax.Array]] = []
    while run.step < run.end:
        batch = shd.to_global(next(run.train_it), run.mesh, steps_lib.TRAIN_KEYS)
        run.state, metrics = train_step(run.state, batch)
        run.step += 1
        step = run.step
        pending.append(metrics)
        if step == start + 1:
            run.bar.reset_clock()  # exclude compilation from img/s
        is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
        is_ckpt = step % cfg.train.checkpoint_every == 0 or step == run.end or is_eval
        if step % cfg.train.log_every == 0 or is_ckpt:
            host = _check_and_average(pending, step)
            pending = []
            host["lr"] = learning_rate(cfg, step - 1)
            run.writer.write(step, host, "train")
            run.bar.update(step, host)
        if is_eval and "val" in run.splits and len(run.splits["val"]):
            run.last_val = _validate(cfg, run.model, run.state, run.mesh, run.ds, run.splits["val"], eval_step)
            run.writer.write(step, run.last_val, "val")
            run.bar.write(f"step {step}: val " + " ".join(f"{k}={v:.4f}" for k, v in run.last_val.items()))
            run.bar.reset_clock()
        if is_ckpt:
            run.ckpt.save(step, run.state, run.train_it,
                          metrics={f"val_{k}": v for k, v in run.last_val.items()} if is_eval and run.last_val
                          else None)


def _close(run: _Run, quiet: bool) -> None:
    """Close the progress bar, the metric writer and the checkpointer (waiting for its saves)."""
    for closer in (run.bar, run.writer):
        if closer is not None:
            with contextlib.suppress(Exception) if quiet else contextlib.nullcontext():
                closer.close()
    run.ckpt.close(quiet=quiet)


def _explained(e: BaseException, run: _Run) -> BaseException:
    """The exception to show for a stopped run: what happened at which step, what is on disk, how to go on."""
    workdir, on_disk = run.workdir, _on_disk(run.workdir)
    if isinstance(e, TrainingDiverged):
        return _diverged(e, run, on_disk)
    if isinstance(e, KeyboardInterrupt):
        stopped = TrainingInterrupted(f"{str(e) or 'interrupted'} at step {run.step}; {on_disk} "
                                      f"(`lclsc train --workdir {workdir}`)")
        stopped.exit_code = getattr(e, "exit_code", TrainingInterrupted.exit_code)
        return stopped
    what = f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)
    return TrainingStopped(f"could not write the run at step {run.step} ({what}); {on_disk}: free space or "
                           f"make {workdir} writable, then `lclsc train --workdir {workdir}` goes on")


def _diverged(e: TrainingDiverged, run: _Run, on_disk: str) -> TrainingDiverged:
    """Record the divergence in ``diverged.json`` and say how to resume with other settings."""

    flat = flatten(run.cfg)
    settings = {k: flat[k] for k in DIVERGENCE_KEYS}
    write_json(os.path.join(run.workdir, DIVERGED_FILE), {"step": e.step, "settings": settings})
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    steps = saved_steps(os.path.join(run.workdir, "checkpoints"))
    if steps and steps[-1] > run.start:  # its weights already come from steps with these settings
        on_disk += (" (it was saved by this call, with these settings: if resuming from it diverges too, "
                    "start afresh in a new --workdir)")
    return TrainingDiverged(
        f"training diverged: the loss or gradient became NaN/Inf at step {e.step} (with {shown}); nothing of "
        f"the failing steps was saved, {on_disk}. Resume with other settings, e.g. "
        f"{_resume_hint(run.workdir, run.cfg)} (the resumable keys: {', '.join(RESUMABLE_KEYS)}), "
        "or check the data for constant or corrupt images", e.step)


def _check_same_data(workdir: str, split_info: dict[str, Any]) -> None:
    """On resume, raise if the data's classes or patient-wise split differ from the run's ``splits.json``.

    A folder or manifest edited between two calls (frames or patients added, labels changed)
    would otherwise continue the run on another split, possibly with test patients in training.
    """
    path = storage.join(workdir, "splits.json")
    if not (storage.exists(path) and has_checkpoint(workdir)):
        return
    saved = json.loads(storage.read_text(path))
    for key in ("class_names", "patients", "indices"):
        if key in saved and saved[key] != json.loads(json.dumps(split_info[key])):
            raise ValueError(f"{workdir}: the data changed since this run started ({key} differ from its "
                             "splits.json); restore the data, or train the new data in a new --workdir")


def _check_and_average(pending: list[dict[str, jax.Array]], step: int) -> dict[str, float]:
    """Fetch the pending step metrics, stop on NaN/Inf (naming the first such step), average them."""
    host = jax.device_get(pending)
    bad = [i for i, m in enumerate(host) if m["nonfinite"]]
    if bad:
        first = step - len(host) + bad[0] + 1
        raise TrainingDiverged(f"loss or gradient became NaN/Inf at step {first} ({len(bad)} of the last "
                               f"{len(host)} steps, up to step {step}); stopped without saving", first)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}


def _validate(cfg: Config, model: Any, state: TrainState, mesh: jax.sharding.Mesh, ds: Any,
              indices: np.ndarray, eval_step: Any) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean recall over the classes present) of ``state`` on records ``indices``."""
    res = predict_lib.predict_batches(cfg, model, state, mesh,
                                      data.eval_batches(ds, indices, predict_lib.eval_batch_size(cfg, mesh)), eval_step)
    pred, y = res["probs"].argmax(-1), res["label"]
    balanced = recall_score(y, pred, labels=np.unique(y), average="macro")
    return {"accuracy": float(accuracy_score(y, pred)), "balanced_accuracy": float(balanced)}


