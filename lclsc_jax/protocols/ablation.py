"""Ablation sweeps (``lclsc ablate``): a grid of config overrides x seeds, resumable, one table.

``run_ablation`` expands a grid into named runs under ``OUT/runs/<name>``; each run trains on
the fixed patient-wise split (or a k-fold CV), is evaluated, and its saliency maps are scored
with ``cam_benchmark``; ``results.json`` marks a finished run, so a re-run skips it. Runs go
in-process (``workers=0``) or as child processes; ``write_slurm_script`` writes a SLURM job
array instead (one run per task, each optionally multi-host). See ``docs/protocols.md``.
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
from lclsc_jax.evaluate.metrics import aggregate_folds
from lclsc_jax.protocols import cam_benchmark
from lclsc_jax.protocols.cross_validation import cross_validate, fold_name, format_ci, scalars
from lclsc_jax.protocols.grids import ABLATION_GRIDS
from lclsc_jax.protocols.runs import evaluate_run
from lclsc_jax.train import config as C
from lclsc_jax.train import loop, sharding
from lclsc_jax.train.reporting import log

__all__ = ["ABLATION_GRIDS", "ABLATION_TABLE_METRICS", "BLIND_TABLE_METRICS", "SALIENCY_METRICS", "ablation_command",
           "ablation_table",
           "collect_ablation", "expand_grid", "group_results", "load_plan", "paired_differences", "run_ablation",
           "run_dir", "run_index", "run_one", "run_overrides", "write_plan", "write_slurm_script"]

SALIENCY_METRICS = ("dice@0.5", "dice@otsu", "iou@otsu", "dice@area", "pr_auc", "pointing_game",
                    "energy_pointing_game", "deletion_auc", "insertion_auc")
#: Columns of the Markdown ablation table (the CSV holds every metric).
ABLATION_TABLE_METRICS = ("accuracy", "f1", "auroc", "gradcam.dice@otsu", "gradcam.pointing_game",
                          "gradcam.deletion_auc", "sc.dice@otsu", "sc.pointing_game", "sc.deletion_auc")
#: Columns of the class-blind floor table: each saliency column of the main table, per blind map
#: (``benchmark_cams`` adds the ``blind:<name>`` rows on the same test frames).
BLIND_TABLE_METRICS = ("dice@otsu", "dice@area", "pointing_game")
PLAN_FILE = "plan.json"
RESULTS_FILE = "results.json"


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
        bad = [k for k in g if k not in ("variants", "axes", "overrides", "seeds", "base_config")]
        if bad:
            raise ValueError(f"unknown grid keys {bad}; expected variants, axes, overrides, seeds, base_config")
    return subs


def expand_grid(grid: Any, seeds: Sequence[int] = (0,)) -> list[dict[str, Any]]:
    """Runs of ``variants x product(axes) x seeds``: ``[{name, group, seed, overrides}]`` in a fixed order.

    ``group`` is the variant plus its axis values (``lcl_sc__loss.tau=0.05``), ``name`` adds the seed
    (``..__seed=0``). ``defaults`` are the grid's ``overrides`` (weaker than a sweep's ``base_overrides``),
    ``overrides`` the variant's, the axis values and the seed. Duplicate names are dropped.
    """
    if not seeds:
        raise ValueError("need at least one seed")
    runs: dict[str, dict[str, Any]] = {}
    for g in _subgrids(grid):
        axes = dict(g.get("axes") or {})
        for key, values in axes.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"axis {key!r} needs a non-empty list of values, got {values!r}")
        for variant, var_over in g["variants"].items():
            for combo in itertools.product(*axes.values()):
                point = dict(zip(axes, combo))
                group = "__".join([variant] + [f"{k}={_value_name(v)}" for k, v in point.items()])
                for seed in seeds:
                    name = f"{group}__seed={int(seed)}"
                    overrides = {**dict(var_over), **point, "seed": int(seed)}
                    runs.setdefault(name, {"name": name, "group": group, "seed": int(seed),
                                           "defaults": dict(g.get("overrides") or {}), "overrides": overrides})
    return list(runs.values())


def write_plan(out_dir: str, runs: Sequence[Mapping[str, Any]], base_config: str,
               base_overrides: Mapping[str, Any] | None = None, folds: int | None = None,
               saliency_images: int = 16, faithfulness: bool = True) -> str:
    """Write ``out_dir/plan.json`` (every run's spec; what ``run_index`` executes); return its path."""
    for r in runs:  # fail now, not in a child process: every run's config must resolve
        C.load(base_config, run_overrides(r, base_overrides or {}))
    plan = {"base_config": base_config, "base_overrides": dict(base_overrides or {}), "folds": folds,
            "saliency_images": int(saliency_images), "faithfulness": bool(faithfulness), "runs": list(runs)}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PLAN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=2)
    os.replace(tmp, path)
    return path


def run_overrides(spec: Mapping[str, Any], base_overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides of a run: grid defaults < the sweep's ``base_overrides`` < variant, axes and seed."""
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


def _saliency_scores(workdir: str, contrastive: bool, images: int, faithfulness: bool) -> dict[str, Any]:
    """Grad-CAM (all runs) and SC (contrastive runs) localisation/faithfulness on the run's test images."""
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = C.from_dict(json.load(f))
    if not loop.load_dataset(cfg).has_masks:  # a user's folder, or a manifest without a mask column
        return {"note": "saliency benchmark skipped: the data has no masks"}
    methods = ("gradcam", "sc") if contrastive else ("gradcam",)
    rows = cam_benchmark.benchmark_cams(workdir, methods=methods, stages=("last",), max_images=images,
                                        faithfulness=faithfulness, figure_images=0,
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


def run_one(spec: Mapping[str, Any], out_dir: str, plan: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
    """Train, evaluate and score the saliency of one ablation run; write and return its ``results.json``."""
    t0 = time.time()
    workdir = run_dir(out_dir, spec["name"])
    overrides = run_overrides(spec, plan["base_overrides"])
    cfg = C.load(plan["base_config"], overrides)
    contrastive = C.uses_gei(cfg)
    multihost = jax.process_count() > 1
    if plan["folds"]:
        summary = cross_validate(cfg, workdir, folds=int(plan["folds"]), progress=progress, figures=False)
        metrics = {k: v for k, v in summary["mean"].items()}
        fold_dirs = [os.path.join(workdir, fold_name(k)) for k in range(summary["n_folds"])]
    else:
        loop.train(cfg, workdir, progress=progress)
        m = evaluate_run(workdir, split="test", figures=False)
        metrics = scalars(m)
        fold_dirs = [workdir]
    sal: dict[str, Any] = {}
    if multihost:
        sal["note"] = "saliency benchmark skipped in multi-host runs"
    else:
        per_fold = [_saliency_scores(d, contrastive, int(plan["saliency_images"]), bool(plan["faithfulness"]))
                    for d in fold_dirs]
        keys = sorted({k for s in per_fold for k in s})
        for k in keys:
            vals = [s[k] for s in per_fold if k in s]
            sal[k] = vals[0] if isinstance(vals[0], str) else float(np.mean(vals))
    results = {"name": spec["name"], "group": spec["group"], "seed": spec["seed"], "overrides": overrides,
               "base_config": plan["base_config"], "base_overrides": plan["base_overrides"], "folds": plan["folds"],
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
                 base_overrides: Mapping[str, Any] | None = None, saliency_images: int = 16,
                 faithfulness: bool = True, progress: bool = True) -> list[dict[str, Any]]:
    """Run every run of ``grid x seeds`` not yet complete, then write and return the ablation table rows.

    ``grid``: a grid mapping (see ``ABLATION_GRIDS``), a list of them, or a name of ``ABLATION_GRIDS``;
    its own ``seeds``/``base_config``/``overrides`` are defaults for the arguments. ``workers=0``
    runs in this process; ``workers >= 1`` runs each in a child process, ``workers`` at a time
    (threads limited when > 1). ``folds`` makes each run a k-fold CV. A failed run is reported
    and left incomplete (re-running retries it).
    """
    if isinstance(grid, str):
        if grid not in ABLATION_GRIDS:
            raise ValueError(f"unknown ablation grid {grid!r}; expected one of {sorted(ABLATION_GRIDS)}")
        grid = ABLATION_GRIDS[grid]
    first = _subgrids(grid)[0]
    seeds = list(seeds if seeds is not None else first.get("seeds", [0]))
    base_config = base_config or first.get("base_config", "demo")
    runs = expand_grid(grid, seeds)
    write_plan(out_dir, runs, base_config, base_overrides, folds, saliency_images, faithfulness)
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
    rows = ablation_table(out_dir)
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




def group_results(results: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per group (runs differing only in seed): ``{group, n_seeds, seeds, metrics: {name: stats}}``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    rows = []
    for group, rs in groups.items():
        stats_ = aggregate_folds([r["metrics"] for r in rs], confidence=confidence)["metrics"]
        errors = sorted({str(v) for r in rs for k, v in r["metrics"].items() if k.endswith(".error")})
        rows.append({"group": group, "n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs),
                     "metrics": stats_, "errors": errors})
    return rows




def paired_differences(results: Sequence[Mapping[str, Any]], reference: str = "ce",
                       confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per group, ``metric(group, seed) - metric(reference, seed)`` over their common seeds: mean/std/CI.

    Returns ``{group: {"seeds": [...], "metrics": {name: stats}}}`` for every group other than
    ``reference`` sharing at least two seeds with it (the statistics of ``aggregate_folds``).
    """
    by: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in results:
        by.setdefault(r["group"], {})[int(r["seed"])] = r["metrics"]
    if reference not in by:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for group, runs in by.items():
        seeds = sorted(set(runs) & set(by[reference]))
        if group == reference or len(seeds) < 2:
            continue
        diffs = []
        for sd in seeds:
            a, b = runs[sd], by[reference][sd]
            diffs.append({k: float(a[k]) - float(b[k]) for k in a
                          if isinstance(a[k], (int, float)) and isinstance(b.get(k), (int, float))})
        out[group] = {"seeds": seeds, "metrics": aggregate_folds(diffs, confidence=confidence, clip_rates=False)["metrics"]}
    return out


def _blind_floor_lines(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str],
                       confidence: float) -> list[str]:
    """Markdown lines of the class-blind floor: per group, Grad-CAM/SC next to each ``blind:<name>`` map."""
    blind = list(dict.fromkeys(k.split(".", 1)[0] for k in metric_names if k.startswith("blind:")))
    if not blind:
        return []
    lines = ["", f"Class-blind floor: maps that never see the label (`blind:*`), scored on the same test frames "
             f"with the same masks and field of view (mean ± std [{int(confidence * 100)}% t-interval] over seeds). "
             "A saliency method localises the evidence only where it beats these."]
    for metric in BLIND_TABLE_METRICS:
        methods = [m for m in ("gradcam", "sc", *blind) if f"{m}.{metric}" in metric_names]
        if not any(m.startswith("blind:") for m in methods):
            continue
        lines += ["", f"`{metric}`:", "", "| run | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for row in rows:
            lines.append(f"| {row['group']} | "
                         + " | ".join(format_ci(row["metrics"].get(f"{m}.{metric}")) for m in methods) + " |")
    return lines


def ablation_table(out_dir: str, confidence: float = 0.95, reference: str = "ce") -> list[dict[str, Any]]:
    """Collect the runs, write ``ablation_runs.csv``, ``ablation.csv``, ``ablation.md``, ``ablation.json``; return rows."""
    results, missing = collect_ablation(out_dir)
    rows = group_results(results, confidence)
    metric_names: list[str] = []
    for r in results:
        metric_names += [k for k, v in r["metrics"].items() if k not in metric_names and isinstance(v, (int, float))]
    with open(os.path.join(out_dir, "ablation_runs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "group", "seed", "seconds", *metric_names])
        for r in results:
            w.writerow([r["name"], r["group"], r["seed"], r.get("seconds"),
                        *[r["metrics"].get(k, "") for k in metric_names]])
    with open(os.path.join(out_dir, "ablation.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n_seeds", *[f"{k}_{s}" for k in metric_names
                                          for s in ("mean", "std", "ci_low", "ci_high")]])
        for row in rows:
            w.writerow([row["group"], row["n_seeds"],
                        *[("" if row["metrics"].get(k, {}).get(s) is None else row["metrics"][k][s])
                          for k in metric_names for s in ("mean", "std", "ci_low", "ci_high")]])
    cols = [c for c in ABLATION_TABLE_METRICS if c in metric_names]
    lines = [f"Mean ± std [{int(confidence * 100)}% t-interval] over seeds; patient-wise held-out test patients.",
             "", "| run | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['group']} | {row['n_seeds']} | "
                     + " | ".join(format_ci(row["metrics"].get(c)) for c in cols) + " |")
    paired = paired_differences(results, reference, confidence)
    if paired:
        lines += ["", f"Paired difference to `{reference}` (same seed; mean ± std [{int(confidence * 100)}% "
                  "t-interval]); an interval excluding 0 is a difference at that level.", "",
                  "| run | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for group, d in paired.items():
            lines.append(f"| {group} − {reference} | {len(d['seeds'])} | "
                         + " | ".join(format_ci(d["metrics"].get(c), signed=True) for c in cols) + " |")
    lines += _blind_floor_lines(rows, metric_names, confidence)
    if missing:
        lines += ["", f"Incomplete runs ({len(missing)}): " + ", ".join(missing)]
    errors = sorted({e for row in rows for e in row["errors"]})
    if errors:
        lines += ["", "Saliency errors: " + "; ".join(errors)]
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "ablation.json"), "w") as f:
        json.dump({"rows": rows, "paired_vs_reference": paired, "reference": reference, "runs": results,
                   "missing": missing}, f, indent=2)
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
    if args.run_index is not None:
        res = run_index(args.out, args.run_index, progress=True)
        print("already complete, skipped" if res is None else json.dumps(res["metrics"], indent=1))
        return 0
    if args.collect:
        rows = ablation_table(args.out)
        with open(os.path.join(args.out, "ablation.md")) as f:
            print(f.read())
        return 0 if rows else 1
    if args.grid:
        with open(args.grid) as f:
            grid = json.load(f)
    else:
        grid = ABLATION_GRIDS[args.preset]
    first = _subgrids(grid)[0]
    seeds = args.seeds or first.get("seeds", [0])
    base = args.config or first.get("base_config", "demo")
    base_overrides = C.parse_overrides(args.set)
    if "data.source" in base_overrides:  # the child runs may start in another working directory
        base_overrides["data.source"] = data.source_path(base_overrides["data.source"])
    common = dict(base_overrides=base_overrides, folds=args.folds,
                  saliency_images=args.saliency_images, faithfulness=not args.no_faithfulness)
    if args.slurm:
        runs = expand_grid(grid, seeds)
        write_plan(args.out, runs, base, **common)
        path = write_slurm_script(args.out, len(runs), command=args.slurm_command, time_limit=args.time,
                                  cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node,
                                  nodes=args.nodes, partition=args.partition, max_parallel=args.max_parallel)
        print(f"{len(runs)} runs planned; submit with: sbatch {path}")
        return 0
    run_ablation(grid, args.out, workers=args.workers, seeds=seeds, base_config=base, **common)
    with open(os.path.join(args.out, "ablation.md")) as f:
        print(f.read())
    return 0
