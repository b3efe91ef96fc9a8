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
    assert r["defaults"] == {"train.steps": 7} and r["split_seed"] is None
    # Grid defaults < the sweep's overrides < the variant / axes / seed.
    merged = P.run_overrides(r, {"train.steps": 9, "loss.tau": 0.5})
    assert merged["train.steps"] == 9 and merged["loss.tau"] == 0.05


def test_split_seeds_make_replicates_with_their_own_split():
    runs = P.expand_grid({"variants": {"ce": {"loss.name": "ce"}, "lcl": {"loss.name": "lcl"}}}, seeds=[0, 4],
                         split_seeds=[1, 2])
    assert [r["name"] for r in runs[:4]] == ["ce__split=1__seed=0", "ce__split=1__seed=4", "ce__split=2__seed=0",
                                             "ce__split=2__seed=4"]
    assert len(runs) == 8 and {r["group"] for r in runs} == {"ce", "lcl"}
    for r in runs:
        assert r["overrides"]["data.split_seed"] == r["split_seed"] and r["overrides"]["seed"] == r["seed"]
        assert P.replicate_of(r) == (r["split_seed"], r["seed"])
    from lclsc_jax.train import config as C

    cfg = C.load("tiny", P.run_overrides(runs[2], {"data.split_seed": 9}))  # the replicate wins over --set
    assert cfg.data.split_seed == 2 and cfg.seed == 0
    with pytest.raises(ValueError, match="split_seeds"):
        P.expand_grid({"variants": {"a": {}}}, split_seeds=[])


def test_paper_preset_is_the_study_and_validates(tmp_path):
    grid = P.ABLATION_GRIDS["paper"]
    d = P.grid_defaults(grid)
    assert len(d["seeds"]) >= 3 and len(d["split_seeds"]) >= 1 and d["folds"] == 5 and d["saliency_images"] == 0
    runs = P.expand_grid(grid, d["seeds"], d["split_seeds"])
    groups = {r["group"]: r["overrides"] for r in runs}
    assert {"ce", "supcon", "lcl", "lcl_sc", "lcl_sc_topk", "lcl_sc_wildcat"} <= set(groups)
    assert groups["lcl_sc_topk"]["loss.alpha"] == 0.0 and groups["lcl_sc_wildcat"]["loss.alpha"] == 1.0
    assert "loss.alpha" not in groups["lcl_sc"]  # the config's default, -1
    ks = {g: (o.get("loss.k_max", 0.1), o.get("loss.k_min", 0.1)) for g, o in groups.items() if g.startswith("lcl_sc")}
    assert {k for k, m in ks.values() if k == m} >= {0.01, 0.05, 0.1, 0.25}
    # The objectives get the preset's seeds; the SC ablations their own (one on the 2-core machine)
    # unless --seeds sets every sub-grid's.
    per_group = {g: sorted(r["seed"] for r in runs if r["group"] == g) for g in groups}
    assert all(per_group[g] == d["seeds"] for g in ("ce", "supcon", "lcl", "lcl_sc"))
    assert all(len(per_group[g]) >= 1 for g in groups)
    assert len(P.expand_grid(grid, [0, 1, 2], d["split_seeds"])) == len(groups) * 3 * len(d["split_seeds"])
    assert {"lcl_sc_consistency", "lcl_sc_decomposed"} <= set(groups)
    P.write_plan(str(tmp_path), runs, d["base_config"], folds=d["folds"], saliency_images=0)  # every config loads
    from lclsc_jax.train import config as C

    cfg = C.load(d["base_config"], P.run_overrides(runs[0], {}))
    assert cfg.model.arch == "tiny" and cfg.train.steps <= 500 and cfg.data.image_size <= 64
    assert C.load(d["base_config"], P.run_overrides(next(r for r in runs if r["group"] == "lcl_sc"), {})).loss.alpha == -1


def test_sub_grids_keep_their_own_seeds_unless_seeds_are_given():
    grid = [{"variants": {"a": {}}, "seeds": [0, 1]}, {"variants": {"b": {}}, "seeds": [5]}, {"variants": {"c": {}}}]
    names = [r["name"] for r in P.expand_grid(grid)]
    assert names == ["a__seed=0", "a__seed=1", "b__seed=5", "c__seed=0", "c__seed=1"]  # c: the first's
    assert [r["seed"] for r in P.expand_grid(grid, seeds=[7])] == [7, 7, 7]
    with pytest.raises(ValueError, match="at least one seed"):
        P.expand_grid([{"variants": {"a": {}}, "seeds": []}])


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
        m = {"accuracy": float(rng.uniform()), "gradcam.dice@area": float(rng.uniform())}
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
    d = np.array([values["lcl_sc"][k]["gradcam.dice@area"] - values["ce"][k]["gradcam.dice@area"] for k in (0, 1)])
    half = stats.t.ppf(0.975, 1) * d.std(ddof=1) / np.sqrt(2)
    paired = json.loads((tmp_path / "ablation.json").read_text())["paired_vs_reference"]["lcl_sc"]
    assert paired["seeds"] == [0, 1]
    got = paired["metrics"]["gradcam.dice@area"]
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
    # The paper preset brings its folds, split seeds and every-frame saliency; flags override them.
    paper = str(tmp_path / "paper")
    assert cli.main(["ablate", "--out", paper, "--preset", "paper", "--slurm", "--split-seeds", "3", "4",
                     "--seeds", "0"]) == 0
    plan = P.load_plan(paper)
    assert plan["folds"] == 5 and plan["saliency_images"] == 0 and plan["road_percentages"] == [20.0, 50.0, 80.0]
    assert {r["split_seed"] for r in plan["runs"]} == {3, 4} and {r["seed"] for r in plan["runs"]} == {0}
    assert cli.main(["ablate", "--out", paper, "--preset", "paper", "--slurm", "--folds", "0",
                     "--saliency-images", "8"]) == 0
    plan = P.load_plan(paper)
    assert plan["folds"] is None and plan["saliency_images"] == 8
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
    kw = dict(workers=1, seeds=[0], split_seeds=[1], base_config="tiny", base_overrides=over, folds=2,
              saliency_images=0, road_percentages=(50,), progress=False)
    rows = P.run_ablation(grid, out, **kw)
    wd = P.run_dir(out, "lcl_sc__split=1__seed=0")
    res_path = os.path.join(wd, "results.json")
    assert os.path.exists(res_path), open(os.path.join(wd, "log.txt")).read()[-2000:]
    res = json.load(open(res_path))
    m = res["metrics"]
    for k in ("accuracy", "f1", "gradcam.dice@area", "gradcam.pr_auc", "gradcam.pointing_game", "sc.dice@area",
              "sc.pointing_game"):
        assert 0.0 <= m[k] <= 1.0, k
    for k in ("gradcam.road_gap", "sc.road_gap", "gradcam.specificity_gap", "blind:random.road_gap"):
        assert -1.0 <= m[k] <= 1.0, k
    # A 2-fold CV over split seed 1: the folds of data.patient_kfold(seed=1), every record tested once.
    from lclsc_jax import data
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    ds = loop.load_dataset(C.load("tiny", over))
    folds = data.patient_kfold(ds.patients, 2, seed=1, labels=ds.labels)
    for k, (_, te) in enumerate(folds):
        z = np.load(os.path.join(wd, f"fold_{k:02d}", "predictions.npz"))
        np.testing.assert_array_equal(np.sort(z["index"]), np.sort(te))
    fr = P.load_run_frames(out, res)
    np.testing.assert_array_equal(np.sort(fr["index"]), np.arange(len(ds.labels)))
    assert (res["n_folds"], res["n_frames"], res["split_seed"]) == (2, len(ds.labels), 1)
    assert res["n_patients"] == len(set(ds.patients)) and res["n_saliency_frames"] == len(ds.labels)
    # Pooled over the folds: accuracy is the mean of the frames' correctness, saliency the frames' mean.
    assert m["accuracy"] == pytest.approx(fr["columns"]["accuracy"].mean())
    assert m["sc.dice@area"] == pytest.approx(np.nanmean(fr["columns"]["sc.dice@area"]))
    assert rows[0]["group"] == "lcl_sc" and rows[0]["metrics"]["accuracy"]["mean"] == m["accuracy"]
    boot = rows[0]["bootstrap"]["accuracy"]
    assert boot["estimate"] == pytest.approx(m["accuracy"]) and boot["ci_low"] <= m["accuracy"] <= boot["ci_high"]
    md = open(os.path.join(out, "ablation.md")).read()
    assert f"| lcl_sc | 1 | 0 | 1 | 2 | {len(set(ds.patients))} | {len(ds.labels)} | {len(ds.labels)} |" in md
    stamp = os.stat(res_path).st_mtime_ns
    P.run_ablation(grid, out, **kw)
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
        m = {"accuracy": 0.9, "gradcam.dice@area": 0.3 + 0.1 * spec["seed"],
             "blind:local_std.dice@area": 0.41 + 0.02 * spec["seed"], "blind:random.dice@area": 0.12}
        floor.setdefault(spec["group"], []).append(m["blind:local_std.dice@area"])
        _fake_results(out, spec, plan, m)
    P.ablation_table(str(out))
    md = (out / "ablation.md").read_text()
    floor_md = md.split("## Class-blind floor")[1]
    assert "| run | gradcam | blind:local_std | blind:random |" in floor_md
    vals = np.array(floor["ce"])
    half = stats.t.ppf(0.975, 1) * vals.std(ddof=1) / np.sqrt(2)
    assert f"| ce | 0.350 ± 0.071 [" in floor_md
    lo, hi = vals.mean() - half, vals.mean() + half
    assert f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f} [{lo:.3f}, {hi:.3f}]" in floor_md
    with open(out / "ablation.csv") as f:
        table = {r["group"]: r for r in csv.DictReader(f)}
    assert float(table["lcl_sc"]["blind:local_std.dice@area_mean"]) == pytest.approx(vals.mean())


def _fake_frames(out, spec, index, patient, label, columns):
    """A run's frames.npz as run_one writes it (one fold)."""
    names = list(columns)
    np.savez(os.path.join(P.run_dir(str(out), spec["name"]), "frames.npz"), names=np.asarray(names, str),
             values=np.stack([columns[k] for k in names]), index=np.asarray(index, np.int64),
             patient=np.asarray(patient, str), label=np.asarray(label, np.int64), fold=np.zeros(len(index), np.int64))


def test_table_pairs_by_replicate_and_says_what_stands_behind_each_number(tmp_path):
    # 2 groups x 2 split seeds x 2 seeds. Frames: 6 patients (3 per class) x 4 frames; under a fixed split
    # each split seed tests other frames (split 0: patients 0-3, split 1: patients 2-5). The reference's
    # outcomes are random per (replicate, frame); the other group's are the same replicate's plus a shift:
    # +0.1 for accuracy, a class shift for Dice (+0.1 class 0, -0.2 class 1). Pairing by replicate gives
    # exactly those shifts; any other pairing would mix unrelated frames.
    rng = np.random.default_rng(0)
    pats = np.repeat([f"P{i}" for i in range(6)], 4)
    labels = np.repeat([0, 1, 0, 1, 0, 1], 4)
    index = np.arange(24) + 100
    shift = np.where(labels == 0, 0.1, -0.2)
    grid = {"variants": {"ce": {"loss.name": "ce"}, "lcl_sc": {"loss.name": "lcl_sc"}}}
    runs = P.expand_grid(grid, seeds=[0, 1], split_seeds=[0, 1])
    P.write_plan(str(tmp_path), runs, "tiny")
    plan = P.load_plan(str(tmp_path))
    ref_vals, lcl_vals = {}, {}
    for spec in runs:
        rep = (spec["split_seed"], spec["seed"])
        test = slice(0, 16) if spec["split_seed"] == 0 else slice(8, 24)
        if rep not in ref_vals:
            ref_vals[rep] = {"accuracy": (rng.random(16) > 0.3).astype(float), "gradcam.dice@area": rng.random(16)}
        base = ref_vals[rep]
        cols = base if spec["group"] == "ce" else {"accuracy": base["accuracy"] + 0.1,
                                                   "gradcam.dice@area": base["gradcam.dice@area"] + shift[test]}
        if spec["group"] == "lcl_sc":
            lcl_vals[rep] = cols
        cols = {**cols, "blind:random.dice@area": np.full(16, 0.2)}
        _fake_results(tmp_path, spec, plan, {"accuracy": float(cols["accuracy"].mean()),
                                             "gradcam.dice@area": float(cols["gradcam.dice@area"].mean())})
        res_path = os.path.join(P.run_dir(str(tmp_path), spec["name"]), "results.json")
        res = json.load(open(res_path))
        res.update(split_seed=spec["split_seed"], n_folds=0, n_patients=4, n_frames=16, class_names=["benign", "tumour"])
        json.dump(res, open(res_path, "w"))
        _fake_frames(tmp_path, spec, index[test], pats[test], labels[test], cols)

    rows = P.ablation_table(str(tmp_path), n_boot=300)
    by = {r["group"]: r for r in rows}
    r = by["lcl_sc"]
    assert (r["n_replicates"], r["seeds"], r["split_seeds"], r["n_patients"], r["n_frames"]) == (4, [0, 1], [0, 1], 6, 24)
    # The group's number: per replicate the mean over its test frames, then the mean over replicates.
    for group, vals in (("ce", ref_vals), ("lcl_sc", lcl_vals)):
        want = np.mean([v["gradcam.dice@area"].mean() for v in vals.values()])
        b = by[group]["bootstrap"]["gradcam.dice@area"]
        assert b["estimate"] == pytest.approx(want) and b["ci_low"] < want < b["ci_high"]
        assert (b["n_replicates"], b["n_patients"], b["n_frames"]) == (4, 6, 24)
    doc = json.loads((tmp_path / "ablation.json").read_text())
    paired = doc["paired_vs_reference"]["lcl_sc"]
    assert paired["replicates"] == [[0, 0], [0, 1], [1, 0], [1, 1]] and paired["n_patients"] == 6
    got = paired["bootstrap"]["accuracy"]
    assert (got["estimate"], got["ci_low"], got["ci_high"]) == pytest.approx((0.1, 0.1, 0.1))
    expect = np.mean([shift[:16].mean(), shift[:16].mean(), shift[8:].mean(), shift[8:].mean()])
    got = paired["bootstrap"]["gradcam.dice@area"]
    assert got["estimate"] == pytest.approx(expect) and -0.2 <= got["ci_low"] < expect < got["ci_high"] <= 0.1
    for cls, d in (("benign", 0.1), ("tumour", -0.2)):
        c = paired["per_class"][cls]["gradcam.dice@area"]
        assert (c["estimate"], c["ci_low"], c["ci_high"]) == pytest.approx((d, d, d))
        assert c["n_patients"] == 3 and paired["per_class"][cls]["accuracy"]["estimate"] == pytest.approx(0.1)
    assert "gradcam.dice@area" in doc["rows"][1]["per_class"]["tumour"]
    # t over the 4 replicate differences of the runs' own numbers
    diffs = [lcl_vals[k]["accuracy"].mean() - ref_vals[k]["accuracy"].mean() for k in sorted(ref_vals)]
    assert paired["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(diffs))
    assert paired["metrics"]["accuracy"]["std"] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)

    md = (tmp_path / "ablation.md").read_text()
    assert "| run | split seeds | training seeds | replicates | folds | patients | frames | saliency frames |" in md
    assert "| lcl_sc | 0, 1 | 0, 1 | 4 | – | 6 | 24 | 24 |" in md
    assert "| lcl_sc − ce | 4 | 6 | 24 | +0.100 [+0.100, +0.100] |" in md
    assert "| lcl_sc − ce | gradcam.dice@area | +0.100 [+0.100, +0.100] | -0.200 [-0.200, -0.200] |" in md
    # The smallest detectable difference: 2.80 x the bootstrap SE (0 for the constant accuracy shift).
    assert got["detectable"] == pytest.approx(2.8016 * got["se"], rel=1e-3) and got["detectable"] > 0
    assert "Smallest difference the study could detect" in md
    assert f"| lcl_sc − ce | ±0.000 | ±{got['detectable']:.3f} |" in md
    assert "## Class-blind floor" in md and "blind:random" in md
    with open(tmp_path / "ablation_paired.csv") as f:
        table = list(csv.DictReader(f))
    row = next(t for t in table if t["class"] == "tumour" and t["metric"] == "gradcam.dice@area")
    assert float(row["estimate"]) == pytest.approx(-0.2) and row["reference"] == "ce" and row["n_patients"] == "3"
    with open(tmp_path / "ablation.csv") as f:
        groups = {t["group"]: t for t in csv.DictReader(f)}
    assert groups["ce"]["n_patients"] == "6" and groups["ce"]["n_split_seeds"] == "2" and groups["ce"]["n_seeds"] == "2"
    assert float(groups["ce"]["gradcam.dice@area_boot_low"]) < float(groups["ce"]["gradcam.dice@area_mean"])
