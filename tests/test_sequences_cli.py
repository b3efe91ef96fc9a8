"""`lclsc sequences` end to end: a tiny classifier and filter trained through the CLI, the JSON's numbers
recomputed independently from `runs.predict` outputs, and the errors a user can make."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lclsc_jax.protocols import runs
from lclsc_jax.train import loop

DATA = ["synthetic.sequences_per_patient=2", "synthetic.nondiagnostic_fraction=0.3",
        "synthetic.class_gain_shortcut=0.8"]


def _lclsc(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    cache = f"data.cache_dir={root / 'cache'}"
    cls, filt = str(root / "cls"), str(root / "filt")
    r = _lclsc("train", "--config", "tiny", "--workdir", cls, "--no-progress", "--set", *DATA, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _lclsc("train", "--config", "tiny", "--workdir", filt, "--no-progress", "--set", *DATA, cache,
               "data.target=diagnostic", "loss.name=ce")
    assert r.returncode == 0, r.stderr[-3000:]
    out = str(root / "out")
    r = _lclsc("sequences", "--workdir", cls, "--filter", filt, "--fps", "12", "--window", "0.25", "--n-boot", "200",
               "--temporal-steps", "60", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "window accuracy" in r.stdout and "sequences.json" in r.stdout
    assert "[sequences] fitting the temporal model" in r.stderr
    with open(os.path.join(out, "sequences.json")) as f:
        summary = json.load(f)
    return {"root": root, "cls": cls, "filt": filt, "out": out, "summary": summary, "cache": cache}


def _reference(trained):
    """Independent recomputation: predictions, groups and windows from plain loops."""
    run = runs.load_run(trained["cls"], num_devices=1)
    frun = runs.load_run(trained["filt"], num_devices=1)
    ds = loop.load_dataset(run.cfg)
    test = runs.run_splits(trained["cls"], run.cfg, ds)["test"]
    pr, fp = runs.predict(run, ds, test), runs.predict(frun, ds, test)
    z = pr["embedding"] / np.linalg.norm(pr["embedding"], axis=1, keepdims=True)
    g = np.asarray(run.global_emb, np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    seqs = {}
    for row, i in enumerate(pr["index"]):
        seqs.setdefault((str(ds.patients[i]), str(ds.sequence[i])), []).append((int(ds.frame[i]), row))
    seqs = [[row for _, row in sorted(v)] for v in seqs.values()]
    return {"probs": pr["probs"], "scores": z @ g.T, "label": pr["label"], "p_diag": fp["probs"][:, 1],
            "diag": np.asarray(ds.diagnostic)[pr["index"]], "seqs": seqs, "run": run, "ds": ds}


@pytest.mark.slow
def test_sequences_json_matches_independent_recomputation(trained):
    s, ref = trained["summary"], _reference(trained)
    y, probs, keep = ref["label"], ref["probs"], ref["p_diag"] >= 0.5
    correct = probs.argmax(1) == y
    assert s["n_frames"] == len(y) and s["n_sequences"] == len(ref["seqs"]) and s["window_frames"] == 3
    assert s["frame_accuracy"]["all"]["estimate"] == pytest.approx(correct.mean())
    assert s["frame_accuracy"]["filter_kept"]["estimate"] == pytest.approx(correct[keep].mean())
    assert s["frame_accuracy"]["diagnostic_only"]["estimate"] == pytest.approx(correct[ref["diag"]].mean())
    bad = ~ref["diag"]
    assert s["filter"]["sensitivity"] == pytest.approx((~keep & bad).sum() / bad.sum())
    assert s["filter"]["specificity"] == pytest.approx((keep & ~bad).sum() / (~bad).sum())
    assert s["filter"]["kept_fraction"] == pytest.approx(keep.mean())

    # causal 3-frame windows: mean GEI score over kept frames; undecided (no kept frame) counts as wrong
    hits, und = [], []
    for rows in ref["seqs"]:
        for t in range(len(rows)):
            win = [r for r in rows[max(0, t - 2): t + 1] if keep[r]]
            und.append(not win)
            hits.append(bool(win) and int(np.argmax(ref["scores"][win].mean(0))) == y[rows[0]])
    w = s["window_accuracy"]["mean_score/filter"]
    assert w["estimate"] == pytest.approx(np.mean(hits))
    assert w["undecided_fraction"] == pytest.approx(np.mean(und))
    assert w["ci_low"] <= w["estimate"] <= w["ci_high"]

    # whole-sequence confidence-weighted vote over every frame
    seq_hits = []
    for rows in ref["seqs"]:
        votes = np.zeros(probs.shape[1])
        for r in rows:
            votes[probs[r].argmax()] += probs[r].max()
        seq_hits.append(int(votes.argmax()) == y[rows[0]])
    assert s["sequence_accuracy"]["vote/all"]["estimate"] == pytest.approx(np.mean(seq_hits))
    for key in ("mean_score/all", "vote/filter", "temporal/all", "temporal/filter", "mean_score/oracle"):
        assert key in s["window_accuracy"] and key in s["sequence_accuracy"]
    st = s["stability"]["mean_score/all"]["growing"]
    assert 0 < st["median_s"] <= st["p90_s"] <= max(map(len, ref["seqs"])) / 12 + 1e-9
    for name in ("accuracy_vs_window.png", "timelines.png", "sequences.md", "temporal_all.msgpack"):
        assert os.path.getsize(os.path.join(trained["out"], name)) > 0


@pytest.mark.slow
def test_saved_temporal_model_reproduces_its_window_accuracy(trained):
    from lclsc_jax.models.temporal import TemporalHead
    from lclsc_jax.train import temporal as tt

    s, ref = trained["summary"], _reference(trained)
    info = s["temporal_model"]["all"]
    run = ref["run"]
    test = runs.run_splits(trained["cls"], run.cfg, ref["ds"])["test"]
    emb = runs.predict(run, ref["ds"], test)["embedding"]
    model = TemporalHead(num_classes=len(run.class_names), window=info["window_frames"], hidden=info["hidden"])
    template = model.init(jax.random.PRNGKey(0), np.zeros((1, 2, emb.shape[1]), np.float32),
                          np.ones((1, 2), bool))["params"]
    params = tt.load_params(os.path.join(trained["out"], info["params"]), template)
    probs = tt.predict_temporal(model, params, [emb[rows] for rows in ref["seqs"]])
    hits = np.concatenate([p.argmax(1) == ref["label"][rows] for p, rows in zip(probs, ref["seqs"])])
    assert s["window_accuracy"]["temporal/all"]["estimate"] == pytest.approx(hits.mean())


@pytest.mark.slow
def test_sequences_cli_errors(trained):
    r = _lclsc("sequences", "--workdir", trained["cls"], "--filter", trained["cls"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--filter" in r.stderr and "data.target=diagnostic" in r.stderr
    r = _lclsc("sequences", "--workdir", str(trained["root"] / "nope"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
    r = _lclsc("sequences", "--workdir", trained["cls"], "--window", "0.01")
    assert r.returncode == 2 and "at least 1 frame" in r.stderr and "Traceback" not in r.stderr
    # one frame per sequence: windows need sequences
    one = str(trained["root"] / "one")
    r = _lclsc("train", "--config", "tiny", "--workdir", one, "--no-progress", "--set", "train.steps=2",
               "train.eval_every=2", "train.checkpoint_every=2", "synthetic.sequences_per_patient=8",
               trained["cache"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _lclsc("sequences", "--workdir", one, "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "one frame per sequence" in r.stderr and "windows need sequences" in r.stderr
    # a filter trained on other data
    r = _lclsc("sequences", "--workdir", one, "--filter", trained["filt"], "--no-progress")
    assert r.returncode == 2 and "data differ" in r.stderr and "Traceback" not in r.stderr
