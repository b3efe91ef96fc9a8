"""Ablation sweeps: grid expansion, skip-complete/resume, tables with CIs, SLURM script, one real run."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lclsc_jax.protocols import ablation as P

ROOT = Path(__file__).resolve().parents[1]


def _ablate_script():
    spec = importlib.util.spec_from_file_location("ablate_script", ROOT / "experiments" / "ablate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GRID = {"variants": {"ce": {"loss.name": "ce"}, "lcl_sc": {"loss.name": "lcl_sc", "loss.alpha": 1.0}},
        "axes": {"loss.tau": [0.05, 0.2], "loss.k_max": [0.1, 1.0]}, "overrides": {"train.steps": 7}}


def test_expand_grid_is_the_cartesian_product_with_unique_names():
    runs = P.expand_grid(GRID, seeds=[0, 3])
    expect = set(itertools.product(["ce", "lcl_sc"], [0.05, 0.2], [0.1, 1.0], [0, 3]))
    got = {(r["overrides"]["loss.name"], r["overrides"]["loss.tau"], r["overrides"]["loss.k_max"], r["seed"])
           for r in runs}
    assert got == expect and len(runs) == 16
    assert len({r["name"] for r in runs}) == 16
    r = next(r for r in runs if r["name"] == "lcl_sc__loss.tau=0.05__loss.k_max=1__seed=3")
    assert r["group"] == "lcl_sc__loss.tau=0.05__loss.k_max=1"
    assert r["overrides"] == {"loss.name": "lcl_sc", "loss.alpha": 1.0, "loss.tau": 0.05, "loss.k_max": 1.0,
                              "seed": 3}
    assert r["defaults"] == {"train.steps": 7}
    # Grid defaults < the sweep's overrides < the variant / axes / seed.
    merged = P.run_overrides(r, {"train.steps": 9, "loss.tau": 0.5})
    assert merged["train.steps"] == 9 and merged["loss.tau"] == 0.05


def test_list_of_grids_concatenates_and_drops_duplicates():
    runs = P.expand_grid([{"variants": {"a": {"loss.name": "lcl"}}},
                          {"variants": {"a": {"loss.name": "lcl"}}, "axes": {"loss.tau": [0.2]}},
                          {"variants": {"a": {"loss.name": "lcl"}}}], seeds=[0])
    assert [r["name"] for r in runs] == ["a__seed=0", "a__loss.tau=0.2__seed=0"]


@pytest.mark.parametrize("bad", [{}, {"variants": {}}, {"variants": {"a": {}}, "axes": {"loss.tau": 0.1}},
                                 {"variants": {"a": {}}, "colours": 1}])
def test_malformed_grids_are_errors(bad):
    with pytest.raises(ValueError):
        P.expand_grid(bad)


def test_quick_preset_covers_the_brief():
    runs = P.expand_grid(P.ABLATION_GRIDS["quick"], P.ABLATION_GRIDS["quick"]["seeds"])
    groups = {r["group"]: r["overrides"] for r in runs}
    assert set(groups) == {"ce", "lcl", "lcl_sc", "lcl_sc_no_tkmmp"} and len(runs) == 4 * 3
    assert groups["lcl_sc_no_tkmmp"]["loss.k_max"] == 1.0 and groups["lcl_sc_no_tkmmp"]["loss.alpha"] == 0.0
    full = P.expand_grid(P.ABLATION_GRIDS["full"])
    assert {"supcon", "lcl_sc_wildcat", "lcl_sc__loss.ema_momentum=0.9"} <= {r["group"] for r in full}


def test_plan_rejects_an_unknown_config_key(tmp_path):
    runs = P.expand_grid({"variants": {"a": {"loss.nam": "ce"}}})
    with pytest.raises(ValueError, match="loss.name"):
        P.write_plan(str(tmp_path), runs, "tiny")


def _fake_results(out, spec, plan, metrics):
    d = P.run_dir(str(out), spec["name"])
    os.makedirs(d, exist_ok=True)
    res = {"name": spec["name"], "group": spec["group"], "seed": spec["seed"],
           "overrides": P.run_overrides(spec, plan["base_overrides"]), "base_config": plan["base_config"],
           "base_overrides": plan["base_overrides"], "folds": plan["folds"], "metrics": metrics, "seconds": 1.0}
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(res, f)


def test_skip_complete_collect_and_table_statistics(tmp_path, monkeypatch):
    grid = {"variants": {"ce": {"loss.name": "ce"}, "lcl_sc": {"loss.name": "lcl_sc"}}}
    runs = P.expand_grid(grid, seeds=[0, 1, 2])
    P.write_plan(str(tmp_path), runs, "tiny", {"train.steps": 3})
    plan = P.load_plan(str(tmp_path))
    rng = np.random.default_rng(0)
    values = {}
    for spec in runs[:-1]:  # the last run (lcl_sc seed 2) is missing
        m = {"accuracy": float(rng.uniform()), "gradcam.dice@otsu": float(rng.uniform())}
        values.setdefault(spec["group"], []).append(m)
        _fake_results(tmp_path, spec, plan, m)

    monkeypatch.setattr(P, "run_one", lambda *a, **k: pytest.fail("a complete run was re-run"))
    assert P.run_index(str(tmp_path), 0) is None
    done, missing = P.collect_ablation(str(tmp_path))
    assert len(done) == 5 and missing == ["lcl_sc__seed=2"]

    rows = P.ablation_table(str(tmp_path))
    by = {r["group"]: r for r in rows}
    assert by["ce"]["n_seeds"] == 3 and by["lcl_sc"]["n_seeds"] == 2
    for group, ms in values.items():
        acc = np.array([m["accuracy"] for m in ms])
        s = by[group]["metrics"]["accuracy"]
        half = stats.t.ppf(0.975, len(acc) - 1) * acc.std(ddof=1) / np.sqrt(len(acc))
        assert s["mean"] == pytest.approx(acc.mean()) and s["std"] == pytest.approx(acc.std(ddof=1))
        # a rate's t-interval is clipped to [0, 1]
        assert (s["ci_low"], s["ci_high"]) == pytest.approx((max(acc.mean() - half, 0.0), min(acc.mean() + half, 1.0)))
    with open(tmp_path / "ablation.csv") as f:
        table = {r["group"]: r for r in csv.DictReader(f)}
    assert float(table["ce"]["accuracy_mean"]) == pytest.approx(np.mean([m["accuracy"] for m in values["ce"]]))
    md = (tmp_path / "ablation.md").read_text()
    assert "| ce | 3 |" in md and "Incomplete runs (1): lcl_sc__seed=2" in md
    assert len((tmp_path / "ablation_runs.csv").read_text().strip().splitlines()) == 1 + 5
    # Paired by seed against ce: lcl_sc has seeds 0 and 1 in common.
    d = np.array([values["lcl_sc"][k]["gradcam.dice@otsu"] - values["ce"][k]["gradcam.dice@otsu"] for k in (0, 1)])
    half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
    paired = json.loads((tmp_path / "ablation.json").read_text())["paired_vs_reference"]["lcl_sc"]
    assert paired["seeds"] == [0, 1]
    got = paired["metrics"]["gradcam.dice@otsu"]
    assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert "| lcl_sc − ce | 2 |" in md and f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} [{d.mean() - half:+.3f}" in md

    # All complete: run_ablation runs nothing and only rewrites the table.
    _fake_results(tmp_path, runs[-1], plan, {"accuracy": 0.5})
    rows = P.run_ablation(grid, str(tmp_path), workers=0, seeds=[0, 1, 2], base_config="tiny",
                          base_overrides={"train.steps": 3}, progress=False)
    assert {r["group"]: r["n_seeds"] for r in rows} == {"ce": 3, "lcl_sc": 3}


def test_results_made_with_other_settings_are_refused(tmp_path):
    runs = P.expand_grid({"variants": {"ce": {"loss.name": "ce"}}})
    P.write_plan(str(tmp_path), runs, "tiny", {"train.steps": 3})
    _fake_results(tmp_path, runs[0], P.load_plan(str(tmp_path)), {"accuracy": 1.0})
    P.write_plan(str(tmp_path), runs, "tiny", {"train.steps": 4})
    with pytest.raises(ValueError, match="other settings"):
        P.run_index(str(tmp_path), 0)
    with pytest.raises(ValueError, match="out of range"):
        P.run_index(str(tmp_path), 1)


def test_child_env_limits_threads_only_with_several_workers():
    env = P.child_env(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                        "--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
    assert env["OMP_NUM_THREADS"] == "1"
    assert "XLA_FLAGS" not in P.child_env(1, {})


def test_slurm_script_has_one_array_task_per_run(tmp_path):
    out = str(tmp_path / "abl")
    script = _ablate_script()
    assert script.main(["--out", out, "--preset", "quick", "--slurm", "--seeds", "0", "1"]) == 0
    text = open(os.path.join(out, "ablation.slurm")).read()
    n = len(P.load_plan(out)["runs"])
    assert n == 8
    assert "#SBATCH --array=0-7\n" in text
    assert f"srun python experiments/ablate.py --out {os.path.abspath(out)} --run-index ${{SLURM_ARRAY_TASK_ID}}" in text
    assert "LCLSC_DISTRIBUTED" not in text.split("# Without SLURM")[1]
    multi = open(P.write_slurm_script(out, 3, nodes=2, gpus_per_node=4, max_parallel=2)).read()
    assert "#SBATCH --array=0-2%2" in multi and "#SBATCH --nodes=2" in multi
    assert "#SBATCH --gpus-per-node=4" in multi and "export LCLSC_DISTRIBUTED=1" in multi


def test_lclsc_ablate_plans_the_same_runs_and_calls_itself(tmp_path, capsys):
    from lclsc_jax import cli

    out = str(tmp_path / "abl")
    assert cli.main(["ablate", "--out", out, "--preset", "quick", "--slurm", "--seeds", "0", "1"]) == 0
    assert "8 runs planned" in capsys.readouterr().out
    names = [r["name"] for r in P.load_plan(out)["runs"]]
    assert names == [r["name"] for r in P.expand_grid(P.ABLATION_GRIDS["quick"], [0, 1])]
    assert f"srun lclsc ablate --out {os.path.abspath(out)} --run-index" in open(os.path.join(out, "ablation.slurm")).read()


def test_a_relative_data_path_is_planned_absolute(tmp_path, monkeypatch):
    from lclsc_jax import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "frames.csv").write_text("path,label,patient\n")
    assert cli.main(["ablate", "--out", "abl", "--preset", "quick", "--slurm", "--seeds", "0",
                     "--set", "data.source=frames.csv"]) == 0
    assert P.load_plan("abl")["base_overrides"]["data.source"] == str(tmp_path / "frames.csv")


@pytest.mark.slow
def test_one_real_run_in_a_child_process_then_resume_skips_it(tmp_path):
    out = str(tmp_path / "abl")
    grid = {"variants": {"lcl_sc": {"loss.name": "lcl_sc"}}}
    over = {"data.cache_dir": str(tmp_path / "cache"), "train.steps": 4, "train.eval_every": 4,
            "train.checkpoint_every": 4}
    rows = P.run_ablation(grid, out, workers=1, seeds=[0], base_config="tiny", base_overrides=over,
                          saliency_images=4, progress=False)
    res_path = os.path.join(P.run_dir(out, "lcl_sc__seed=0"), "results.json")
    assert os.path.exists(res_path), open(os.path.join(P.run_dir(out, "lcl_sc__seed=0"), "log.txt")).read()[-2000:]
    res = json.load(open(res_path))
    m = res["metrics"]
    for k in ("accuracy", "f1", "gradcam.dice@otsu", "gradcam.pointing_game", "gradcam.deletion_auc",
              "sc.dice@otsu", "sc.pointing_game"):
        assert 0.0 <= m[k] <= 1.0, k
    ev = json.load(open(os.path.join(P.run_dir(out, "lcl_sc__seed=0"), "eval", "metrics.json")))
    assert m["accuracy"] == ev["accuracy"] and ev["checkpoint_step"] == 4
    assert rows[0]["group"] == "lcl_sc" and rows[0]["metrics"]["accuracy"]["mean"] == m["accuracy"]
    stamp = os.stat(res_path).st_mtime_ns
    P.run_ablation(grid, out, workers=1, seeds=[0], base_config="tiny", base_overrides=over, saliency_images=4,
                   progress=False)
    assert os.stat(res_path).st_mtime_ns == stamp


def test_saliency_scores_and_table_carry_the_class_blind_floor(tmp_path, monkeypatch):
    from lclsc_jax.protocols import cam_benchmark

    def fake_bench(workdir, methods, **kw):
        rows = [{"method": m, "stage": "stage4", "error": None, "dice@otsu": 0.5, "dice@area": 0.6, "pr_auc": 0.7,
                 "pointing_game": 0.8} for m in methods]
        rows += [{"method": f"blind:{b}", "stage": "-", "error": None, "dice@otsu": d, "dice@area": d + 0.1,
                  "pr_auc": d, "pointing_game": d} for b, d in (("local_std", 0.4), ("random", 0.1))]
        return rows

    import types

    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    monkeypatch.setattr(cam_benchmark, "benchmark_cams", fake_bench)
    monkeypatch.setattr(loop, "load_dataset", lambda cfg, source=None: types.SimpleNamespace(has_masks=True))
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.json").write_text(json.dumps(C.to_dict(C.load("tiny"))))
    scores = P._saliency_scores(str(work), True, 4, False)
    assert scores["blind:local_std.dice@otsu"] == 0.4 and scores["blind:random.dice@area"] == pytest.approx(0.2)
    assert scores["gradcam.dice@area"] == 0.6 and scores["sc.pr_auc"] == 0.7

    grid = {"variants": {"ce": {"loss.name": "ce"}, "lcl_sc": {"loss.name": "lcl_sc"}}}
    runs = P.expand_grid(grid, seeds=[0, 1])
    out = tmp_path / "abl"
    P.write_plan(str(out), runs, "tiny")
    plan = P.load_plan(str(out))
    floor = {}
    for spec in runs:
        m = {"accuracy": 0.9, "gradcam.dice@otsu": 0.3 + 0.1 * spec["seed"],
             "blind:local_std.dice@otsu": 0.41 + 0.02 * spec["seed"], "blind:random.dice@otsu": 0.12}
        floor.setdefault(spec["group"], []).append(m["blind:local_std.dice@otsu"])
        _fake_results(out, spec, plan, m)
    P.ablation_table(str(out))
    md = (out / "ablation.md").read_text()
    floor_md = md.split("Class-blind floor")[1]
    assert "| run | gradcam | blind:local_std | blind:random |" in floor_md
    vals = np.array(floor["ce"])
    half = stats.t.ppf(0.975, 1) * vals.std(ddof=1) / np.sqrt(2)
    assert f"| ce | 0.350 ± 0.071 [" in floor_md
    lo, hi = vals.mean() - half, vals.mean() + half
    assert f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f} [{lo:.3f}, {hi:.3f}]" in floor_md
    with open(out / "ablation.csv") as f:
        table = {r["group"]: r for r in csv.DictReader(f)}
    assert float(table["lcl_sc"]["blind:local_std.dice@otsu_mean"]) == pytest.approx(vals.mean())
