"""Saliency-method benchmark on a trained run: localisation against GT masks (and faithfulness).

In the manner of the Hemorica CAM benchmark (arXiv 2508.17699): several CAM methods, each at
several network stages, scored by Dice/IoU/precision/recall and box IoU of the binarised map
(fixed thresholds and Otsu), the pointing game and the energy pointing game; optionally by
deletion/insertion AUC. One row per (method, stage); a method that fails at a stage records
its error in its row. Writes ``cam_benchmark.csv``, ``.md``, ``.json`` and ``grid_<stage>.png``
(rows = images, columns = methods, maps overlaid with the GT mask contour).

Stage-free methods get one row each: ``sc`` at the model's last stage (its maps exist only
there), input-level methods (``fullgrad``, ``occlusion``, gradients, ...) with stage ``input``.
Class-blind baselines (``evaluate.shortcuts.BLIND_MAPS``) get a row each, method ``blind:<name>``
and stage ``-``, scored on the same images, masks and field of view: the floor a method must beat.
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

from lclsc_jax import explain
from lclsc_jax.data import normalize_images, pad_rows
from lclsc_jax.evaluate import deletion_curve, insertion_curve, localisation_metrics, shortcuts
from lclsc_jax.explain import core
from lclsc_jax.protocols import runs
from lclsc_jax.train import loop
from lclsc_jax.train.reporting import log

__all__ = [
    "DEFAULT_METHODS",
    "benchmark_cams",
    "benchmark_columns",
    "benchmark_plan",
    "localisation_row",
    "select_images",
    "write_table",
]

#: The CAM family of the Hemorica benchmark plus our SC maps.
DEFAULT_METHODS: tuple[str, ...] = ("sc", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam",
                                    "scorecam", "ablationcam", "eigencam", "fullgrad")
OVERLAPS = ("dice", "iou", "precision", "recall", "bbox_iou")
INPUT_STAGE = "input"
BLIND_STAGE = "-"


def benchmark_columns(thresholds: Sequence[float] = (0.5,), faithfulness: bool = False) -> list[str]:
    """Column names of a benchmark row, in table order."""
    keys = [_threshold_key(t) for t in thresholds] + ["otsu", "area"]
    cols = ["method", "stage", "n_images", "n_evaluated"]
    cols += [f"{m}@{k}" for k in keys for m in OVERLAPS]
    cols += ["pointing_game", "energy_pointing_game", "pr_auc"]
    if faithfulness:
        cols += ["deletion_auc", "insertion_auc"]
    return cols + ["seconds", "error"]


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


def localisation_row(maps: np.ndarray, masks: np.ndarray, thresholds: Sequence[float] = (0.5,),
                     valid: np.ndarray | None = None) -> dict[str, Any]:
    """Flat localisation scores of ``maps (N, H, W)`` in [0, 1] vs ``masks (N, H, W)``: ``dice@0.5``, ``pr_auc``, ..."""
    m = localisation_metrics(maps, masks, thresholds=thresholds, otsu=True, valid=valid, area=True)
    row: dict[str, Any] = {"n_images": m["n_images"], "n_evaluated": m["n_evaluated"],
                           "pointing_game": m["pointing_game"], "energy_pointing_game": m["energy_pointing_game"],
                           "pr_auc": m["pr_auc"]}
    for key, vals in m["thresholds"].items():
        row.update({f"{name}@{key}": v for name, v in vals.items()})
    return row


def _maps(run: Any, method: str, stage: str, x: np.ndarray, targets: np.ndarray, batch_size: int) -> np.ndarray:
    """Saliency maps ``(N, H, W)`` in [0, 1] of ``x (N, H, W, C)`` in fixed-size (padded) batches."""
    out = []
    for i in range(0, len(x), batch_size):
        xb, valid = pad_rows(x[i:i + batch_size], batch_size)  # one shape: one compilation per (method, stage)
        tb, _ = pad_rows(targets[i:i + batch_size], batch_size)
        m = explain.saliency(method, run.model, run.variables, xb, tb.astype(np.int32),
                             stage="last" if stage == INPUT_STAGE else stage,
                             global_emb=run.global_emb, tau=run.cfg.loss.tau)
        out.append(np.asarray(m, np.float32)[valid])
    maps = np.concatenate(out)
    if not np.all(np.isfinite(maps)):
        raise FloatingPointError(f"{method} at {stage} produced NaN/inf maps")
    return np.clip(maps, 0.0, 1.0)


def _score_fn(run: Any) -> Any:
    """``images (B, H, W, C) -> probs (B, K)`` of the run (GEI softmax for contrastive runs, else the linear head)."""
    scorer = core.make_scorer(run.model, 1, global_emb=run.global_emb, tau=run.cfg.loss.tau)
    model, variables = run.model, run.variables

    def score_fn(images: jax.Array) -> jax.Array:
        return core.probabilities(model, variables, images, scorer)

    return score_fn


def _faithfulness(score_fn: Any, x: np.ndarray, maps: np.ndarray, targets: np.ndarray, steps: int,
                  batch_size: int) -> dict[str, float]:
    """Mean deletion AUC (black fill, lower is better) and insertion AUC (from blurred, higher is better)."""
    black = np.broadcast_to(normalize_images(np.zeros((1,) + x.shape[1:], np.uint8)), x.shape)
    t = targets.astype(np.int32)
    d = deletion_curve(score_fn, x, maps, t, n_steps=steps, baseline=black, max_batch=batch_size)
    ins = insertion_curve(score_fn, x, maps, t, n_steps=steps, baseline="blur", max_batch=batch_size)
    return {"deletion_auc": float(d["mean_auc"]), "insertion_auc": float(ins["mean_auc"])}


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


def benchmark_cams(workdir: str, methods: Sequence[str] | None = None, stages: Sequence[str] | None = None,
                   split: str = "test", max_images: int = 64, thresholds: Sequence[float] = (0.5,),
                   out_dir: str | None = None, *, which: str = "best", faithfulness: bool = False,
                   deletion_steps: int = 16, batch_size: int = 16, figure_images: int = 6, fov: bool = True,
                   blind: Sequence[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Localisation (and faithfulness) of each method at each stage on a run's ``split``; returns the table rows.

    Targets are the true labels. ``methods`` default: ``DEFAULT_METHODS`` (``sc`` only works for
    contrastive runs; on a ``ce`` run its row holds the error). ``stages`` default: every stage of
    the model (``"last"`` allowed). ``fov`` restricts Otsu, pointing games and overlaps to the
    circular field of view. ``blind``: class-blind baselines appended as rows ``blind:<name>``
    (default: all of ``shortcuts.BLIND_MAPS``; ``()`` for none). Writes the table,
    ``cam_benchmark.json`` and the figure grids into ``out_dir`` (default ``WORKDIR/cam_benchmark``).
    """
    run = runs.load_run(workdir, which)
    ds = loop.load_dataset(run.cfg)
    if not ds.has_masks:
        raise ValueError(f"the data of {workdir} ({run.cfg.data.source}) has no ground-truth masks; benchmark-cams "
                         "needs masks (the synthetic pCLE data ships them; a manifest can give a mask column)")
    splits = runs.run_splits(workdir, run.cfg, ds)
    if split == "all":
        indices = np.arange(len(ds.labels), dtype=np.int64)
    elif split in splits and len(splits[split]):
        indices = np.asarray(splits[split], np.int64)
    else:
        raise ValueError(f"split {split!r} is empty or unknown; choose from {sorted(k for k in splits if len(splits[k]))} "
                         "or 'all'")
    idx = select_images(indices, max_images)
    recs = [ds.source[int(i)] for i in idx]
    images = np.stack([r["image"] for r in recs])
    masks = np.stack([np.asarray(r["mask"]) > 0 for r in recs])
    targets = np.asarray([int(r["label"]) for r in recs], np.int32)
    x = normalize_images(images)
    valid = shortcuts.inscribed_disc(*images.shape[1:3]) if fov else None
    plan = benchmark_plan(run.model, list(methods or DEFAULT_METHODS), stages)
    columns = benchmark_columns(thresholds, faithfulness)
    score_fn = _score_fn(run) if faithfulness else None
    picks = _figure_picks(targets, figure_images)
    kept: dict[tuple[str, str], np.ndarray | None] = {}
    rows: list[dict[str, Any]] = []
    def score(method: str, stage: str, make_maps: Callable[[], np.ndarray]) -> None:
        """Append the table row of one map maker; a failing method is a table entry, not a crash."""
        t0 = time.time()
        row: dict[str, Any] = {"method": method, "stage": stage, "n_images": int(len(idx)), "error": None}
        try:
            maps = make_maps()
            row.update(localisation_row(maps, masks, thresholds, valid))
            if faithfulness:
                row.update(_faithfulness(score_fn, x, maps, targets, deletion_steps, min(batch_size, len(x)) * 4))
            kept[(method, stage)] = maps[picks]
        except Exception as e:  # noqa: BLE001
            row["error"] = _error_text(e)
            kept[(method, stage)] = None
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        if progress:
            log(f"[benchmark-cams] {method:<20} {stage:<7} " + (
                f"ERROR {row['error']}" if row["error"] else
                f"dice@otsu={_fmt(row['dice@otsu'])} pointing={_fmt(row['pointing_game'])}"))

    for method, stage in plan:
        score(method, stage, lambda m=method, s=stage: _maps(run, m, s, x, targets, min(batch_size, len(x))))
    blind_names = shortcuts.BLIND_MAPS if blind is None else tuple(blind)
    # Blind maps are computed inside the measured field of view (a dark rim inside the inscribed disc
    # is not texture) and scored like every other row.
    est = shortcuts.fov_or_none(images) if fov and blind_names else None
    map_valid = valid if est is None else est
    for name in blind_names:  # class-blind floor: same images, masks, field of view and scoring
        score(f"blind:{name}", BLIND_STAGE,
              lambda n=name: shortcuts.blind_map(n, images, map_valid, seed=0).astype(np.float32))
    out_dir = out_dir or os.path.join(workdir, "cam_benchmark")
    paths = write_table(rows, columns, out_dir)
    figures = []
    if len(picks):
        display = images[picks].astype(np.float32) / 255.0
        titles = [f"{ds.patients[idx[p]]} {run.class_names[targets[p]]}" for p in picks]
        fig_stages = list(dict.fromkeys(s for _, s in plan if s != INPUT_STAGE)) or [INPUT_STAGE]
        for fs in fig_stages:
            cols = [(f"{m}" if s == fs else f"{m} ({s})", kept[(m, s)]) for m, s in plan
                    if s == fs or s == INPUT_STAGE or (m == "sc")]
            cols += [(f"blind:{b}", kept[(f"blind:{b}", BLIND_STAGE)]) for b in blind_names]
            figures.append(_grid_figure(display, masks[picks], titles, cols, os.path.join(out_dir, f"grid_{fs}.png")))
    meta = {"workdir": workdir, "checkpoint_step": run.step, "split": split, "indices": idx.tolist(),
            "thresholds": [float(t) for t in thresholds], "fov": fov, "faithfulness": faithfulness,
            "blind": list(blind_names),
            "columns": columns, "rows": rows, "figures": [os.path.basename(p) for p in figures], **paths}
    loop.write_json(os.path.join(out_dir, "cam_benchmark.json"), meta)
    return rows
