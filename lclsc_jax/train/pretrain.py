"""``lclsc pretrain``: self-supervised (SimCLR, DINO) or supervised-contrastive pretraining of an encoder.

The loop mirrors :func:`lclsc_jax.train.loop.train` (same data, splits, checkpoints, resumption, lock and
error messages) with three differences: the host pipeline only decodes and batches (the views are drawn
on the device, :mod:`lclsc_jax.data.device_augment`); the state may be FSDP-sharded
(``train.fsdp``); and SIGTERM - how TPU and spot VMs announce a preemption - finishes the step, saves a
checkpoint and exits (:class:`Preempted`), so a rerun of the same command resumes from that step.
Labels are never read by SimCLR or DINO; where the data has them, a k-NN and a linear probe of the
encoder on the held-out (val) patients are logged at every ``train.eval_every`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from lclsc_jax import data
from lclsc_jax.data import io as data_io
from lclsc_jax.data import storage
from lclsc_jax.evaluate import probes
from lclsc_jax.train import lock
from lclsc_jax.train import predict as predict_lib
from lclsc_jax.train import pretrain_state as ps
from lclsc_jax.train import pretrain_steps as psteps
from lclsc_jax.train import sharding as shd
from lclsc_jax.train.checkpoint import Checkpointer
from lclsc_jax.train.config import Config, to_dict
from lclsc_jax.train.loop import (
    TrainingDiverged,
    TrainingInterrupted,
    _check_and_average,
    _check_same_data,
    _on_disk,
    load_dataset,
    make_splits,
    split_info,
    write_json,
)
from lclsc_jax.train.reporting import MetricWriter, Progress, log
from lclsc_jax.train.state import learning_rate, make_optimizer

#: Labels the probes cannot use: data without a label column is one class of this name.
UNLABELLED = data_io.UNLABELLED


class Preempted(KeyboardInterrupt):
    """SIGTERM during pretraining: the step finished and a checkpoint of it was saved; rerun to resume."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def preemption_flag() -> Iterator[threading.Event]:
    """While pretraining, SIGTERM sets the returned event (the loop saves and stops at the step's end)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass
class _Pretraining:
    """Everything the step loop reads and advances."""

    cfg: Config
    workdir: str
    model: Any
    mesh: jax.sharding.Mesh
    ds: Any
    splits: dict[str, np.ndarray]
    state: ps.PretrainState
    shardings: ps.PretrainState
    it: Any
    ckpt: Checkpointer
    step: int
    end: int
    writer: Any = None
    bar: Any = None
    last_probe: dict[str, float] = dataclasses.field(default_factory=dict)


def labelled(ds: Any) -> bool:
    """Whether the dataset has real labels (more than the one ``unlabelled`` class)."""
    return not (len(ds.class_names) == 1 and ds.class_names[0] == UNLABELLED) and ds.num_classes > 1


def check_objective(cfg: Config, ds: Any) -> None:
    """Raise ``ValueError`` when the objective cannot run on ``ds`` or the views (SupCon without labels, ...)."""
    p, v = cfg.pretrain, cfg.views
    if p.objective == "supcon" and not labelled(ds):
        raise ValueError("pretrain.objective=supcon needs labels, and this data has none (use simclr or dino)")
    if p.objective == "simclr" and (v.n_global != 2 or v.n_local):
        raise ValueError(f"pretrain.objective=simclr contrasts two views: set views.n_global=2 and views.n_local=0 "
                         f"(got {v.n_global} and {v.n_local})")
    if p.objective == "dino" and v.n_global < 2:
        raise ValueError("pretrain.objective=dino needs views.n_global >= 2 (the teacher's views)")
    if cfg.train.batch_size % p.grad_accum:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by pretrain.grad_accum="
                         f"{p.grad_accum}")


def pretrain(cfg: Config, workdir: str, *, num_devices: int | None = None, stop_after: int | None = None,
             progress: bool = True, dataset: Any = None) -> dict[str, Any]:
    """Pretrain (or resume) the run in ``workdir``; returns ``{"step", "probe", "workdir"}``.

    Frames come from the training patients of the config's patient-wise split (val patients are the
    probes' held-out set, test patients are never read). ``stop_after``: end after that many steps
    of this call (tests). Divergence and Ctrl-C raise as ``lclsc train`` does; SIGTERM saves and
    raises :class:`Preempted`.
    """
    holder = lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with preemption_flag() as preempted, holder:
        ds = dataset if dataset is not None else load_dataset(cfg)
        check_objective(cfg, ds)
        splits = make_splits(cfg, ds)
        info = split_info(ds, splits)
        _check_same_data(workdir, info)
        run = _build(cfg, workdir, ds, splits, num_devices, stop_after)
        try:
            write_json(storage.join(workdir, "config.json"), to_dict(cfg))
            write_json(storage.join(workdir, "splits.json"), info)
            ps.write_marker(workdir, cfg)
            run.writer = MetricWriter(workdir)
            run.bar = Progress(cfg.train.steps, run.step, cfg.train.batch_size, enabled=progress)
            _steps(run, preempted)
            run.ckpt.wait()
        except BaseException as e:
            _close(run, quiet=True)
            if isinstance(e, Preempted):
                raise
            if isinstance(e, KeyboardInterrupt):
                raise TrainingInterrupted(f"{str(e) or 'interrupted'} at step {run.step}; {_on_disk(workdir)} "
                                          f"(`lclsc pretrain --workdir {workdir}`)") from None
            raise
        _close(run, quiet=False)
    return {"step": run.step, "probe": run.last_probe, "workdir": workdir}


def _build(cfg: Config, workdir: str, ds: Any, splits: dict[str, np.ndarray], num_devices: int | None,
           stop_after: int | None) -> _Pretraining:
    """Mesh, model, state (fresh or restored from the latest checkpoint) and the data iterator."""
    mesh = shd.make_mesh(num_devices, fsdp=cfg.train.fsdp)
    shd.check_batch_size(cfg.train.batch_size, mesh)
    if (cfg.train.batch_size // cfg.pretrain.grad_accum) % shd.data_parallel_size(mesh):
        raise ValueError(f"a micro-batch of {cfg.train.batch_size // cfg.pretrain.grad_accum} frames does not split "
                         f"over the {shd.data_parallel_size(mesh)} devices: lower pretrain.grad_accum")
    model = ps.build_model(cfg)
    tx = make_optimizer(cfg)
    abstract, shardings = ps.abstract_state(cfg, model, tx, mesh)
    state = jax.jit(lambda key: ps.create_state(model, tx, cfg, key), out_shardings=shardings)(
        jax.random.PRNGKey(cfg.seed))
    it = data.train_iterator(ds, splits["train"], global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                             augment=dataclasses.replace(cfg.augment, enabled=False),
                             num_workers=cfg.data.num_workers)
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep_last=cfg.train.keep_last,
                        best_metric="probe_knn_accuracy" if labelled(ds) else None)
    start = ckpt.latest_step()
    try:
        if start is not None:
            state = ckpt.restore(start, abstract, it)
            log(f"resuming {workdir} from its checkpoint at step {start} (pretraining to step {cfg.train.steps})")
    except BaseException:
        ckpt.close(quiet=True)
        raise
    start = start or 0
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    return _Pretraining(cfg, workdir, model, mesh, ds, splits, state, shardings, it, ckpt, start, end)


def _steps(run: _Pretraining, preempted: threading.Event) -> None:
    """Advance from ``run.step`` to ``run.end``: step, log, probe, save; on SIGTERM save and raise ``Preempted``."""
    cfg, start = run.cfg, run.step
    tx = make_optimizer(cfg)
    step_fn = psteps.jit_pretrain_step(psteps.make_pretrain_step(run.model, tx, cfg), run.mesh, run.shardings)
    embed = psteps.make_embed_fn(run.model, cfg, run.mesh)
    pending: list[dict[str, jax.Array]] = []
    while run.step < run.end:
        batch = shd.to_global(next(run.it), run.mesh, psteps.PRETRAIN_KEYS)
        run.state, metrics = step_fn(run.state, batch)
        run.step += 1
        step = run.step
        pending.append(metrics)
        if step == start + 1:
            run.bar.reset_clock()
        is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.steps
        is_ckpt = step % cfg.train.checkpoint_every == 0 or step == run.end or is_eval
        if step % cfg.train.log_every == 0 or is_ckpt or preempted.is_set():
            try:
                host = _check_and_average(pending, step)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"pretraining diverged: {e}; {_on_disk(run.workdir)}", e.step) from None
            pending = []
            host["lr"] = learning_rate(cfg, step - 1)
            run.writer.write(step, host, "train")
            run.bar.update(step, host)
        probe = None
        if is_eval and not preempted.is_set() and labelled(run.ds) and len(run.splits.get("val", [])):
            probe = run.last_probe = probe_encoder(run, embed)
            run.writer.write(step, probe, "probe")
            run.bar.write(f"step {step}: probe " + " ".join(f"{k}={v:.4f}" for k, v in probe.items()))
            run.bar.reset_clock()
        stop = preempted.is_set()  # a SIGTERM during this step or its logging: save this step and stop
        if is_ckpt or stop:
            run.ckpt.save(step, run.state, run.it,
                          metrics={f"probe_{k}": v for k, v in probe.items()} if probe else None)
        if stop:
            run.ckpt.wait()
            raise Preempted(f"preempted (SIGTERM) at step {step}: saved a checkpoint of step {step}; the same "
                            f"command resumes from it (`lclsc pretrain --workdir {run.workdir}`)")


def embed_records(run: _Pretraining, embed: Any, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled encoder features ``(N, F)``, labels and patients of records ``indices`` (valid rows, in order)."""
    bs = predict_lib.eval_batch_size(run.cfg, run.mesh)
    variables = psteps.encoder_of(run.state, run.cfg)
    feats, labels, patients = [], [], []
    for batch in data.eval_batches(run.ds, indices, bs):
        f = embed(variables, shd.to_global(batch, run.mesh, ("image",))["image"])
        f = np.asarray(multihost_utils.process_allgather(f, tiled=True) if jax.process_count() > 1
                       else jax.device_get(f))
        valid = predict_lib.allgather_host(batch["valid"]).astype(bool)
        feats.append(f[valid])
        labels.append(predict_lib.allgather_host(batch["label"])[valid])
        patients.append(predict_lib.allgather_host(batch["patient"])[valid])
    return {"features": np.concatenate(feats), "label": np.concatenate(labels), "patient": np.concatenate(patients)}


def probe_subsample(train_indices: np.ndarray, max_train: int, seed: int) -> np.ndarray:
    """At most ``max_train`` of the training records, a fixed random subset (sorted)."""
    idx = np.asarray(train_indices)
    if len(idx) <= max_train:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))


def probe_encoder(run: _Pretraining, embed: Any) -> dict[str, float]:
    """k-NN and linear-probe accuracy of the encoder: fit on training patients, scored on the val patients."""
    p = run.cfg.pretrain
    train = embed_records(run, embed, probe_subsample(run.splits["train"], p.probe_max_train, run.cfg.seed))
    val = embed_records(run, embed, run.splits["val"])
    knn = probes.knn_accuracy(train["features"], train["label"], val["features"], val["label"],
                              num_classes=run.ds.num_classes, k=p.knn_k, temperature=p.knn_temperature)
    lin = probes.linear_probe(train["features"], train["label"], val["features"], val["label"],
                              train_groups=train["patient"])
    return {"knn_accuracy": float(knn), "linear_accuracy": float(lin["accuracy"]),
            "linear_balanced_accuracy": float(lin["balanced_accuracy"])}


def _close(run: _Pretraining, quiet: bool) -> None:
    """Close the progress bar, the writer and the checkpointer (waiting for its saves)."""
    for closer in (run.bar, run.writer):
        if closer is not None:
            with contextlib.suppress(Exception) if quiet else contextlib.nullcontext():
                closer.close()
    run.ckpt.close(quiet=quiet)
