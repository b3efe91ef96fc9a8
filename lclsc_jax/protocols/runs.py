"""A trained run: restore its state and splits, predict (the one path of every protocol), evaluate a split."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from lclsc_jax import data, evaluate
from lclsc_jax.data import storage
from lclsc_jax.evaluate import plots
from lclsc_jax.train import loop
from lclsc_jax.train import predict as predict_lib
from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as steps_lib
from lclsc_jax.train.checkpoint import Checkpointer
from lclsc_jax.train.config import Config, from_dict, uses_gei
from lclsc_jax.train.state import TrainState

#: Where ``lclsc relevance train`` keeps a run's perturbation generator, inside its workdir.
GENERATOR_FOLDER = "relevance"


@dataclasses.dataclass
class TrainedRun:
    """A restored run: its config, class names, model, state (on ``mesh``, FSDP-sharded as trained) and step."""

    cfg: Config
    class_names: tuple[str, ...]
    model: Any
    state: TrainState
    mesh: jax.sharding.Mesh
    step: int
    workdir: str

    @functools.cached_property
    def eval_step(self) -> Any:
        """The run's compiled eval step (one trace per run, however many ``predict`` calls)."""
        return steps_lib.jit_eval_step(steps_lib.make_eval_step(self.model, self.cfg), self.mesh,
                                       shd.shardings_of(self.state))

    @property
    def variables(self) -> dict[str, Any]:
        """Model variables for ``model.apply``."""
        return self.state.variables

    @property
    def global_emb(self) -> jax.Array | None:
        """The EMA class embeddings ``(C, D)``, or None for a linear-head (``ce``) run."""
        return self.state.global_emb if uses_gei(self.cfg) else None

    def saliency_options(self, method: str) -> dict[str, Any]:
        """Options of ``explain.saliency(method, ...)`` that make the maps the run's own.

        ``sc``: the run's ``loss.sc_maps``; ``perturbation_generator``: the run's trained generator
        (``lclsc relevance train``, in ``WORKDIR/relevance``).
        """
        if method == "sc":
            return {"maps": self.cfg.loss.sc_maps}
        if method == "perturbation_generator":
            return self.generator_options
        return {}

    @functools.cached_property
    def generator_options(self) -> dict[str, Any]:
        """The ``perturbation_generator`` options of this run: its generator module, variables and supervoxels."""
        return generator_options(self.workdir)


def generator_options(workdir: str) -> dict[str, Any]:
    """Options of ``explain.saliency("perturbation_generator", ...)`` for the generator trained for ``workdir``."""
    from lclsc_jax.train import relevance as rel_train

    out_dir = storage.join(workdir, GENERATOR_FOLDER)
    if not storage.exists(storage.join(out_dir, rel_train.CONFIG_FILE)):
        raise FileNotFoundError(f"{workdir} has no perturbation generator: run `lclsc relevance train "
                                f"--workdir {workdir}` first")
    module, variables, config = rel_train.restore_generator(out_dir)
    return {"generator": module, "generator_variables": variables,
            "n_segments": int(config["generator"].get("n_segments", 0))}


def load_run(workdir: str, which: str = "best", num_devices: int | None = None) -> TrainedRun:
    """Restore the ``best`` (by validation metric), ``latest`` or a numbered checkpoint of a run."""
    cfg_path = storage.join(workdir, "config.json")
    splits_path = storage.join(workdir, "splits.json")
    if not (storage.exists(cfg_path) and storage.exists(splits_path)):
        raise FileNotFoundError(f"{workdir} is not a training workdir (no config.json/splits.json); "
                                "run `lclsc train --workdir` first")
    cfg = from_dict(json.loads(storage.read_text(cfg_path)))
    class_names = tuple(json.loads(storage.read_text(splits_path))["class_names"])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep_last=cfg.train.keep_last,
                        best_metric=f"val_{cfg.train.best_metric}")
    try:
        step = {"best": ckpt.best_step, "latest": ckpt.latest_step}.get(which, lambda: int(which))()
        if step is None:
            raise FileNotFoundError(f"{workdir} has no checkpoint yet")
        mesh = shd.make_mesh(num_devices, fsdp=eval_fsdp(cfg, num_devices))
        model = loop.build_model(cfg, len(class_names))
        state = ckpt.restore(step, loop.abstract_state(cfg, model, len(class_names), mesh))
    finally:
        ckpt.close()
    return TrainedRun(cfg, class_names, model, state, mesh, int(step), workdir)


def eval_fsdp(cfg: Config, num_devices: int | None = None) -> int:
    """The run's ``train.fsdp`` when it divides the devices here, else 1 (a checkpoint restores into either)."""
    n = num_devices or jax.device_count()
    return cfg.train.fsdp if n % cfg.train.fsdp == 0 else 1


def evaluate_run(workdir: str, source: str | None = None, split: str | None = None, which: str = "best",
                 out_dir: str | None = None, figures: bool = True, n_boot: int = 1000) -> dict[str, Any]:
    """Evaluate a run on a split of its data, or on another ``source``; writes ``eval/metrics.json``.

    Without ``source`` (or with the run's own ``data.source``), ``split`` (default ``test``) is
    ``train``/``val``/``test`` of the patient-wise split the run trained with, or ``all``.
    Another ``source`` (a folder or CSV manifest of new patients) is scored whole by default
    (``split="all"``; ``train``/``val``/``test`` draw a fresh patient-wise split of it). Its
    classes must be among the run's (a subset is fine); a label the run does not know is a
    ``DataError`` naming the CSV line (or the class folder). Returns the metrics dict
    (``classification_metrics`` plus ``split``, ``n``, ``checkpoint_step``, ``source``, and with
    ``n_boot > 0`` ``intervals``: 95% patient-bootstrap intervals of accuracy, balanced accuracy,
    macro F1 and AUROC, ``evaluate.statistics.metric_intervals``).
    """
    run = load_run(workdir, which)
    own = source is None or same_source(source, run.cfg.data.source)
    if not own:
        check_known_labels(source, run.class_names)
    ds = loop.load_dataset(run.cfg, None if own else source)
    to_run = label_map(ds.class_names, run.class_names)
    split = split or ("test" if own else "all")
    if split == "all":
        indices = np.arange(len(ds.labels))
    else:
        splits = run_splits(workdir, run.cfg, ds) if own else loop.make_splits(run.cfg, ds)
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; choose from {sorted(splits)} or 'all'")
        indices = splits[split]
    if len(indices) == 0:
        raise ValueError(f"split {split!r} of {source or run.cfg.data.source} has no images")
    res = predict(run, ds, indices)
    res["label"] = to_run[np.asarray(res["label"], np.int64)]
    metrics = evaluate.classification_metrics(res["label"], res["probs"], class_names=run.class_names,
                                              patients=res["patient"])
    metrics.update(split=split, checkpoint_step=run.step, source=source or run.cfg.data.source,
                   inference="gei" if run.global_emb is not None else "linear")
    if n_boot > 0:
        metrics["intervals"] = evaluate.statistics.metric_intervals(res["probs"], res["label"], res["patient"],
                                                                    n_boot=n_boot)
    out_dir = out_dir or storage.join(workdir, "eval")
    loop.write_json(storage.join(out_dir, "metrics.json"), metrics)
    if figures and jax.process_index() == 0:
        with _local_folder(out_dir) as fig_dir:
            plots.confusion_matrix_plot(np.asarray(metrics["confusion_matrix"]), run.class_names,
                                        os.path.join(fig_dir, "confusion_matrix.png"))
            plots.roc_curves(res["label"], res["probs"], os.path.join(fig_dir, "roc.png"),
                             class_names=run.class_names)
            plots.confidence_histogram(res["probs"], res["label"], os.path.join(fig_dir, "confidence.png"))
            if metrics.get("per_patient"):
                plots.per_patient_bars(metrics["per_patient"], os.path.join(fig_dir, "per_patient.png"))
    return metrics


@contextlib.contextmanager
def _local_folder(out_dir: str) -> Iterator[str]:
    """``out_dir`` itself, or for a bucket URL a temporary folder uploaded to it when the block ends."""
    if not storage.is_url(out_dir):
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="lclsc-eval-") as tmp:
        yield tmp
        storage.upload_tree(out_dir, tmp)


def same_source(a: str, b: str) -> bool:
    """Whether two ``data.source`` values name the same data (``synthetic``, or the same path once resolved)."""
    if a == b:
        return True
    if "synthetic" in (a, b) or "://" in a or "://" in b:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def check_known_labels(source: str, class_names: Sequence[str]) -> None:
    """Raise ``DataError`` at the first image of ``source`` whose class is not in ``class_names``.

    ``source``: a CSV manifest (the error names its line) or a folder ``ROOT/<class>/...`` (the
    error names the class folder). Bad files are reported as ``read_manifest``/``scan_folder`` do.
    """
    if source == "synthetic" or "://" in source:
        return
    if os.path.isdir(source):
        names, _ = data.scan_folder(source)
        unknown = [c for c in names if c not in class_names]
        if unknown:
            raise data.DataError(f"{os.path.join(source, unknown[0])}: class folder '{unknown[0]}' is not a class of "
                                 f"the run (its classes: {list(class_names)})")
        return
    if source.lower().endswith(".csv"):
        names, records = data.read_manifest(source)
        bad = next((r for r in records if names[r.label] not in class_names), None)
        if bad is not None:
            raise data.DataError(f"{bad.where}: unknown label '{names[bad.label]}' (the run's classes: "
                                 f"{list(class_names)})")


def label_map(data_classes: Sequence[str], run_classes: Sequence[str]) -> np.ndarray:
    """``(C_data,)`` int64: the run's class index of each of the data's classes (the data may have a subset)."""
    unknown = [c for c in data_classes if c not in run_classes]
    if unknown:
        raise ValueError(f"data classes {unknown} are not classes of the run ({tuple(run_classes)})")
    return np.asarray([list(run_classes).index(c) for c in data_classes], np.int64)


def split_indices(split: str, splits: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Record indices ``(M,)`` of ``split`` in ``splits`` (``all``: every one of ``n`` records); an empty or unknown split is a ``ValueError``."""
    if split == "all":
        return np.arange(n, dtype=np.int64)
    if split in splits and len(splits[split]):
        return np.asarray(splits[split], np.int64)
    raise ValueError(f"split {split!r} is empty or unknown; choose from {sorted(k for k in splits if len(splits[k]))} "
                     "or 'all'")


def run_splits(workdir: str, cfg: Config, ds: Any) -> dict[str, np.ndarray]:
    """The record indices a run trained with (saved in ``splits.json``), else the config's split."""
    saved = json.loads(storage.read_text(storage.join(workdir, "splits.json")))
    if "indices" in saved:
        return {k: np.asarray(v, np.int64) for k, v in saved["indices"].items()}
    return loop.make_splits(cfg, ds)


def predict(run: TrainedRun, data_or_images: Any, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Predictions of ``run``: ``probs (N, C)``, ``embedding (N, D)``, ``label``, ``index``, ``patient`` ``(N,)``.

    ``data_or_images``: a ``lclsc_jax.data.Dataset`` with record ``indices`` (labels and patients
    from the data), or uint8 images ``(N, H, W, C)`` (one process; ``label`` 0, ``patient`` empty).
    The one path of every protocol: ``train.predict.predict_batches`` over padded batches, with the
    run's prediction policy (``config.uses_gei``: GEI cosine, else the linear head).
    """
    batch_size = predict_lib.eval_batch_size(run.cfg, run.mesh)
    if isinstance(data_or_images, np.ndarray):
        if indices is not None:
            raise ValueError("indices select records of a Dataset; pass images[indices] instead")
        batches = data.array_batches(data_or_images, batch_size)
    else:
        if indices is None:
            raise ValueError("predict on a Dataset needs the record indices (e.g. run_splits(...)['test'])")
        batches = data.eval_batches(data_or_images, indices, batch_size)
    return predict_lib.predict_batches(run.cfg, run.model, run.state, run.mesh, batches, run.eval_step)


def predict_files(workdir: str, paths: Sequence[str], which: str = "best") -> list[dict[str, Any]]:
    """Class and probabilities for each image file (GEI for contrastive runs)."""
    run = load_run(workdir, which)
    probs = predict(run, load_images(run.cfg, paths))["probs"]
    return [{"path": p, "class": run.class_names[int(pr.argmax())], "probability": float(pr.max()),
             "probabilities": {c: float(v) for c, v in zip(run.class_names, pr)}}
            for p, pr in zip(paths, probs)]


def load_images(cfg: Config, paths: Sequence[str]) -> np.ndarray:
    """Read image files as the run's training data was prepared: ``(N, H, W, C)`` uint8."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no such image file(s): {', '.join(missing)}")
    return np.stack([data.load_image_file(p, cfg.data.image_size, cfg.data.channels) for p in paths])
