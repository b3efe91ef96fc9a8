"""The `lclsc` command end to end: train/evaluate/predict, kill -9 and resume, errors and help."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lclsc_jax import cli
from lclsc_jax.protocols import runs


def _lclsc(*args, **kw):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=900, **kw)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def _params(workdir):
    run = runs.load_run(str(workdir), "latest", num_devices=1)
    return run.step, [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(run.state.params))], \
        np.asarray(run.state.global_emb)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path, cache):
    args = ["--config", "tiny", "--no-progress", "--set", "train.steps=40", "train.checkpoint_every=4",
            "train.eval_every=20", f"data.cache_dir={cache}"]
    ref = _lclsc("train", "--workdir", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr[-3000:]

    work = tmp_path / "killed"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "lclsc_jax.cli", "train", "--workdir", str(work), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = work / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(d.name.isdigit() for d in ckpts.iterdir()):
            break
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere between two checkpoints, possibly mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _lclsc("train", "--workdir", str(work), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    step_a, pa, ga = _params(tmp_path / "ref")
    step_b, pb, gb = _params(work)
    assert step_a == step_b == 40
    for a, b in zip(pa, pb):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_train_evaluate_predict_beats_chance(tmp_path, cache):
    work = str(tmp_path / "run")
    r = _lclsc("train", "--workdir", work, "--config", "tiny", "--no-progress", "--set", "train.steps=150",
               "data.image_size=48", "synthetic.num_patients=12", "synthetic.images_per_patient=16",
               "train.batch_size=32", "train.eval_every=75", "train.checkpoint_every=75", f"data.cache_dir={cache}",
               # The honest benchmark needs ~1000 steps; a planted brightness shortcut makes 150 enough to
               # show that training, model selection and evaluation are wired together.
               "synthetic.class_gain_shortcut=0.8")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _lclsc("evaluate", "--workdir", work)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(work, "eval", "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(work, "splits.json")) as f:
        splits = json.load(f)
    assert set(splits["patients"]["test"]).isdisjoint(splits["patients"]["train"])
    assert m["n"] == splits["counts"]["test"] and m["split"] == "test"
    assert m["accuracy"] >= 0.6, m  # chance is 1/3 on held-out patients
    for key in ("sensitivity", "specificity", "f1", "auroc", "per_class", "per_patient", "confusion_matrix"):
        assert key in m
    acc = m["intervals"]["accuracy"]  # patient-bootstrap interval around the reported accuracy
    assert acc["estimate"] == pytest.approx(m["accuracy"]) and acc["ci_low"] <= m["accuracy"] <= acc["ci_high"]
    assert "[95% intervals: patient bootstrap" in r.stdout
    assert os.path.getsize(os.path.join(work, "eval", "confusion_matrix.png")) > 0
    lines = open(os.path.join(work, "metrics.jsonl")).read().splitlines()
    assert any(json.loads(l)["split"] == "val" for l in lines)
    assert os.listdir(os.path.join(work, "tb"))

    from lclsc_jax import data
    from lclsc_jax.train import config as C
    from PIL import Image

    cfg = C.from_dict(json.load(open(os.path.join(work, "config.json"))))
    ds = data.load("synthetic", image_size=48, cache_dir=cache,
                   synthetic=data.SyntheticConfig(num_patients=12, images_per_patient=16, image_size=48))
    path = tmp_path / "frame.png"
    Image.fromarray(ds.source[0]["image"][..., 0]).save(path)
    r = _lclsc("predict", "--workdir", work, str(path), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["class"] in ds.class_names and abs(sum(row["probabilities"].values()) - 1) < 1e-4
    assert cfg.loss.name == "lcl_sc"

    r = _lclsc("explain", "--workdir", work, "--method", "gradcam", str(path), "--out", str(tmp_path / "maps"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = np.load(tmp_path / "maps" / "frame_gradcam.npy")
    assert (tmp_path / "maps" / "frame_gradcam.png").stat().st_size > 1000
    assert m.shape == (48, 48) and 0 <= m.min() and m.max() <= 1

    r = _lclsc("benchmark-cams", "--workdir", work, "--methods", "gradcam", "sc", "--stages", "last",
               "--max-images", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    import csv

    rows = list(csv.DictReader(open(os.path.join(work, "cam_benchmark", "cam_benchmark.csv"))))
    assert [(r_["method"], r_["stage"]) for r_ in rows] == [("gradcam", "stage4"), ("sc", "stage4")] + [
        (f"blind:{b}", "-") for b in ("local_std", "dog", "centre", "random")]  # "last" resolved; the floor rows
    assert all(0 <= float(r_["dice@otsu"]) <= 1 for r_ in rows)


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["train", "--workdir", str(tmp_path / "x"), "--config", "tiny", "--set", "train.lrr=1"])
    err = capsys.readouterr().err
    assert code == 2 and "train.lrr" in err and "train.lr" in err


def test_evaluate_without_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["evaluate", "--workdir", str(tmp_path)]) == 2
    assert "not a training workdir" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "explain", "cv", "benchmark-cams", "ablate",
                                     "verify", "demo", "config", "audit-data", "synth", "sequences", "report"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out or command in ("verify", "config", "ablate", "audit-data", "synth", "report")


def test_config_list_shows_every_key(capsys):
    assert cli.main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    for key in ("model.arch", "data.image_size", "train.steps", "train.batch_size", "train.lr", "loss.name", "seed"):
        assert f"{key} =" in out


@pytest.mark.slow
def test_demo_trains_evaluates_and_writes_every_figure(tmp_path, cache):
    work = tmp_path / "demo"
    r = _lclsc("demo", "--workdir", str(work), "--set", "train.steps=30", "train.eval_every=30",
               "train.checkpoint_every=30", "data.image_size=32", "synthetic.num_patients=9",
               "synthetic.images_per_patient=8", "train.batch_size=16", f"data.cache_dir={cache}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "demo_summary.json").read_text())
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert summary["accuracy"] == metrics["accuracy"] and 0 <= summary["accuracy"] <= 1
    figs = work / "figures"
    assert (figs / "synthetic_examples.png").stat().st_size > 1000
    assert len(list((figs / "all_methods").glob("*_all.png"))) == 3  # one grid per class
    from lclsc_jax import explain

    # Every method produced a map in [0, 1] of the image's size for each frame (but the perturbation generator,
    # which needs `lclsc relevance train` first and is skipped by "all").
    for m in (m for m in explain.METHODS if m != "perturbation_generator"):
        maps = [np.load(p) for p in (figs / "all_methods").glob(f"*_{m}.npy")]
        assert len(maps) == 3, m
        assert all(a.shape == (32, 32) and 0 <= a.min() and a.max() <= 1 + 1e-6 for a in maps), m
    for method in ("sc", "gradcam"):
        assert len(list((figs / method).glob("*.png"))) == 3  # one frame per class
    page = (work / "report.html").read_text()  # the demo ends with its offline report
    assert summary["report"] == str(work / "report.html") and "Saliency gallery" in page and "http" not in page


def test_resuming_accepts_the_starting_command_with_more_steps_and_refuses_other_data(tmp_path, capsys):
    from lclsc_jax.train import config as C
    from lclsc_jax.train import loop

    work = tmp_path / "run"
    (work / "checkpoints" / "10").mkdir(parents=True)  # a run with a saved step: something to resume
    started = {"data.source": str(tmp_path / "manifest.csv"), "data.image_size": 48, "train.steps": 10}
    (work / "config.json").write_text(json.dumps(C.to_dict(C.load("tiny", started))))
    again = loop.resolve_config(str(work), C.load("tiny"), {**started, "train.steps": 20})  # the same command
    assert again.train.steps == 20 and again.data.image_size == 48 and again.data.source == started["data.source"]
    assert loop.resolve_config(str(work), None, {"train.steps": 30}).train.steps == 30  # no --config
    with pytest.raises(ValueError, match="data.image_size: 48 -> 64"):
        loop.resolve_config(str(work), None, {"data.image_size": 64})
    with pytest.raises(ValueError, match="data.image_size"):  # the preset without the run's --set
        loop.resolve_config(str(work), C.load("tiny"), {"train.steps": 20})
    other = tmp_path / "other.csv"
    assert cli.main(["train", "--workdir", str(work), "--data", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and str(other) in err
