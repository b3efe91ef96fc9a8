"""Saliency-method benchmark on a trained run: localisation against GT masks (and faithfulness).

In the manner of the Hemorica CAM benchmark (arXiv 2508.17699): several CAM methods, each at
several network stages, scored by Dice/IoU/precision/recall and box IoU of the binarised map
(fixed thresholds, Otsu and the mask's area), PR-AUC, the pointing game and the energy pointing
game. The headline columns are threshold-free: ``pr_auc``, ``dice@area``, ``pointing_game``, the
class specificity (``specificity_corr``, ``specificity_gap``: the map for the true class vs the
map for the most likely wrong class) and, with ``faithfulness``, the ROAD gap (``road_gap``:
LeRF - MoRF with noisy linear imputation, on the rank of the target class, so GEI and linear
heads are comparable); black-fill deletion / blurred insertion AUC are options. One row per
(method, stage); a method that fails at a stage records its error in its row. Writes
``cam_benchmark.csv``, ``.md``, ``.json``, the per-frame scores ``cam_benchmark_frames.npz`` and
``grid_<stage>.png`` (rows = images, columns = methods, maps overlaid with the GT mask contour).

Stage-free methods get one row each: ``sc`` at the model's last stage (its maps exist only
there), input-level methods (``fullgrad``, ``occlusion``, gradients, ...) with stage ``input``.
Class-blind baselines (``evaluate.shortcuts.BLIND_MAPS``) get a row each, method ``blind:<name>``
and stage ``-``, scored on the same images, masks and field of view: the floor a method must beat.

Volumes (a run trained on ``(D, H, W, C)`` volumes): maps and masks are ``(N, D, H, W)``, there is
no field of view, the tables gain ``hd95@<key>`` columns (``evaluate.hausdorff95`` of the
binarised map, in mm from each volume's affine, else voxels; ``hd95@area`` is a headline column),
the class-blind baselines are their 3D forms (:func:`blind_volume_map`), the figures are
orthogonal slices + MIP per volume (``volume_figures.orthogonal_grid``, ``grid_<stage>_<n>.png``)
and the ROAD / deletion / insertion measures are skipped (logged and recorded in the JSON).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from lclsc_jax import explain
from lclsc_jax.data import normalize_images, pad_rows
from lclsc_jax.data.volumes import spacing_of
from lclsc_jax.evaluate import (
    POINTING_TIES,
    class_specificity,
    deletion_curve,
    insertion_curve,
    localisation_metrics,
    normalize_maps,
    road,
    runner_up_class,
    shortcuts,
    target_scores,
)
from lclsc_jax.explain import core, volume_figures
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop
from lclsc_jax.train.reporting import log

__all__ = [
    "BLIND_VOLUME_MAPS",
    "DEFAULT_METHODS",
    "FAITHFULNESS_METRICS",
    "FRAME_FILE",
    "FRAME_METRICS",
    "HEADLINE_METRICS",
    "benchmark_cams",
    "blind_volume_map",
    "benchmark_columns",
    "benchmark_plan",
    "load_frames",
    "localisation_row",
    "select_images",
    "write_frames",
    "write_table",
]

#: The CAM family of the Hemorica benchmark plus our SC maps.
DEFAULT_METHODS: tuple[str, ...] = ("sc", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam",
                                    "scorecam", "ablationcam", "eigencam", "fullgrad")
OVERLAPS = ("dice", "iou", "precision", "recall", "bbox_iou")
INPUT_STAGE = "input"
BLIND_STAGE = "-"
#: Threshold-free headline columns (first in the tables): localisation, class specificity, faithfulness.
HEADLINE_METRICS = ("pr_auc", "dice@area", "pointing_game", "specificity_corr", "specificity_gap", "road_gap")
#: Perturbation measures ``faithfulness_metrics`` may name.
FAITHFULNESS_METRICS = ("road", "deletion", "insertion")
ROAD_COLUMNS = ("road_gap", "road_morf", "road_lerf", "road_gap_margin", "road_gap_prob")
#: Per-frame scores saved in ``FRAME_FILE`` (NaN where undefined: an empty mask, a flat map, a failed method).
FRAME_METRICS = ("pr_auc", "dice@area", "pointing_game", "specificity_corr", "specificity_gap", *ROAD_COLUMNS,
                 "dice@otsu", "energy_pointing_game", "deletion_auc", "insertion_auc", "hd95@area")
#: Class-blind baselines on volumes (3D forms of ``shortcuts.BLIND_MAPS``), see :func:`blind_volume_map`.
BLIND_VOLUME_MAPS: tuple[str, ...] = ("local_std", "dog", "centre", "random")
FRAME_FILE = "cam_benchmark_frames.npz"


def benchmark_columns(thresholds: Sequence[float] = (0.5,), faithfulness: bool = False, *, specificity: bool = True,
                      faithfulness_metrics: Sequence[str] = ("road",), volumes: bool = False) -> list[str]:
    """Column names of a benchmark row, in table order: the headline (threshold-free) columns first.

    ``volumes``: also the HD95 of each binarised map (``hd95@<key>``; ``hd95@area`` among the headline).
    """
    keys = [_threshold_key(t) for t in thresholds] + ["otsu", "area"]
    overlaps = OVERLAPS + (("hd95",) if volumes else ())
    cols = ["method", "stage", "n_images", "n_evaluated", "pr_auc", "dice@area"]
    cols += ["hd95@area"] if volumes else []
    cols += ["pointing_game"]
    if specificity:
        cols += ["specificity_corr", "specificity_gap"]
    if faithfulness:
        fm = _check_faithfulness_metrics(faithfulness_metrics)
        cols += list(ROAD_COLUMNS) if "road" in fm else []
        cols += [f"{m}_auc" for m in ("deletion", "insertion") if m in fm]
    cols += [f"{m}@{k}" for k in keys for m in overlaps if f"{m}@{k}" not in cols]
    cols += ["energy_pointing_game"]
    return cols + ["seconds", "error"]


def _check_faithfulness_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each one of :data:`FAITHFULNESS_METRICS`."""
    bad = [n for n in names if n not in FAITHFULNESS_METRICS]
    if bad or not names:
        raise ValueError(f"faithfulness_metrics must be a non-empty subset of {FAITHFULNESS_METRICS}, "
                         f"got {list(names)}")
    return tuple(dict.fromkeys(names))


def _threshold_key(t: float) -> str:
    """Key of a fixed threshold, as ``localisation_metrics`` names it (``str(float(t))``)."""
    return str(float(t))


def benchmark_plan(model: Any, methods: Sequence[str], stages: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(method, stage)`` pairs: stage methods x ``stages`` (None/"all": every stage), ``sc`` at the last stage, input methods once."""
    names = tuple(model.stage_names)
    if stages is None or list(stages) == ["all"]:
        stages = names
    stages = [model.last_stage if s == "last" else s for s in stages]
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; this model has {names} (or 'last', 'all')")
    bad = [m for m in methods if m not in explain.METHODS]
    if bad:
        raise ValueError(f"unknown saliency method(s) {bad}; expected some of {explain.METHODS}")
    plan: list[tuple[str, str]] = []
    for m in dict.fromkeys(methods):
        if m == "sc":
            plan.append((m, model.last_stage))
        elif m in explain.INPUT_METHODS:
            plan.append((m, INPUT_STAGE))
        else:
            plan += [(m, s) for s in dict.fromkeys(stages)]
    return plan


def select_images(indices: np.ndarray, max_images: int) -> np.ndarray:
    """At most ``max_images`` of ``indices``, evenly spaced (so every patient block is sampled), order kept."""
    idx = np.asarray(indices, np.int64)
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if len(idx) <= max_images:
        return idx
    pos = np.unique(np.round(np.linspace(0, len(idx) - 1, max_images)).astype(np.int64))
    return idx[pos]


def _localisation(maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float], valid: np.ndarray | None,
                  pointing_ties: str = "first", spacing: Any = None, hd95: bool = False
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(row, per-frame arrays)`` of ``localisation_row``; per-frame values NaN where undefined."""
    m = localisation_metrics(maps, masks, thresholds=thresholds, otsu=True, valid=valid, area=True,
                             return_per_image=True, pointing_ties=pointing_ties, hd95=hd95, spacing=spacing)
    row: dict[str, Any] = {"n_images": m["n_images"], "n_evaluated": m["n_evaluated"],
                           "pointing_game": m["pointing_game"], "energy_pointing_game": m["energy_pointing_game"],
                           "pr_auc": m["pr_auc"]}
    for key, vals in m["thresholds"].items():
        row.update({f"{name}@{key}": v for name, v in vals.items()})
    per = m["per_image"]
    frames = {k: _nan_array(per[k]) for k in ("pr_auc", "pointing_game", "energy_pointing_game")}
    frames["dice@area"] = _nan_array(per["thresholds"]["area"]["dice"])
    frames["dice@otsu"] = _nan_array(per["thresholds"]["otsu"]["dice"])
    if hd95:
        frames["hd95@area"] = _nan_array(per["thresholds"]["area"]["hd95"])
    return row, frames


def _volume_spacings(recs: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Voxel spacing ``(N, 3)`` of volume records: from each record's ``affine`` (mm), else 1 (voxels)."""
    return np.stack([spacing_of(r["affine"]) if r.get("affine") is not None else np.ones(3) for r in recs])


def _nan_array(values: Sequence[Any]) -> np.ndarray:
    """``(N,)`` float64 of a list with None -> NaN."""
    return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)


def localisation_row(maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] = (0.5,),
                     valid: np.ndarray | None = None, pointing_ties: str = "first", *, spacing: Any = None,
                     hd95: bool | None = None) -> dict[str, Any]:
    """Flat localisation scores of ``maps (N, [D,] H, W)`` in [0, 1] vs same-shaped ``masks``: ``dice@0.5``, ...

    ``hd95`` (default: on for volumes ``(N, D, H, W)``) adds ``hd95@<key>`` per binarisation
    (``evaluate.hausdorff95``, ``spacing``: scalar, ``(ndim,)`` or per frame ``(N, ndim)``; 1 if None).
    """
    hd = np.ndim(maps) == 4 if hd95 is None else bool(hd95)
    return _localisation(maps, masks, thresholds, valid, pointing_ties, spacing, hd)[0]


def _luminance3d(images: np.ndarray) -> np.ndarray:
    """``(N, D, H, W)`` float64 in [0, 1] of volumes ``(N, D, H, W[, C])`` (uint8 / 255 or float), channel mean."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.ndim == 5:
        x = x.mean(axis=-1)
    if x.ndim != 4:
        raise ValueError(f"volumes must have shape (N, D, H, W) or (N, D, H, W, C), got {np.shape(images)}")
    return x


def blind_volume_map(name: str, images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Class-blind maps ``(N, D, H, W)`` in [0, 1] of volumes ``(N, D, H, W[, C])``: the 3D ``shortcuts.BLIND_MAPS``.

    ``local_std``: standard deviation in a 7^3 window (reflected borders); ``dog``: band-pass
    energy ``G_2 * |G_1 * x - G_3 * x|`` (Gaussians, sigmas in voxels, nearest borders);
    ``centre``: a centred Gaussian ``exp(-d^2 / (2 (0.25 min(D, H, W))^2))``; ``random``: i.i.d.
    uniform noise of ``default_rng(seed)``. Each map min-max scaled (flat -> 0).
    """
    if name not in BLIND_VOLUME_MAPS:
        raise ValueError(f"unknown class-blind map {name!r}; expected one of {BLIND_VOLUME_MAPS}")
    if name in ("centre", "random"):
        shape = np.shape(images)
        if len(shape) not in (4, 5):
            raise ValueError(f"volumes must have shape (N, D, H, W) or (N, D, H, W, C), got {shape}")
        n, spatial = shape[0], tuple(shape[1:4])
        if name == "random":
            return normalize_maps(np.random.default_rng(seed).random((n,) + spatial)).astype(np.float32)
        grids = np.meshgrid(*[np.arange(k) - (k - 1) / 2 for k in spatial], indexing="ij")
        g = np.exp(-sum(a**2 for a in grids) / (2 * (0.25 * min(spatial)) ** 2))
        return normalize_maps(np.broadcast_to(g, (n,) + spatial)).astype(np.float32)
    lum = _luminance3d(images)
    if name == "local_std":
        x = lum - lum.mean(axis=(1, 2, 3), keepdims=True)
        box = lambda a: ndimage.uniform_filter(a, size=(1, 7, 7, 7), mode="reflect")  # noqa: E731
        m = np.sqrt(np.clip(box(x**2) - box(x) ** 2, 0.0, None))
    else:
        gauss = lambda a, s: ndimage.gaussian_filter(a, sigma=(0, s, s, s), mode="nearest")  # noqa: E731
        m = gauss(np.abs(gauss(lum, 1.0) - gauss(lum, 3.0)), 2.0)
    return normalize_maps(np.where(m > 1e-7, m, 0.0)).astype(np.float32)


def _maps(run: Any, method: str, stage: str, x: np.ndarray, targets: np.ndarray, batch_size: int,
          options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Saliency maps ``(N, H, W)`` in [0, 1] of ``x (N, H, W, C)`` in fixed-size (padded) batches."""
    maps = explain.saliency_batched(method, run.model, run.variables, x, targets, batch_size=batch_size,
                                    stage="last" if stage == INPUT_STAGE else stage, global_emb=run.global_emb,
                                    tau=run.cfg.loss.tau, **{**run.saliency_options(method), **(options or {})})
    return np.clip(maps, 0.0, 1.0)


def _score_fn(run: Any) -> Any:
    """``images (B, H, W, C) -> probs (B, K)`` of the run (GEI softmax for contrastive runs, else the linear head)."""
    scorer = core.make_scorer(run.model, 1, global_emb=run.global_emb, tau=run.cfg.loss.tau)
    model, variables = run.model, run.variables

    def score_fn(images: jax.Array) -> jax.Array:
        return core.probabilities(model, variables, images, scorer)

    return score_fn


def _logit_fn(run: Any) -> Any:
    """``images (B, H, W, C) -> logits (B, K)``: ``cos(z, G_c) / tau`` (GEI runs), else the linear head's logits."""
    scorer = core.make_scorer(run.model, 1, global_emb=run.global_emb, tau=run.cfg.loss.tau)
    model, variables = run.model, run.variables

    def logit_fn(images: jax.Array) -> jax.Array:
        return scorer.outputs(core.forward(model, variables, images), (images.shape[0],))

    return logit_fn


def _logits(logit_fn: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``(N, K)`` logits of ``x`` in fixed-size (padded) batches."""
    fn = jax.jit(logit_fn)
    out = []
    for i in range(0, len(x), batch_size):
        xb, valid = pad_rows(x[i:i + batch_size], batch_size)
        out.append(np.asarray(fn(xb), np.float64)[valid])
    return np.concatenate(out)


def _softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (float64)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _road_frames(logit_fn: Any, x: np.ndarray, maps: np.ndarray, targets: np.ndarray, percentages: Sequence[float],
                 noise: float, score: str, batch_size: int) -> dict[str, np.ndarray]:
    """Per-frame ROAD gap (LeRF - MoRF, mean over ``percentages``) on ``score``, the logit margin and the probability.

    One ``road`` run on the logits (key 0: every method sees the same imputation noise); the
    three views come from the same model outputs.
    """
    t = targets.astype(np.int32)
    r = road(logit_fn, x, maps, t, percentages=percentages, noise_std=noise, key=jax.random.key(0),
             max_batch=batch_size, score=score)
    tt = np.broadcast_to(t[:, None, None], r["outputs"].shape[:-1])
    margin = target_scores(r["outputs"], tt, "margin").mean(axis=2)  # (B, 2): MoRF, LeRF
    prob = target_scores(_softmax(r["outputs"]), tt, "prob").mean(axis=2)
    return {"road_gap": r["lerf_mean"] - r["morf_mean"], "road_morf": r["morf_mean"], "road_lerf": r["lerf_mean"],
            "road_gap_margin": margin[:, 1] - margin[:, 0], "road_gap_prob": prob[:, 1] - prob[:, 0]}


def _curves_frames(score_fns: Mapping[str, Any], x: np.ndarray, maps: np.ndarray, targets: np.ndarray, steps: int,
                   which: Sequence[str], score: str, batch_size: int) -> dict[str, np.ndarray]:
    """Per-frame deletion AUC (black fill, lower is better) and insertion AUC (from blurred, higher is better)."""
    fn = score_fns["prob"] if score == "prob" else score_fns["logits"]
    t = targets.astype(np.int32)
    out: dict[str, np.ndarray] = {}
    if "deletion" in which:
        black = np.broadcast_to(normalize_images(np.zeros((1,) + x.shape[1:], np.uint8)), x.shape)
        out["deletion_auc"] = deletion_curve(fn, x, maps, t, n_steps=steps, baseline=black, max_batch=batch_size,
                                             score=score)["auc"]
    if "insertion" in which:
        out["insertion_auc"] = insertion_curve(fn, x, maps, t, n_steps=steps, baseline="blur", max_batch=batch_size,
                                               score=score)["auc"]
    return out


def _error_text(e: BaseException) -> str:
    """One line naming an exception: ``Type: first line of the message`` (at most 300 characters)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _fmt(v: Any) -> str:
    """A table cell: floats with 3 decimals, None as ``–``."""
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "/")


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out_dir: str,
                stem: str = "cam_benchmark") -> dict[str, str]:
    """Write ``rows`` as ``<stem>.csv`` (all columns) and ``<stem>.md``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, f"{stem}.csv"), "md": os.path.join(out_dir, f"{stem}.md")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    shown = [c for c in columns if c != "seconds"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |" for r in rows]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths


def _grid_figure(display: np.ndarray, masks: np.ndarray, titles: Sequence[str], columns: Sequence[tuple[str, Any]],
                 path: str) -> str:
    """Rows = images, columns = image + each method's map (jet, alpha 0.5) with the GT contour (white)."""
    n, ncol = len(display), 1 + len(columns)
    fig = Figure(figsize=(1.6 * ncol, 1.6 * n + 0.3))
    axes = fig.subplots(n, ncol, squeeze=False)
    for i in range(n):
        img = display[i, ..., 0] if display.shape[-1] == 1 else display[i, ..., :3]
        for j in range(ncol):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
            if j > 0:
                label, maps = columns[j - 1]
                if maps is None:
                    ax.text(0.5, 0.5, "failed", ha="center", va="center", color="red", transform=ax.transAxes)
                else:
                    ax.imshow(maps[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
                if i == 0:
                    ax.set_title(label, fontsize=7)
            elif i == 0:
                ax.set_title("image", fontsize=7)
            if masks[i].any():
                ax.contour(masks[i].astype(float), levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, format="png")
    return path


def _figure_picks(labels: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` positions: the first image of each class in turn, then the rest in order."""
    order: list[int] = []
    for c in np.unique(labels):
        order.append(int(np.flatnonzero(labels == c)[0]))
    order += [i for i in range(len(labels)) if i not in order]
    return np.asarray(order[:k], np.int64)


def _frame_mean(v: np.ndarray) -> float | None:
    """Mean of the finite values, None without any."""
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def write_frames(path: str, index: np.ndarray, patient: np.ndarray, label: np.ndarray, predicted: np.ndarray,
                 runner_up: np.ndarray, frames: Mapping[tuple[str, str], Mapping[str, np.ndarray]]) -> str:
    """Save per-frame scores: ``index/patient/label/predicted/runner_up (N,)``, ``methods/stages/metrics (M,)``,
    ``values (M, N)``; return the path."""
    names = [(m, st, k) for (m, st), d in frames.items() for k in FRAME_METRICS if k in d]
    values = np.stack([frames[(m, st)][k] for m, st, k in names]) if names else np.zeros((0, len(index)))
    tmp = path + ".tmp.npz"
    np.savez(tmp, index=np.asarray(index, np.int64), patient=np.asarray(patient).astype(str),
             label=np.asarray(label, np.int64), predicted=np.asarray(predicted, np.int64),
             runner_up=np.asarray(runner_up, np.int64), methods=np.asarray([n[0] for n in names], str),
             stages=np.asarray([n[1] for n in names], str), metrics=np.asarray([n[2] for n in names], str),
             values=values.astype(np.float64))
    os.replace(tmp, path)
    return path


def load_frames(path: str) -> dict[str, Any]:
    """A ``FRAME_FILE``: ``{index, patient, label, predicted, runner_up, columns: {(method, stage, metric): (N,)}}``."""
    with np.load(path) as z:
        out = {k: z[k] for k in ("index", "patient", "label", "predicted", "runner_up")}
        out["columns"] = {(str(m), str(st), str(k)): z["values"][i]
                          for i, (m, st, k) in enumerate(zip(z["methods"], z["stages"], z["metrics"]))}
    return out


def benchmark_cams(workdir: str, methods: Sequence[str] | None = None, stages: Sequence[str] | None = None,
                   split: str = "test", max_images: int | None = 64, thresholds: Sequence[float] = (0.5,),
                   out_dir: str | None = None, *, which: str = "best", faithfulness: bool = False,
                   faithfulness_metrics: Sequence[str] = ("road",), faithfulness_score: str = "rank",
                   road_percentages: Sequence[float] = (10, 30, 50, 70, 90), road_noise: float = 0.01,
                   specificity: bool = True, deletion_steps: int = 16, batch_size: int = 16, figure_images: int = 6,
                   fov: bool = True, blind: Sequence[str] | None = None, pointing_ties: str = "first",
                   progress: bool = True, method_options: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> list[dict[str, Any]]:
    """Localisation, class specificity (and faithfulness) of each method at each stage on a run's ``split``; table rows.

    Runs trained on volumes are scored in 3D (see the module docstring: HD95 columns, 3D
    class-blind maps, orthogonal-slice figures, no field of view, faithfulness skipped).

    Targets are the true labels. ``max_images``: at most this many frames of the split, evenly
    spaced (0 or None: every frame). ``methods`` default: ``DEFAULT_METHODS`` (``sc`` only works
    for contrastive runs; on a ``ce`` run its row holds the error). ``stages`` default: every stage
    of the model (``"last"`` allowed). ``specificity``: also explain the most likely wrong class
    (``runner_up_class`` of the run's logits) and compare the two maps (``class_specificity``).
    ``faithfulness``: the perturbation measures of ``faithfulness_metrics`` (``road``: ROAD with
    noisy linear imputation at ``road_percentages``; ``deletion``: black fill; ``insertion``: from
    blurred), tracking ``faithfulness_score`` of the target class (``target_scores``: ``rank``
    (default), ``margin`` on the logits, ``prob``). ``fov`` restricts Otsu, pointing games and
    overlaps to the circular field of view. ``blind``: class-blind baselines appended as rows
    ``blind:<name>`` (default: all of ``shortcuts.BLIND_MAPS``; ``()`` for none). ``pointing_ties``:
    ``first`` (the first maximum in raster order; a flat map misses) or ``any`` (any maximum; Quantus'
    convention, a flat map hits), see ``evaluate.pointing_game``. Writes the
    table, ``cam_benchmark.json``, the per-frame scores (``FRAME_FILE``) and the figure grids
    into ``out_dir`` (default ``WORKDIR/cam_benchmark``). ``method_options``: per method, options
    of its own on top of the run's (e.g. ``{"occlusion": {"patch_size": 8, "stride": 4}}``).
    """
    fm = _check_faithfulness_metrics(faithfulness_metrics) if faithfulness else ()
    if pointing_ties not in POINTING_TIES:
        raise ValueError(f"pointing_ties must be one of {POINTING_TIES}, got {pointing_ties!r}")
    if faithfulness_score not in ("prob", "margin", "rank"):
        raise ValueError(f"faithfulness_score must be 'prob', 'margin' or 'rank', got {faithfulness_score!r}")
    run = runs.load_run(workdir, which)
    ds = loop.load_dataset(run.cfg)
    if not ds.has_masks:
        raise ValueError(f"the data of {workdir} ({run.cfg.data.source}) has no ground-truth masks; benchmark-cams "
                         "needs masks (the synthetic pCLE data ship them; a manifest can give a mask column)")
    indices = runs.split_indices(split, runs.run_splits(workdir, run.cfg, ds), len(ds.labels))
    idx = select_images(indices, max_images) if max_images else np.asarray(indices, np.int64)
    recs = [ds.source[int(i)] for i in idx]
    images = np.stack([r["image"] for r in recs])
    masks = np.stack([np.asarray(r["mask"]) > 0 for r in recs])
    targets = np.asarray([int(r["label"]) for r in recs], np.int32)
    x = normalize_images(images)
    volumes = images.ndim == 5
    skipped_faithfulness = list(fm) if volumes else []
    if volumes and fm:
        log(f"[benchmark-cams] volumes: faithfulness measures {list(fm)} skipped (one perturbation curve per "
            "volume and method is too costly in 3D); localisation, HD95 and class specificity are computed")
        fm = ()
    spacing = _volume_spacings(recs) if volumes else None
    valid = shortcuts.inscribed_disc(*images.shape[1:3]) if fov and not volumes else None
    plan = benchmark_plan(run.model, list(methods or DEFAULT_METHODS), stages)
    columns = benchmark_columns(thresholds, bool(fm), specificity=specificity, faithfulness_metrics=fm or ("road",),
                                volumes=volumes)
    bs = min(batch_size, len(x))
    score_fns = {"prob": _score_fn(run), "logits": _logit_fn(run)}  # one object each: compiled once
    logits = _logits(score_fns["logits"], x, bs)
    predicted = logits.argmax(axis=1)
    wrong = runner_up_class(logits, targets).astype(np.int32)
    picks = _figure_picks(targets, figure_images)
    kept: dict[tuple[str, str], np.ndarray | None] = {}
    frames: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    rows: list[dict[str, Any]] = []

    def score(method: str, stage: str, make_maps: Callable[[np.ndarray], np.ndarray], class_blind: bool) -> None:
        """Append the table row of one map maker; a failing method is a table entry, not a crash."""
        t0 = time.time()
        row: dict[str, Any] = {"method": method, "stage": stage, "n_images": int(len(idx)), "error": None}
        try:
            maps = make_maps(targets)
            loc, per = _localisation(maps, masks, thresholds, valid, pointing_ties, spacing, volumes)
            row.update(loc)
            if specificity:
                other = maps if class_blind else make_maps(wrong)
                spec = class_specificity(maps, other, masks, valid, return_per_image=True)
                per["specificity_corr"] = _nan_array(spec["per_image"]["correlation"])
                per["specificity_gap"] = _nan_array(spec["per_image"]["dice_area_gap"])
            if "road" in fm:
                per.update(_road_frames(score_fns["logits"], x, maps, targets, road_percentages, road_noise,
                                        faithfulness_score, bs * 4))
            if "deletion" in fm or "insertion" in fm:
                per.update(_curves_frames(score_fns, x, maps, targets, deletion_steps, fm, faithfulness_score, bs * 4))
            means = ("specificity_corr", "specificity_gap", *ROAD_COLUMNS, "deletion_auc", "insertion_auc")
            row.update({k: _frame_mean(v) for k, v in per.items() if k in means})
            frames[(method, stage)] = per
            kept[(method, stage)] = maps[picks]
        except Exception as e:  # noqa: BLE001
            row["error"] = _error_text(e)
            kept[(method, stage)] = None
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        if progress:
            log(f"[benchmark-cams] {method:<20} {stage:<7} " + (
                f"ERROR {row['error']}" if row["error"] else
                f"pr_auc={_fmt(row['pr_auc'])} dice@area={_fmt(row['dice@area'])} "
                f"pointing={_fmt(row['pointing_game'])}"))

    for method, stage in plan:
        opts = dict((method_options or {}).get(method, {}))
        score(method, stage, lambda t, m=method, s=stage, o=opts: _maps(run, m, s, x, t, bs, o), False)
    blind_names = (BLIND_VOLUME_MAPS if volumes else shortcuts.BLIND_MAPS) if blind is None else tuple(blind)
    if volumes:
        for name in blind_names:  # class-blind floor in 3D: same volumes, masks and scoring
            score(f"blind:{name}", BLIND_STAGE, lambda t, n=name: blind_volume_map(n, images, seed=0), True)
    else:
        # Blind maps are computed inside the measured field of view (a dark rim inside the inscribed disc
        # is not texture) and scored like every other row.
        est = shortcuts.fov_or_none(images) if fov and blind_names else None
        map_valid = valid if est is None else est
        for name in blind_names:  # class-blind floor: same images, masks, field of view and scoring
            score(f"blind:{name}", BLIND_STAGE,
                  lambda t, n=name: shortcuts.blind_map(n, images, map_valid, seed=0).astype(np.float32), True)
    out_dir = out_dir or os.path.join(workdir, "cam_benchmark")
    paths = write_table(rows, columns, out_dir)
    paths["frames"] = write_frames(os.path.join(out_dir, FRAME_FILE), idx, ds.patients[idx], targets, predicted, wrong,
                                   frames)
    figures = []
    if len(picks):
        display = images[picks].astype(np.float32) / 255.0
        titles = [f"{ds.patients[idx[p]]} {run.class_names[targets[p]]}" for p in picks]
        fig_stages = list(dict.fromkeys(s for _, s in plan if s != INPUT_STAGE)) or [INPUT_STAGE]
        for fs in fig_stages:
            cols = [(f"{m}" if s == fs else f"{m} ({s})", kept[(m, s)]) for m, s in plan
                    if s == fs or s == INPUT_STAGE or (m == "sc")]
            cols += [(f"blind:{b}", kept[(f"blind:{b}", BLIND_STAGE)]) for b in blind_names]
            if volumes:  # one figure per volume: rows = maps, orthogonal slices through each map's maximum + MIP
                for j, p in enumerate(picks):
                    rows_j = [(label, None if mp is None else mp[j]) for label, mp in cols]
                    figures.append(volume_figures.orthogonal_grid(
                        images[p], rows_j, masks[p], os.path.join(out_dir, f"grid_{fs}_{j}.png"),
                        f"{titles[j]} (stage {fs})"))
                continue
            figures.append(_grid_figure(display, masks[picks], titles, cols, os.path.join(out_dir, f"grid_{fs}.png")))
    meta = {"workdir": workdir, "checkpoint_step": run.step, "split": split, "indices": idx.tolist(),
            "thresholds": [float(t) for t in thresholds], "fov": fov, "faithfulness": bool(fm),
            "faithfulness_metrics": list(fm), "faithfulness_score": faithfulness_score, "pointing_ties": pointing_ties,
            "road_percentages": [float(p) for p in road_percentages], "road_noise": float(road_noise),
            "specificity": bool(specificity), "blind": list(blind_names), "volumes": bool(volumes),
            "spacing": None if spacing is None else spacing.tolist(), "skipped_faithfulness": skipped_faithfulness,
            "columns": columns, "rows": rows, "figures": [os.path.basename(p) for p in figures], **paths}
    loop.write_json(os.path.join(out_dir, "cam_benchmark.json"), meta)
    return rows
