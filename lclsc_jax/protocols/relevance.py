"""Relevance maps of a trained run: train its optimal perturbation generator, load it back for ``explain``.

``train_generator(workdir, ...)`` restores the run (:func:`lclsc_jax.protocols.runs.load_run`),
reads the volumes (or images) of its training split as model inputs, and trains a U-Net mask
generator against the frozen classifier (``lclsc_jax.train.relevance``) into ``WORKDIR/relevance``.
``load_generator(workdir)`` returns ``(module, variables, config)``;
``explain_options(workdir)`` the options of ``explain.saliency("perturbation_generator", ...)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from lclsc_jax.data import normalize_images, storage
from lclsc_jax.explain import core
from lclsc_jax.explain.perturbation import slic_segments
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop
from lclsc_jax.train import relevance as rel_train

#: The generator's folder inside a run's workdir.
FOLDER = runs.GENERATOR_FOLDER


def generator_dir(workdir: str) -> str:
    """``WORKDIR/relevance``."""
    return storage.join(workdir, FOLDER)


def model_inputs(images: np.ndarray) -> np.ndarray:
    """Records' images or volumes as model inputs ``(N, *S, C)`` float32: uint8 are normalised as in training."""
    images = np.asarray(images)
    return normalize_images(images) if images.dtype == np.uint8 else images.astype(np.float32)


def split_volumes(run: runs.TrainedRun, split: str = "train", max_volumes: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs ``(N, *S, C)`` and labels ``(N,)`` of a split of the run's data (``max_volumes`` at most)."""
    ds = loop.load_dataset(run.cfg)
    idx = runs.split_indices(split, runs.run_splits(run.workdir, run.cfg, ds), len(ds.labels))
    if max_volumes is not None and len(idx) > max_volumes:
        idx = idx[np.unique(np.round(np.linspace(0, len(idx) - 1, max_volumes)).astype(np.int64))]
    recs = [ds.source[int(i)] for i in idx]
    return model_inputs(np.stack([r["image"] for r in recs])), np.asarray([int(r["label"]) for r in recs], np.int32)


def classifier_logits(run: runs.TrainedRun) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """``(logit_fn, classifier)``: ``logit_fn(classifier, x (B, *S, C)) -> (B, K)`` in eval mode.

    The run's prediction policy: GEI ``cos(z, G_c) / tau`` for contrastive runs, else the linear
    head. ``classifier`` (variables and scorer) is copied to the host, so it follows the generator's device.
    """
    scorer = core.make_scorer(run.model, 1, global_emb=run.global_emb, tau=run.cfg.loss.tau)
    model = run.model

    def logit_fn(classifier: Any, x: jax.Array) -> jax.Array:
        return classifier["scorer"].outputs(core.forward(model, classifier["variables"], x), (x.shape[0],))

    return logit_fn, jax.device_get({"variables": run.variables, "scorer": scorer})


def parse_baseline(baseline: float | str) -> float | str:
    """A baseline from the command line: ``"0"``/``"0.5"`` -> float, ``"mean"``/``"blur"`` kept."""
    if isinstance(baseline, str):
        try:
            return float(baseline)
        except ValueError:
            return baseline
    return float(baseline)


def train_generator(workdir: str, steps: int = 500, batch_size: int = 4, lr: float = 1e-3, area_weight: float = 0.1,
                    base_width: int = 8, depth: int = 3, *, tv_weight: float = 0.0, score: str = "prob",
                    baseline: float | str = 0.0, blur_sigma: float = 2.0, target: str = "predicted",
                    n_segments: int = 0, compactness: float = 10.0, slic_sigma: float = 1.0, split: str = "train",
                    max_volumes: int | None = None, which: str = "best", seed: int = 0, log_every: int = 50,
                    checkpoint_every: int | None = None, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train (or resume) the run's perturbation generator on its ``split`` into ``WORKDIR/relevance``; a summary.

    Settings: see :class:`lclsc_jax.train.relevance.GeneratorConfig` (``n_segments > 0``: masks
    pooled over that many SLIC supervoxels per volume). The summary: ``out_dir``, ``steps``,
    ``n_volumes``, ``classifier_step`` and the last logged ``loss``/``drop``/``area``.
    """
    cfg = rel_train.GeneratorConfig(base_width=base_width, depth=depth, area_weight=area_weight, tv_weight=tv_weight,
                                    score=score, baseline=parse_baseline(baseline), blur_sigma=blur_sigma,
                                    target=target, n_segments=n_segments, compactness=compactness,
                                    slic_sigma=slic_sigma, lr=lr, batch_size=batch_size, seed=seed)
    run = runs.load_run(workdir, which)
    x, labels = split_volumes(run, split, max_volumes)
    logit_fn, classifier = classifier_logits(run)
    segment_fn = (functools.partial(slic_segments, n_segments=n_segments, compactness=compactness, sigma=slic_sigma)
                  if n_segments > 0 else None)
    extra = {"classifier": {"workdir": workdir, "step": run.step, "arch": run.cfg.model.arch,
                            "class_names": list(run.class_names)},
             "split": split, "n_volumes": int(len(x))}
    out_dir = generator_dir(workdir)
    if log:
        log(f"training the perturbation generator of {workdir} (step {run.step}) on {len(x)} {split} input(s) "
            f"of shape {x.shape[1:]} -> {out_dir}")
    _, _, history = rel_train.train_generator(x, logit_fn, classifier, out_dir, steps, cfg, labels=labels,
                                              segment_fn=segment_fn, log_every=log_every,
                                              checkpoint_every=checkpoint_every, extra=extra, log=log)
    last = history[-1] if history else {}
    return {"out_dir": out_dir, "steps": steps, "n_volumes": int(len(x)), "classifier_step": run.step,
            **{k: last[k] for k in ("loss", "drop", "area") if k in last}}


def load_generator(workdir: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``(module, variables, config)`` of the generator trained for the run in ``workdir`` (latest step)."""
    return rel_train.restore_generator(generator_dir(workdir))


def explain_options(workdir: str) -> dict[str, Any]:
    """Keyword options of ``explain.saliency("perturbation_generator", ...)`` for the run's trained generator."""
    return runs.generator_options(workdir)
