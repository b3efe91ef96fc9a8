"""Ablation sweeps (``lclsc ablate``): a grid of config overrides x split seeds x seeds, resumable, one table.

``run_ablation`` expands a grid into named runs under ``OUT/runs/<name>``. A run is one
*replicate*: a (split seed, training seed) pair. With ``folds=K`` it is a K-fold patient-wise
cross-validation whose folds are drawn with its split seed (``cross_validate``), so every frame
is a test frame once; without, it trains on the fixed patient-wise split of its split seed. Each
run is evaluated, its saliency maps are scored on its test frames with ``cam_benchmark``
(threshold-free localisation, class specificity, the ROAD gap), and its per-frame outcomes go to
``frames.npz``. ``results.json`` marks a finished run, so a re-run skips it. Runs go in-process
(``workers=0``) or as child processes; ``write_slurm_script`` writes a SLURM job array instead
(one run per task, each optionally multi-host).

``ablation_table`` pools the replicates of each group and compares groups with a reference
*paired by replicate* (same split seed: same folds, same test frames; same training seed), with
a hierarchical bootstrap over patients and frames (``evaluate.statistics``) and, for the training
variance, Student-t intervals over the replicate units. See ``docs/protocols.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lclsc_jax import data
from lclsc_jax.evaluate import bootstrap_by_class, hierarchical_bootstrap, paired_bootstrap
from lclsc_jax.evaluate.metrics import aggregate_folds
from lclsc_jax.protocols import cam_benchmark
from lclsc_jax.protocols import runs as runs_lib
from lclsc_jax.protocols.cross_validation import FOLD_PREDICTIONS, cross_validate, fold_name, format_ci, scalars
from lclsc_jax.protocols.grids import ABLATION_GRIDS
from lclsc_jax.protocols.runs import evaluate_run
from lclsc_jax.train import config as C
from lclsc_jax.train import loop, sharding
from lclsc_jax.train.reporting import log

__all__ = ["ABLATION_GRIDS", "ABLATION_TABLE_METRICS", "BLIND_TABLE_METRICS", "BOOTSTRAP_METRICS", "SALIENCY_METRICS",
           "ablation_command", "ablation_table", "collect_ablation", "expand_grid", "grid_defaults", "group_results",
           "load_plan",
           "load_run_frames", "paired_differences", "replicate_of", "run_ablation", "run_dir", "run_index", "run_one",
           "run_overrides", "write_plan", "write_slurm_script"]

#: Saliency scores kept per run (``<method>.<metric>``; the CSV holds every one).
SALIENCY_METRICS = ("pr_auc", "dice@area", "pointing_game", "specificity_corr", "specificity_gap", "road_gap",
                    "road_gap_margin", "road_gap_prob", "road_morf", "road_lerf", "dice@0.5", "dice@otsu", "iou@otsu",
                    "energy_pointing_game", "deletion_auc", "insertion_auc")
_HEADLINE = cam_benchmark.HEADLINE_METRICS
#: Columns of the Markdown tables: accuracy, then the threshold-free saliency headline of Grad-CAM and SC.
ABLATION_TABLE_METRICS = ("accuracy", "f1", "auroc", *[f"{m}.{k}" for m in ("gradcam", "sc") for k in _HEADLINE])
#: Frame-level outcomes whose intervals come from the hierarchical bootstrap (``frames.npz`` columns).
BOOTSTRAP_METRICS = ("accuracy", *[f"{m}.{k}" for m in ("gradcam", "sc") for k in _HEADLINE])
#: Columns of the class-blind floor table: each saliency column of the main table, per blind map
#: (``benchmark_cams`` adds the ``blind:<name>`` rows on the same test frames).
BLIND_TABLE_METRICS = ("pr_auc", "dice@area", "pointing_game", "road_gap")
PLAN_FILE = "plan.json"
RESULTS_FILE = "results.json"
FRAMES_FILE = "frames.npz"
GRID_KEYS = ("variants", "axes", "overrides", "seeds", "split_seeds", "base_config", "folds", "saliency_images",
             "road_percentages")
DEFAULT_ROAD_PERCENTAGES = (10, 30, 50, 70, 90)


def _value_name(v: Any) -> str:
    """A compact, filesystem-safe rendering of an override value."""
    s = f"{v:g}" if isinstance(v, float) else str(v)
    return "".join(c if c.isalnum() or c in ".-_" else "-" for c in s)


def _subgrids(grid: Any) -> list[Mapping[str, Any]]:
    """A grid or a list of grids as a list; shapes checked."""
    subs = list(grid) if isinstance(grid, (list, tuple)) else [grid]
    for g in subs:
        if not isinstance(g, Mapping) or not g.get("variants"):
            raise ValueError("a grid is a mapping with a non-empty 'variants' {name: {key: value}} "
                             f"(and optional 'axes' {{key: [values]}}), got {g!r}")
        bad = [k for k in g if k not in GRID_KEYS]
        if bad:
            raise ValueError(f"unknown grid keys {bad}; expected {', '.join(GRID_KEYS)}")
    return subs


def grid_defaults(grid: Any) -> dict[str, Any]:
    """The settings a grid suggests (its first sub-grid's): seeds, split_seeds, base_config, folds, ..."""
    first = _subgrids(grid)[0]
    return {k: first[k] for k in GRID_KEYS if k in first and k not in ("variants", "axes", "overrides")}


def expand_grid(grid: Any, seeds: Sequence[int] | None = None,
                split_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Runs of ``variants x product(axes) x split_seeds x seeds``: ``[{name, group, split_seed, seed, overrides}]``.

    ``seeds``: the training seeds of every sub-grid; None gives each sub-grid its own ``seeds``
    (else the first sub-grid's, else ``[0]``), so a preset can afford fewer seeds for its side
    ablations while ``--seeds`` on a cluster still sets them all.

    ``group`` is the variant plus its axis values (``lcl_sc__loss.tau=0.05``), ``name`` adds the
    replicate (``..__split=1__seed=0``; without ``split_seeds`` just ``..__seed=0`` and
    ``split_seed`` None: the config's ``data.split_seed``). ``defaults`` are the grid's
    ``overrides`` (weaker than a sweep's ``base_overrides``), ``overrides`` the variant's, the axis
    values, ``data.split_seed`` and the seed. Duplicate names are dropped; the order is fixed.
    """
    default_seeds = grid_defaults(grid).get("seeds", [0])
    if seeds is not None and not len(seeds):
        raise ValueError("need at least one seed")
    if split_seeds is not None and not len(split_seeds):
        raise ValueError("split_seeds must be None or a non-empty list")
    splits: list[int | None] = [None] if split_seeds is None else [int(s) for s in split_seeds]
    runs: dict[str, dict[str, Any]] = {}
    for g in _subgrids(grid):
        g_seeds = seeds if seeds is not None else g.get("seeds", default_seeds)
        if not len(g_seeds):
            raise ValueError("need at least one seed")
        axes = dict(g.get("axes") or {})
        for key, values in axes.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"axis {key!r} needs a non-empty list of values, got {values!r}")
        for variant, var_over in g["variants"].items():
            for combo in itertools.product(*axes.values()):
                point = dict(zip(axes, combo))
                group = "__".join([variant] + [f"{k}={_value_name(v)}" for k, v in point.items()])
                for split in splits:
                    for seed in g_seeds:
                        rep = ([] if split is None else [f"split={split}"]) + [f"seed={int(seed)}"]
                        name = "__".join([group, *rep])
                        overrides = {**dict(var_over), **point, **({} if split is None else {"data.split_seed": split}),
                                     "seed": int(seed)}
                        runs.setdefault(name, {"name": name, "group": group, "split_seed": split, "seed": int(seed),
                                               "defaults": dict(g.get("overrides") or {}), "overrides": overrides})
    return list(runs.values())


def write_plan(out_dir: str, runs: Sequence[Mapping[str, Any]], base_config: str,
               base_overrides: Mapping[str, Any] | None = None, folds: int | None = None,
               saliency_images: int = 16, faithfulness: bool = True,
               road_percentages: Sequence[float] = DEFAULT_ROAD_PERCENTAGES) -> str:
    """Write ``out_dir/plan.json`` (every run's spec; what ``run_index`` executes); return its path.

    ``folds``: K-fold CV per run (None or 0: the fixed split); ``saliency_images``: test frames
    scored per run and fold (0: every one).
    """
    for r in runs:  # fail now, not in a child process: every run's config must resolve
        C.load(base_config, run_overrides(r, base_overrides or {}))
    if folds is not None and int(folds) not in (0,) and int(folds) < 2:
        raise ValueError(f"folds must be >= 2 (or 0/None for the fixed split), got {folds}")
    if int(saliency_images) < 0:
        raise ValueError(f"saliency_images must be >= 0 (0 = every test frame), got {saliency_images}")
    plan = {"base_config": base_config, "base_overrides": dict(base_overrides or {}),
            "folds": int(folds) if folds else None,
            "saliency_images": int(saliency_images), "faithfulness": bool(faithfulness),
            "road_percentages": [float(p) for p in road_percentages], "runs": list(runs)}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PLAN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=2)
    os.replace(tmp, path)
    return path


def run_overrides(spec: Mapping[str, Any], base_overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides of a run: grid defaults < the sweep's ``base_overrides`` < variant, axes, split seed, seed."""
    return {**dict(spec.get("defaults") or {}), **dict(base_overrides), **dict(spec["overrides"])}


def load_plan(out_dir: str) -> dict[str, Any]:
    """The ``plan.json`` of an ablation folder."""
    path = os.path.join(out_dir, PLAN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out_dir} has no {PLAN_FILE}; start the ablation (or --slurm) first")
    with open(path) as f:
        return json.load(f)


def run_dir(out_dir: str, name: str) -> str:
    """Where run ``name`` of an ablation lives."""
    return os.path.join(out_dir, "runs", name)


def _is_complete(out_dir: str, spec: Mapping[str, Any], plan: Mapping[str, Any]) -> bool:
    """Whether ``results.json`` exists for this run; raise if it was made with other settings."""
    path = os.path.join(run_dir(out_dir, spec["name"]), RESULTS_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        res = json.load(f)
    mine = {"overrides": run_overrides(spec, plan["base_overrides"]), "base_config": plan["base_config"],
            "base_overrides": plan["base_overrides"], "folds": plan["folds"]}
    theirs = {k: res.get(k) for k in mine}
    if json.loads(json.dumps(mine)) != theirs:
        raise ValueError(f"run {spec['name']} in {out_dir} was made with other settings ({theirs}); "
                         "use a new output folder")
    return True


def _saliency_scores(workdir: str, contrastive: bool, images: int, faithfulness: bool, which: str = "best",
                     road_percentages: Sequence[float] = DEFAULT_ROAD_PERCENTAGES) -> dict[str, Any]:
    """Grad-CAM (all runs), SC (contrastive runs) and the class-blind maps scored on the run's test frames.

    ``images``: at most this many test frames (0: all). Writes ``WORKDIR/cam_benchmark`` (with the
    per-frame scores); returns ``{<method>.<metric>: mean}`` and ``<method>.error`` entries.
    """
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = C.from_dict(json.load(f))
    if not loop.load_dataset(cfg).has_masks:  # a user's folder, or a manifest without a mask column
        return {"note": "saliency benchmark skipped: the data has no masks"}
    methods = ("gradcam", "sc") if contrastive else ("gradcam",)
    rows = cam_benchmark.benchmark_cams(workdir, methods=methods, stages=("last",), max_images=int(images) or None,
                                        which=which, faithfulness=faithfulness, faithfulness_metrics=("road",),
                                        road_percentages=tuple(road_percentages), figure_images=0,
                                        out_dir=os.path.join(workdir, "cam_benchmark"), progress=False)
    out: dict[str, Any] = {}
    for row in rows:
        if row.get("error"):
            out[f"{row['method']}.error"] = row["error"]
            continue
        for m in SALIENCY_METRICS:
            if row.get(m) is not None:
                out[f"{row['method']}.{m}"] = row[m]
    return out


def _fold_frames(fold_dir: str, fold: int) -> dict[str, Any]:
    """One fold's (or a fixed-split run's) test frames: ids, correctness and the saliency columns by frame."""
    with np.load(os.path.join(fold_dir, FOLD_PREDICTIONS)) as z:
        probs, label, index, patient = z["probs"], z["label"], z["index"], z["patient"].astype(str)
    cols: dict[str, np.ndarray] = {"accuracy": (probs.argmax(axis=1) == label).astype(np.float64)}
    path = os.path.join(fold_dir, "cam_benchmark", cam_benchmark.FRAME_FILE)
    if os.path.exists(path):
        fr = cam_benchmark.load_frames(path)
        pos = {int(i): k for k, i in enumerate(index)}
        where = np.asarray([pos.get(int(i), -1) for i in fr["index"]])
        for (method, _stage, metric), v in fr["columns"].items():
            name = f"{method}.{metric}"
            if name in cols:  # one stage per method in an ablation; keep the first
                continue
            col = np.full(len(index), np.nan)
            col[where[where >= 0]] = v[where >= 0]
            cols[name] = col
    return {"index": index.astype(np.int64), "patient": patient, "label": label.astype(np.int64),
            "fold": np.full(len(index), fold, np.int64), "columns": cols}


def _write_run_frames(workdir: str, parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate the folds' frames into ``WORKDIR/frames.npz``; return the counts for ``results.json``."""
    names = list(dict.fromkeys(k for p in parts for k in p["columns"]))
    n = sum(len(p["index"]) for p in parts)
    values = np.full((len(names), n), np.nan)
    at = 0
    for p in parts:
        m = len(p["index"])
        for j, k in enumerate(names):
            if k in p["columns"]:
                values[j, at:at + m] = p["columns"][k]
        at += m
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("index", "patient", "label", "fold")}
    tmp = os.path.join(workdir, "frames.tmp.npz")
    np.savez(tmp, names=np.asarray(names, str), values=values, **cat)
    os.replace(tmp, os.path.join(workdir, FRAMES_FILE))
    sal = [j for j, k in enumerate(names) if k != "accuracy"]
    scored = np.isfinite(values[sal]).any(axis=0) if sal else np.zeros(n, bool)
    return {"n_frames": int(len(np.unique(cat["index"]))), "n_patients": int(len(np.unique(cat["patient"]))),
            "n_saliency_frames": int(len(np.unique(cat["index"][scored]))), "frames_file": FRAMES_FILE}


def load_run_frames(out_dir: str, result: Mapping[str, Any]) -> dict[str, Any] | None:
    """A run's ``frames.npz``: ``{index, patient, label, fold (N,), columns: {metric: (N,)}}``, or None without one."""
    path = os.path.join(run_dir(out_dir, result["name"]), result.get("frames_file") or FRAMES_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        out = {k: z[k] for k in ("index", "patient", "label", "fold")}
        out["columns"] = {str(k): z["values"][j] for j, k in enumerate(z["names"])}
    return out


def run_one(spec: Mapping[str, Any], out_dir: str, plan: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train (K-fold CV or the fixed split), evaluate, score the saliency of one replicate; write ``results.json``."""
    t0 = time.time()
    workdir = run_dir(out_dir, spec["name"])
    overrides = run_overrides(spec, plan["base_overrides"])
    cfg = C.load(plan["base_config"], overrides)
    contrastive = C.uses_gei(cfg)
    multihost = jax.process_count() > 1
    extra: dict[str, Any] = {}
    if plan["folds"]:
        summary = cross_validate(cfg, workdir, folds=int(plan["folds"]), seed=cfg.data.split_seed, progress=progress,
                                 figures=False)
        metrics = scalars(summary["pooled"])  # every frame once: the pooled predictions of the folds
        extra["fold_mean"] = dict(summary["mean"])
        fold_dirs = [os.path.join(workdir, fold_name(k)) for k in range(summary["n_folds"])]
        which = summary["checkpoint"]
        class_names = list(summary["class_names"])
    else:
        loop.train(cfg, workdir, progress=progress)
        m = evaluate_run(workdir, split="test", figures=False, n_boot=0)  # the tables bootstrap on their own
        metrics = scalars(m)
        which = "best"
        trained = runs_lib.load_run(workdir, which)
        ds = loop.load_dataset(cfg)
        res = runs_lib.predict(trained, ds, runs_lib.run_splits(workdir, cfg, ds)["test"])
        if jax.process_index() == 0:
            tmp = os.path.join(workdir, "predictions.tmp.npz")
            np.savez(tmp, probs=res["probs"], label=res["label"], index=res["index"],
                     patient=np.asarray(res["patient"]).astype(str))
            os.replace(tmp, os.path.join(workdir, FOLD_PREDICTIONS))
        fold_dirs = [workdir]
        class_names = list(trained.class_names)
    sal: dict[str, Any] = {}
    if multihost:
        sal["note"] = "saliency benchmark skipped in multi-host runs"
    else:
        per_fold = [_saliency_scores(d, contrastive, int(plan["saliency_images"]), bool(plan["faithfulness"]), which,
                                     plan.get("road_percentages", DEFAULT_ROAD_PERCENTAGES)) for d in fold_dirs]
        keys = sorted({k for s in per_fold for k in s})
        for k in keys:
            vals = [s[k] for s in per_fold if k in s]
            sal[k] = vals[0] if isinstance(vals[0], str) else float(np.mean(vals))
    counts: dict[str, Any] = {}
    frames = None
    if jax.process_index() == 0:  # the prediction files are written by process 0
        counts = _write_run_frames(workdir, [_fold_frames(d, k) for k, d in enumerate(fold_dirs)])
        frames = load_run_frames(out_dir, {"name": spec["name"], **counts})
    if frames is not None:  # frame-pooled means (every scored frame counts once), as the bootstrap sees them
        for k, v in frames["columns"].items():
            if k != "accuracy" and k in sal and np.isfinite(v).any():
                sal[k] = float(np.nanmean(v))
    results = {"name": spec["name"], "group": spec["group"], "seed": spec["seed"],
               "split_seed": int(cfg.data.split_seed), "overrides": overrides,
               "base_config": plan["base_config"], "base_overrides": plan["base_overrides"], "folds": plan["folds"],
               "n_folds": len(fold_dirs) if plan["folds"] else 0, "class_names": class_names, **counts, **extra,
               "metrics": {**metrics, **sal}, "seconds": round(time.time() - t0, 1)}
    loop.write_json(os.path.join(workdir, RESULTS_FILE), results)
    return results


def run_index(out_dir: str, index: int, progress: bool = False) -> dict[str, Any] | None:
    """Run entry ``index`` of ``out_dir/plan.json`` unless already complete (the SLURM array task / child entry).

    Starts ``jax.distributed`` first when the environment asks for it (``LCLSC_COORDINATOR`` or
    ``LCLSC_DISTRIBUTED=1``; see ``lclsc_jax.train.sharding``). Returns the results, or None if skipped.
    """
    plan = load_plan(out_dir)
    runs = plan["runs"]
    if not 0 <= int(index) < len(runs):
        raise ValueError(f"run index {index} out of range: {out_dir} plans {len(runs)} runs (0..{len(runs) - 1})")
    spec = runs[int(index)]
    if _is_complete(out_dir, spec, plan):
        return None
    sharding.maybe_initialize_distributed()
    return run_one(spec, out_dir, plan, progress=progress)


def child_env(workers: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a child run: with ``workers > 1``, XLA/BLAS limited to one thread each."""
    env = dict(os.environ if base is None else base)
    if workers > 1:
        flags = env.get("XLA_FLAGS", "")
        extra = [f for f in ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1") if f not in flags]
        env["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _child_command(out_dir: str, index: int) -> list[str]:
    """The command that runs plan entry ``index`` in a fresh Python process."""
    code = ("import sys; from lclsc_jax.protocols.ablation import run_index; "
            "run_index(sys.argv[1], int(sys.argv[2]), progress=True)")
    return [sys.executable, "-c", code, out_dir, str(int(index))]


def _run_child(out_dir: str, index: int, name: str, workers: int) -> tuple[str, int]:
    """Run one plan entry as a child process, its output in ``runs/<name>/log.txt``; return (name, exit code)."""
    wd = run_dir(out_dir, name)
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "log.txt"), "w") as log:
        proc = subprocess.run(_child_command(out_dir, index), stdout=log, stderr=subprocess.STDOUT,
                              env=child_env(workers), check=False)
    return name, proc.returncode


def _log_tail(out_dir: str, name: str, lines: int = 5) -> str:
    """The last lines of a run's ``log.txt``."""
    path = os.path.join(run_dir(out_dir, name), "log.txt")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return "".join(f.readlines()[-lines:]).strip()


def run_ablation(grid: Any, out_dir: str, workers: int = 1, seeds: Sequence[int] | None = None,
                 base_config: str | None = None, folds: int | None = None,
                 base_overrides: Mapping[str, Any] | None = None, saliency_images: int | None = None,
                 faithfulness: bool = True, progress: bool = True, split_seeds: Sequence[int] | None = None,
                 road_percentages: Sequence[float] | None = None, reference: str = "ce",
                 n_boot: int = 2000) -> list[dict[str, Any]]:
    """Run every run of ``grid x split_seeds x seeds`` not yet complete, then write and return the table rows.

    ``grid``: a grid mapping (see ``ABLATION_GRIDS``), a list of them, or a name of ``ABLATION_GRIDS``;
    its own ``seeds``/``split_seeds``/``base_config``/``folds``/``saliency_images``/``road_percentages``
    are the defaults of the arguments left None. ``workers=0`` runs in this process; ``workers >= 1``
    runs each in a child process, ``workers`` at a time (threads limited when > 1). ``folds=K``
    makes each run a K-fold patient-wise CV over its split seed (0: the fixed split);
    ``saliency_images=0`` scores every test frame. A failed run is reported and left incomplete
    (re-running retries it).
    """
    if isinstance(grid, str):
        if grid not in ABLATION_GRIDS:
            raise ValueError(f"unknown ablation grid {grid!r}; expected one of {sorted(ABLATION_GRIDS)}")
        grid = ABLATION_GRIDS[grid]
    d = grid_defaults(grid)
    seeds = None if seeds is None else list(seeds)  # None: each sub-grid's own (expand_grid)
    split_seeds = split_seeds if split_seeds is not None else d.get("split_seeds")
    base_config = base_config or d.get("base_config", "demo")
    folds = d.get("folds") if folds is None else folds
    saliency_images = d.get("saliency_images", 16) if saliency_images is None else saliency_images
    road_percentages = road_percentages or d.get("road_percentages", DEFAULT_ROAD_PERCENTAGES)
    runs = expand_grid(grid, seeds, split_seeds)
    write_plan(out_dir, runs, base_config, base_overrides, folds, saliency_images, faithfulness, road_percentages)
    plan = load_plan(out_dir)
    todo = [(i, r) for i, r in enumerate(runs) if not _is_complete(out_dir, r, plan)]
    log(f"[ablate] {len(runs)} runs in {out_dir}: {len(runs) - len(todo)} complete, {len(todo)} to run "
         f"({'in-process' if workers <= 0 else f'{workers} worker(s)'})", progress)
    failed: list[str] = []
    if workers <= 0:
        for i, r in todo:
            log(f"[ablate] run {r['name']}", progress)
            run_one(r, out_dir, plan, progress=False)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_run_child, out_dir, i, r["name"], workers) for i, r in todo]
            for fut in concurrent.futures.as_completed(futures):
                name, rc = fut.result()
                if rc != 0:
                    failed.append(name)
                    log(f"[ablate] run {name} FAILED (exit {rc}):\n{_log_tail(out_dir, name)}", progress)
                else:
                    log(f"[ablate] run {name} done", progress)
    rows = ablation_table(out_dir, reference=reference, n_boot=n_boot)
    if failed:
        log(f"[ablate] {len(failed)} run(s) failed: {failed}; re-run the same command to retry them", progress)
    return rows


# ------------------------------------------------------------------------------ tables


def collect_ablation(out_dir: str) -> tuple[list[dict[str, Any]], list[str]]:
    """``(results of the plan's complete runs, names of its incomplete runs)`` from the shared output folder."""
    plan = load_plan(out_dir)
    done, missing = [], []
    for spec in plan["runs"]:
        if _is_complete(out_dir, spec, plan):
            with open(os.path.join(run_dir(out_dir, spec["name"]), RESULTS_FILE)) as f:
                done.append(json.load(f))
        else:
            missing.append(spec["name"])
    return done, missing


def replicate_of(result: Mapping[str, Any]) -> tuple[int | None, int]:
    """The replicate unit of a run: ``(split seed, training seed)`` (split seed None in results that lack it)."""
    split = result.get("split_seed")
    return (None if split is None else int(split), int(result["seed"]))


def _rep_key(rep: tuple[int | None, int]) -> tuple[int, int]:
    """Sort key of a replicate (None first)."""
    return (-1 if rep[0] is None else rep[0], rep[1])


def group_results(results: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per group (runs differing only in the replicate): what stands behind it and t-statistics over replicates.

    ``{group, n_replicates, replicates, n_seeds, seeds, split_seeds, folds, n_patients, n_frames,
    n_saliency_frames, metrics: {name: stats}, errors}``; ``metrics`` are ``aggregate_folds``
    statistics over the replicate units: a Student-t interval over independent training runs
    (the training variance on these patients; the data's variance is the bootstrap's).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    rows = []
    for group, rs in groups.items():
        stats_ = aggregate_folds([r["metrics"] for r in rs], confidence=confidence)["metrics"]
        errors = sorted({str(v) for r in rs for k, v in r["metrics"].items() if k.endswith(".error")})
        reps = sorted({replicate_of(r) for r in rs}, key=_rep_key)

        def most(key: str, rs: Sequence[Mapping[str, Any]] = rs) -> int | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return max(vals) if vals else None

        rows.append({"group": group, "n_replicates": len(reps), "replicates": [list(x) for x in reps],
                     "n_seeds": len({x[1] for x in reps}), "seeds": sorted({x[1] for x in reps}),
                     "split_seeds": sorted({x[0] for x in reps if x[0] is not None}),
                     "folds": most("n_folds") or rs[0].get("folds") or 0, "n_patients": most("n_patients"),
                     "n_frames": most("n_frames"), "n_saliency_frames": most("n_saliency_frames"),
                     "metrics": stats_, "errors": errors})
    return rows


def paired_differences(results: Sequence[Mapping[str, Any]], reference: str = "ce",
                       confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per group, ``metric(group, replicate) - metric(reference, replicate)`` over common replicates: mean/std/t-CI.

    A replicate is ``(split seed, training seed)`` (``replicate_of``). Returns ``{group: {"replicates",
    "seeds", "metrics": {name: stats}}}`` for every group other than ``reference`` sharing at least
    two replicates with it (the statistics of ``aggregate_folds``: the training variance of the
    difference; the data's variance is ``ablation_table``'s paired bootstrap).
    """
    by: dict[str, dict[tuple[int | None, int], Mapping[str, Any]]] = {}
    for r in results:
        by.setdefault(r["group"], {})[replicate_of(r)] = r["metrics"]
    if reference not in by:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for group, runs in by.items():
        reps = sorted(set(runs) & set(by[reference]), key=_rep_key)
        if group == reference or len(reps) < 2:
            continue
        diffs = []
        for rep in reps:
            a, b = runs[rep], by[reference][rep]
            diffs.append({k: float(a[k]) - float(b[k]) for k in a
                          if isinstance(a[k], (int, float)) and isinstance(b.get(k), (int, float))})
        out[group] = {"replicates": [list(x) for x in reps], "seeds": sorted({x[1] for x in reps}),
                      "metrics": aggregate_folds(diffs, confidence=confidence, clip_rates=False)["metrics"]}
    return out


# ---------------------------------------------------------------- frames and bootstrap


def _stack_frames(frames: Sequence[Mapping[str, Any] | None], metrics: Sequence[str]) -> dict[str, Any] | None:
    """Align runs' frames on the record index: ``{index, patient, label, columns: {metric: (R, N)}}``; NaN = not scored.

    None when no run has frames. Raises if two runs give a frame different patients or labels
    (they were not made on the same data, so pairing by frame would be meaningless).
    """
    have = [f for f in frames if f is not None]
    if not have:
        return None
    index = np.unique(np.concatenate([f["index"] for f in have]))
    patient = np.full(len(index), "", dtype=object)
    label = np.full(len(index), -1, np.int64)
    cols = {m: np.full((len(frames), len(index)), np.nan) for m in metrics}
    for r, f in enumerate(frames):
        if f is None:
            continue
        pos = np.searchsorted(index, f["index"])
        seen = patient[pos] != ""
        if np.any(patient[pos][seen] != f["patient"][seen]) or np.any(label[pos][seen] != f["label"][seen]):
            raise ValueError("runs disagree on the patient or label of a frame: they were not made on the same data")
        patient[pos], label[pos] = f["patient"], f["label"]
        for m in metrics:
            if m in f["columns"]:
                cols[m][r, pos] = f["columns"][m]
    return {"index": index, "patient": patient.astype(str), "label": label, "columns": cols}


def _class_name(c: int, names: Sequence[str] | None) -> str:
    """The name of class ``c`` (its index when unnamed)."""
    return str(names[c]) if names and 0 <= c < len(names) else str(c)


def _bootstrap_block(stack: Mapping[str, Any], metrics: Sequence[str], other: Mapping[str, Any] | None,
                     class_names: Sequence[str] | None, per_class: Sequence[str], n_boot: int,
                     confidence: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``({metric: bootstrap}, {class: {metric: bootstrap}})`` of one group (``other``: paired with the reference)."""
    kw = dict(n_boot=n_boot, confidence=confidence, seed=0)
    overall: dict[str, Any] = {}
    classes: dict[str, dict[str, Any]] = {}
    for m in metrics:
        x = stack["columns"][m]
        if other is None:
            if not np.isfinite(x).any():
                continue
            overall[m] = hierarchical_bootstrap(x, stack["patient"], strata=stack["label"], **kw)
        else:
            y = other["columns"][m]
            if not (np.isfinite(x) & np.isfinite(y)).any():
                continue
            overall[m] = paired_bootstrap(x, y, stack["patient"], strata=stack["label"], **kw)
        if m in per_class:
            res = bootstrap_by_class(x, stack["patient"], stack["label"],
                                     paired_with=None if other is None else y, **kw)
            for c, v in res.items():
                classes.setdefault(_class_name(c, class_names), {})[m] = v
    return overall, classes


def _frame_statistics(out_dir: str, results: Sequence[Mapping[str, Any]], reference: str, n_boot: int,
                      confidence: float) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Bootstrap per group and paired with ``reference`` per group, from the runs' ``frames.npz``; with notes."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    frames = {r["name"]: load_run_frames(out_dir, r) for r in results}
    names = next((r.get("class_names") for r in results if r.get("class_names")), None)
    cols = list(dict.fromkeys(k for f in frames.values() if f is not None for k in f["columns"]))
    blind = [k for k in cols if k.startswith("blind:") and k.split(".", 1)[1] in BLIND_TABLE_METRICS]
    group_metrics = [m for m in (*BOOTSTRAP_METRICS, *blind) if m in cols]
    paired_metrics = [m for m in BOOTSTRAP_METRICS if m in cols]
    per_group: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    notes: list[str] = []
    for group, rs in groups.items():
        rs = sorted(rs, key=lambda r: _rep_key(replicate_of(r)))
        try:
            stack = _stack_frames([frames[r["name"]] for r in rs], group_metrics)
        except ValueError as e:
            notes.append(f"{group}: no bootstrap ({e})")
            continue
        if stack is None:
            continue
        overall, classes = _bootstrap_block(stack, group_metrics, None, names, BOOTSTRAP_METRICS, n_boot, confidence)
        scored = np.isfinite(np.stack([v for k, v in stack["columns"].items() if k != "accuracy"] or
                                      [np.full((1, len(stack["index"])), np.nan)])).any(axis=(0, 1))
        per_group[group] = {"bootstrap": overall, "per_class": classes,
                            "n_patients": int(len(np.unique(stack["patient"]))),
                            "n_frames": int(len(stack["index"])), "n_saliency_frames": int(scored.sum())}
    ref = {replicate_of(r): r for r in groups.get(reference, [])}
    for group, rs in groups.items():
        if group == reference:
            continue
        mine = {replicate_of(r): r for r in rs}
        reps = sorted(set(mine) & set(ref), key=_rep_key)
        pairs = [(frames[mine[x]["name"]], frames[ref[x]["name"]]) for x in reps]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not pairs:
            continue
        try:
            both = _stack_frames([a for a, _ in pairs] + [b for _, b in pairs], paired_metrics)
        except ValueError as e:
            notes.append(f"{group} − {reference}: no paired bootstrap ({e})")
            continue
        k = len(pairs)
        a_stack = {**both, "columns": {m: v[:k] for m, v in both["columns"].items()}}
        b_stack = {**both, "columns": {m: v[k:] for m, v in both["columns"].items()}}
        overall, classes = _bootstrap_block(a_stack, paired_metrics, b_stack, names, BOOTSTRAP_METRICS, n_boot,
                                            confidence)
        paired[group] = {"replicates": [list(x) for x in reps], "bootstrap": overall, "per_class": classes,
                         "n_patients": int(len(np.unique(both["patient"]))), "n_frames": int(len(both["index"]))}
    return per_group, paired, notes


# ------------------------------------------------------------------------------ writing


def _fmt_boot(res: Mapping[str, Any] | None, signed: bool = False, digits: int = 3) -> str:
    """``estimate [ci_low, ci_high]`` of a bootstrap result (``–`` when missing)."""
    if not res or res.get("estimate") is None:
        return "–"
    f = f"{'+' if signed else ''}.{digits}f"
    if res.get("ci_low") is None:
        return format(res["estimate"], f)
    return f"{format(res['estimate'], f)} [{format(res['ci_low'], f)}, {format(res['ci_high'], f)}]"


def _n(v: Any) -> str:
    """A count cell (``–`` when unknown)."""
    return "–" if v is None else str(v)


def _blind_floor_lines(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str], confidence: float,
                       boot: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the class-blind floor: per group, Grad-CAM/SC next to each ``blind:<name>`` map."""
    blind = list(dict.fromkeys(k.split(".", 1)[0] for k in metric_names if k.startswith("blind:")))
    if not blind:
        return []
    pct = int(confidence * 100)
    lines = ["", "## Class-blind floor", "",
             "Maps that never see the label (`blind:*`), scored on the same test frames with the same masks and "
             f"field of view: mean [{pct}% hierarchical bootstrap interval] where the runs kept per-frame scores, "
             f"else mean ± std [{pct}% t-interval] over replicates. A saliency method localises the evidence only "
             "where it beats these."]
    for metric in BLIND_TABLE_METRICS:
        methods = [m for m in ("gradcam", "sc", *blind) if f"{m}.{metric}" in metric_names]
        if not any(m.startswith("blind:") for m in methods):
            continue
        lines += ["", f"`{metric}`:", "", "| run | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for row in rows:
            b = boot.get(row["group"], {}).get("bootstrap", {})
            cells = [_fmt_boot(b[f"{m}.{metric}"]) if f"{m}.{metric}" in b
                     else format_ci(row["metrics"].get(f"{m}.{metric}")) for m in methods]
            lines.append(f"| {row['group']} | " + " | ".join(cells) + " |")
    return lines


def _write_csvs(out_dir: str, results: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                metric_names: Sequence[str], paired: Mapping[str, Any], reference: str) -> None:
    """``ablation_runs.csv`` (one row per run), ``ablation.csv`` (per group), ``ablation_paired.csv`` (bootstrap)."""
    with open(os.path.join(out_dir, "ablation_runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "group", "split_seed", "seed", "folds", "n_patients", "n_frames", "n_saliency_frames",
                    "seconds", *metric_names])
        for r in results:
            w.writerow([r["name"], r["group"], r.get("split_seed", ""), r["seed"], r.get("n_folds", ""),
                        r.get("n_patients", ""), r.get("n_frames", ""), r.get("n_saliency_frames", ""),
                        r.get("seconds"), *[r["metrics"].get(k, "") for k in metric_names]])
    stats_keys = ("mean", "std", "ci_low", "ci_high")
    with open(os.path.join(out_dir, "ablation.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n_replicates", "n_seeds", "n_split_seeds", "folds", "n_patients", "n_frames",
                    "n_saliency_frames", *[f"{k}_{s}" for k in metric_names for s in (*stats_keys, "boot_low",
                                                                                       "boot_high")]])
        for row in rows:
            cells = []
            for k in metric_names:
                st = row["metrics"].get(k, {})
                b = row.get("bootstrap", {}).get(k, {})
                cells += ["" if st.get(s) is None else st[s] for s in stats_keys]
                cells += ["" if b.get(s) is None else b[s] for s in ("ci_low", "ci_high")]
            w.writerow([row["group"], row["n_replicates"], row["n_seeds"], len(row["split_seeds"]) or "",
                        row["folds"], _n(row["n_patients"]).replace("–", ""), _n(row["n_frames"]).replace("–", ""),
                        _n(row["n_saliency_frames"]).replace("–", ""), *cells])
    with open(os.path.join(out_dir, "ablation_paired.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = ("estimate", "ci_low", "ci_high", "se", "mean_a", "mean_b", "n_replicates", "n_patients", "n_frames")
        w.writerow(["group", "reference", "class", "metric", *keys])
        for group, d in paired.items():
            blocks = [("all", d.get("bootstrap", {}))] + list(d.get("per_class", {}).items())
            for cls, block in blocks:
                for metric, res in block.items():
                    w.writerow([group, reference, cls, metric, *["" if res.get(k) is None else res[k] for k in keys]])


def ablation_table(out_dir: str, confidence: float = 0.95, reference: str = "ce",
                   n_boot: int = 2000) -> list[dict[str, Any]]:
    """Collect the runs; write ``ablation_runs.csv``, ``ablation.csv``, ``ablation_paired.csv``, ``.md``, ``.json``.

    Per group: what stands behind it (replicates, split seeds, seeds, folds, patients, frames,
    saliency frames), the hierarchical bootstrap over patients then frames of each frame-level
    metric (``BOOTSTRAP_METRICS``, averaged over the replicates, stratified by class; per class in
    the json), and t-intervals over replicates. Paired with ``reference`` by replicate: the
    bootstrap of the per-frame differences and the t-interval of the replicate differences.
    """
    results, missing = collect_ablation(out_dir)
    rows = group_results(results, confidence)
    per_group, paired_boot, notes = _frame_statistics(out_dir, results, reference, n_boot, confidence)
    for row in rows:
        g = per_group.get(row["group"], {})
        row["bootstrap"] = g.get("bootstrap", {})
        row["per_class"] = g.get("per_class", {})
        for k in ("n_patients", "n_frames", "n_saliency_frames"):
            if g.get(k) is not None:
                row[k] = g[k]
    paired_t = paired_differences(results, reference, confidence)
    paired = {}
    for group in dict.fromkeys([*paired_boot, *paired_t]):
        paired[group] = {**paired_t.get(group, {}), **paired_boot.get(group, {})}
        paired[group].setdefault("replicates", paired_t.get(group, {}).get("replicates"))
        paired[group].setdefault("seeds", sorted({x[1] for x in paired[group]["replicates"] or []}))
    metric_names: list[str] = []
    for r in results:
        metric_names += [k for k, v in r["metrics"].items() if k not in metric_names and isinstance(v, (int, float))]
    _write_csvs(out_dir, results, rows, metric_names, paired, reference)

    pct = int(confidence * 100)
    boot_cols = [c for c in BOOTSTRAP_METRICS if any(c in row["bootstrap"] for row in rows)]
    t_cols = [c for c in ABLATION_TABLE_METRICS if c in metric_names]
    lines = [f"# Ablation ({len(results)} runs)", "",
             "A replicate is one (split seed, training seed) pair"
             + (f"; each is a {rows[0]['folds']}-fold patient-wise cross-validation over its split seed, so every "
                "frame is a test frame once per replicate" if rows and rows[0]["folds"] else
                "; each trains on the fixed patient-wise split of its split seed")
             + ". Runs of one group differ only in the replicate; groups are compared on the same replicates "
             "(same folds, same test frames).", "", "## What stands behind each row", "",
             "| run | split seeds | training seeds | replicates | folds | patients | frames | saliency frames |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['group']} | {', '.join(map(str, row['split_seeds'])) or '–'} | "
                     f"{', '.join(map(str, row['seeds']))} | {row['n_replicates']} | {row['folds'] or '–'} | "
                     f"{_n(row['n_patients'])} | {_n(row['n_frames'])} | {_n(row['n_saliency_frames'])} |")
    if boot_cols:
        lines += ["", f"## Per variant: mean [{pct}% hierarchical bootstrap interval]", "",
                  f"Patients resampled within each class, then frames within each drawn patient ({n_boot} resamples); "
                  "each resample's number is the average over the replicates of their frame means. The interval is "
                  "the data's variance (other patients, other frames) for these trained models.", "",
                  "| run | " + " | ".join(boot_cols) + " |", "|---|" + "---|" * len(boot_cols)]
        for row in rows:
            lines.append(f"| {row['group']} | " + " | ".join(_fmt_boot(row["bootstrap"].get(c)) for c in boot_cols)
                         + " |")
    boot_pairs = {g: d for g, d in paired.items() if d.get("bootstrap")}
    if boot_pairs:
        lines += ["", f"## Paired difference to `{reference}`: mean [{pct}% hierarchical bootstrap interval]", "",
                  "Per frame, the group's outcome minus the reference's on the same frame in the same replicate; "
                  "patients and frames resampled as above. An interval excluding 0 is a difference at that level.",
                  "", "| run | replicates | patients | frames | " + " | ".join(boot_cols) + " |",
                  "|---|---|---|---|" + "---|" * len(boot_cols)]
        for group, d in boot_pairs.items():
            lines.append(f"| {group} − {reference} | {len(d['replicates'])} | {d['n_patients']} | {d['n_frames']} | "
                         + " | ".join(_fmt_boot(d["bootstrap"].get(c), signed=True) for c in boot_cols) + " |")
        lines += ["", "Smallest difference the study could detect (80% power, two-sided 5%: 2.80 x the bootstrap "
                  "standard error of each paired difference; `evaluate.detectable_difference`). An interval that "
                  "includes 0 rules out differences much larger than this, not the difference itself.", "",
                  "| run | " + " | ".join(boot_cols) + " |", "|---|" + "---|" * len(boot_cols)]
        for group, d in boot_pairs.items():
            cells = [d["bootstrap"].get(c, {}).get("detectable") if d["bootstrap"].get(c) else None for c in boot_cols]
            lines.append(f"| {group} − {reference} | " + " | ".join("–" if v is None else f"±{v:.3f}" for v in cells)
                         + " |")
        class_metrics = [c for c in ("accuracy", "gradcam.dice@area", "sc.dice@area") if c in boot_cols]
        classes = list(dict.fromkeys(c for d in boot_pairs.values() for c in d.get("per_class", {})))
        if classes and class_metrics:
            lines += ["", f"### Per class (patients of each class; paired difference to `{reference}`)", "",
                      "| run | metric | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
            for group, d in boot_pairs.items():
                for m in class_metrics:
                    cells = [_fmt_boot(d["per_class"].get(c, {}).get(m), signed=True) for c in classes]
                    if any(c != "–" for c in cells):  # e.g. sc against a ce reference: nothing to pair
                        lines.append(f"| {group} − {reference} | {m} | " + " | ".join(cells) + " |")
    lines += ["", f"## Training variance: mean ± std [{pct}% t-interval] over replicates", "",
              "One number per replicate (its pooled test frames); the t-interval treats the replicates as independent "
              "training runs. It leaves the data's variance out (see the bootstrap).", "",
              "| run | replicates | " + " | ".join(t_cols) + " |", "|---|---|" + "---|" * len(t_cols)]
    for row in rows:
        lines.append(f"| {row['group']} | {row['n_replicates']} | "
                     + " | ".join(format_ci(row["metrics"].get(c)) for c in t_cols) + " |")
    t_pairs = {g: d for g, d in paired.items() if d.get("metrics")}
    if t_pairs:
        lines += ["", f"Paired difference to `{reference}` by replicate (mean ± std [{pct}% t-interval] of the "
                  "replicate differences):", "",
                  "| run | replicates | " + " | ".join(t_cols) + " |", "|---|---|" + "---|" * len(t_cols)]
        for group, d in t_pairs.items():
            lines.append(f"| {group} − {reference} | {len(d['replicates'])} | "
                         + " | ".join(format_ci(d["metrics"].get(c), signed=True) for c in t_cols) + " |")
    floor_names = list(dict.fromkeys([*metric_names, *(k for row in rows for k in row["bootstrap"])]))
    lines += _blind_floor_lines(rows, floor_names, confidence, per_group)
    if missing:
        lines += ["", f"Incomplete runs ({len(missing)}): " + ", ".join(missing)]
    errors = sorted({e for row in rows for e in row["errors"]})
    if errors:
        lines += ["", "Saliency errors: " + "; ".join(errors)]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "ablation.json"), "w") as f:
        json.dump({"rows": rows, "paired_vs_reference": paired, "reference": reference, "runs": results,
                   "missing": missing, "notes": notes,
                   "settings": {"confidence": confidence, "n_boot": int(n_boot), "levels": "patients+frames",
                                "stratified": True, "seed": 0}}, f, indent=2)
    return rows


# ------------------------------------------------------------------------------- SLURM


def write_slurm_script(out_dir: str, n_runs: int | None = None, command: str = "python experiments/ablate.py",
                       job_name: str = "lclsc-ablation", time_limit: str = "04:00:00", cpus_per_task: int = 8,
                       gpus_per_node: int = 0, nodes: int = 1, partition: str | None = None,
                       max_parallel: int | None = None) -> str:
    """Write ``out_dir/ablation.slurm``: a job array with one plan entry per task; return its path.

    Each task runs ``COMMAND --out OUT_DIR --run-index $SLURM_ARRAY_TASK_ID``; finished runs are
    skipped, so the array can be resubmitted. With ``nodes > 1`` each run is multi-host: ``srun``
    starts one process per node and ``LCLSC_DISTRIBUTED=1`` lets ``jax.distributed`` read SLURM's
    environment. Gather with ``COMMAND --out OUT_DIR --collect``.
    """
    if n_runs is None:
        n_runs = len(load_plan(out_dir)["runs"])
    if n_runs < 1:
        raise ValueError("the plan has no runs")
    out = os.path.abspath(out_dir)
    array = f"0-{n_runs - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --array={array}",
             f"#SBATCH --output={out}/slurm/%A_%a.out", f"#SBATCH --time={time_limit}",
             f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={cpus_per_task}"]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["", "set -euo pipefail", f"mkdir -p {out}/slurm",
              "# One ablation run per array task (the plan is OUT/plan.json); finished runs are skipped.",
              "# Multi-host runs (--nodes > 1): one process per node; jax.distributed reads SLURM's variables.",
              "# Without SLURM set LCLSC_COORDINATOR=host:port LCLSC_NUM_PROCESSES=N LCLSC_PROCESS_ID=i instead."]
    if nodes > 1:
        lines.append("export LCLSC_DISTRIBUTED=1")
    lines += [f"srun {command} --out {out} --run-index ${{SLURM_ARRAY_TASK_ID}}", "",
              f"# when all tasks are done: {command} --out {out} --collect"]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "ablation.slurm")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------- command line


def ablation_command(args: argparse.Namespace) -> int:
    """Run, plan for SLURM, run one plan entry, or collect an ablation, as ``args`` says; exit code."""
    reference, n_boot = getattr(args, "reference", "ce"), getattr(args, "n_boot", 2000)
    if args.run_index is not None:
        res = run_index(args.out, args.run_index, progress=True)
        print("already complete, skipped" if res is None else json.dumps(res["metrics"], indent=1))
        return 0
    if args.collect:
        rows = ablation_table(args.out, reference=reference, n_boot=n_boot)
        with open(os.path.join(args.out, "ablation.md")) as f:
            print(f.read())
        return 0 if rows else 1
    if args.grid:
        with open(args.grid) as f:
            grid = json.load(f)
    else:
        grid = ABLATION_GRIDS[args.preset]
    d = grid_defaults(grid)
    seeds = args.seeds  # None: each sub-grid's own seeds
    split_seeds = getattr(args, "split_seeds", None) or d.get("split_seeds")
    base = args.config or d.get("base_config", "demo")
    base_overrides = C.parse_overrides(args.set)
    if "data.source" in base_overrides:  # the child runs may start in another working directory
        base_overrides["data.source"] = data.source_path(base_overrides["data.source"])
    folds = d.get("folds") if args.folds is None else args.folds
    images = d.get("saliency_images", 16) if args.saliency_images is None else args.saliency_images
    common = dict(base_overrides=base_overrides, folds=folds, saliency_images=images,
                  faithfulness=not args.no_faithfulness,
                  road_percentages=d.get("road_percentages", DEFAULT_ROAD_PERCENTAGES))
    if args.slurm:
        runs = expand_grid(grid, seeds, split_seeds)
        write_plan(args.out, runs, base, **common)
        path = write_slurm_script(args.out, len(runs), command=args.slurm_command, time_limit=args.time,
                                  cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node,
                                  nodes=args.nodes, partition=args.partition, max_parallel=args.max_parallel)
        print(f"{len(runs)} runs planned; submit with: sbatch {path}")
        return 0
    run_ablation(grid, args.out, workers=args.workers, seeds=seeds, base_config=base, split_seeds=split_seeds,
                 reference=reference, n_boot=n_boot, **common)
    with open(os.path.join(args.out, "ablation.md")) as f:
        print(f.read())
    return 0
