"""Streaming prediction (``protocols.stream``): one compiled function per frame, the causal window, the filter.

References are independent: ``runs.predict`` (the batched prediction path), ``explain.saliency`` on the
frame, NumPy cosine scores from the model's embedding, and a NumPy causal-window loop written here.
"""

import json

import numpy as np
import pytest
from PIL import Image

from lclsc_jax import data, explain
from lclsc_jax.protocols import runs, stream
from lclsc_jax.train import config as C
from lclsc_jax.train import loop

pytestmark = pytest.mark.slow  # trains two tiny runs (~1 min on 2 shared cores)

SETTINGS = {"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
            "synthetic.nondiagnostic_fraction": 0.3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    common = {**SETTINGS, "data.cache_dir": str(root / "cache")}
    loop.train(C.load("tiny", common), str(root / "cls"), progress=False)
    loop.train(C.load("tiny", {**common, "data.target": "diagnostic", "loss.name": "ce"}), str(root / "filt"),
               progress=False)
    run, frun = runs.load_run(str(root / "cls")), runs.load_run(str(root / "filt"))
    ds = loop.load_dataset(run.cfg)
    test = runs.run_splits(run.workdir, run.cfg, ds)["test"]
    pat, seq = ds.patients[test[0]], ds.sequence[test[0]]
    idx = [int(i) for i in test if ds.patients[i] == pat and ds.sequence[i] == seq]
    idx = sorted(idx, key=lambda i: ds.frame[i])
    frames = np.stack([ds.source[i]["image"] for i in idx])
    if len(frames) < 6:  # a short sequence: the whole test split, in record order, is the stream
        frames = np.stack([ds.source[int(i)]["image"] for i in test])
    return {"root": root, "run": run, "filter": frun, "frames": frames}


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_windows(scores, probs, keep, window, how):
    """NumPy causal window: per position, the aggregate of the kept frames among the last ``window`` ones."""
    out = []
    for t in range(len(scores)):
        lo = max(0, t - window + 1)
        k = keep[lo:t + 1]
        if not k.any():
            out.append(-1)
            continue
        if how == "mean_score":
            out.append(int(np.argmax(scores[lo:t + 1][k].mean(axis=0))))
        else:
            p = probs[lo:t + 1][k]
            votes = np.zeros(probs.shape[1])
            for row in p:
                votes[row.argmax()] += row.max()
            out.append(int(np.argmax(votes)))
    return out


def test_streamed_outputs_equal_the_batched_path_and_the_saliency_api(trained):
    run, frun, frames = trained["run"], trained["filter"], trained["frames"]
    sp = stream.StreamPredictor.from_runs(run, frun, saliency="gradcam", window=4)
    outs = [sp(f) for f in frames]
    probs = np.stack([o["probs"] for o in outs])
    np.testing.assert_allclose(probs, runs.predict(run, frames)["probs"], atol=2e-5)
    pdiag = np.array([o["p_diagnostic"] for o in outs])
    np.testing.assert_allclose(pdiag, runs.predict(frun, frames)["probs"][:, 1], atol=2e-5)
    x = data.normalize_images(frames)
    z = np.asarray(run.model.apply(run.variables, x, train=False)["embedding"], np.float64)
    g = np.asarray(run.global_emb, np.float64)
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(np.stack([o["scores"] for o in outs]), cos, atol=2e-5)  # GEI scores = cosines
    for k in (0, len(frames) - 1):
        ref = explain.saliency("gradcam", run.model, run.variables, x[k:k + 1], None, "last",
                               global_emb=run.global_emb, tau=run.cfg.loss.tau)
        np.testing.assert_allclose(outs[k]["map"], np.asarray(ref)[0], atol=1e-4)
    assert sp._fn._cache_size() == 1  # one compilation for the whole stream
    assert all(o["latency_ms"] > 0 for o in outs)


def test_sc_maps_and_a_linear_head_classifier(trained):
    run, frun, frames = trained["run"], trained["filter"], trained["frames"][:3]
    sp = stream.StreamPredictor.from_runs(run, saliency="sc")
    x = data.normalize_images(frames)
    ref = explain.saliency("sc", run.model, run.variables, x[:1], None, global_emb=run.global_emb,
                           tau=run.cfg.loss.tau, **run.saliency_options("sc"))
    np.testing.assert_allclose(sp(frames[0])["map"], np.asarray(ref)[0], atol=1e-4)
    # the filter's own model as a linear-head classifier: scores are log-probabilities of its softmax
    lin = stream.StreamPredictor(frun.model, frun.variables, frun.cfg, frun.class_names, saliency="none")
    outs = [lin(f) for f in frames]
    logits = np.asarray(frun.model.apply(frun.variables, x, train=False)["logits"], np.float64)
    np.testing.assert_allclose(np.stack([o["probs"] for o in outs]), _softmax(logits), atol=2e-5)
    np.testing.assert_allclose(np.stack([o["scores"] for o in outs]), np.log(_softmax(logits)), atol=2e-4)
    assert "map" not in outs[0] and "p_diagnostic" not in outs[0] and all(o["kept"] for o in outs)


@pytest.mark.parametrize("how", ["mean_score", "vote"])
def test_online_window_and_rejected_frames_match_a_numpy_reference(trained, how):
    run, frun, frames = trained["run"], trained["filter"], trained["frames"]
    pdiag = runs.predict(frun, frames)["probs"][:, 1]
    threshold = float(np.median(pdiag))  # about half the frames rejected
    sp = stream.StreamPredictor.from_runs(run, frun, saliency="none", window=3, aggregate=how, threshold=threshold)
    outs = [sp(f) for f in frames]
    keep = pdiag >= threshold
    assert 0 < keep.sum() < len(keep)
    assert [o["kept"] for o in outs] == keep.tolist()
    scores = np.stack([o["scores"] for o in outs]).astype(np.float64)
    probs = np.stack([o["probs"] for o in outs]).astype(np.float64)
    assert [o["window_decision"] for o in outs] == _reference_windows(scores, probs, keep, 3, how)
    dec, seq_probs = sp.sequence_decision()
    assert dec == _reference_windows(scores, probs, keep, len(frames), how)[-1]
    assert np.isclose(np.nansum(seq_probs), 1.0)
    # a rejected frame never counts: windows of rejected frames only are undecided
    for t in range(len(keep)):
        if not keep[max(0, t - 2):t + 1].any():
            assert outs[t]["window_decision"] == -1 and np.isnan(outs[t]["window_scores"]).all()


def test_window_frames_and_errors(trained):
    run, frun = trained["run"], trained["filter"]
    assert stream.window_frames(1.0, 12) == 12 and stream.window_frames(0.01, 12) == 1
    assert stream.window_frames(2.5, 10) == 25
    with pytest.raises(ValueError, match="> 0 s"):
        stream.window_frames(0, 12)
    with pytest.raises(ValueError, match="frame filter"):
        stream.StreamPredictor.from_runs(frun)
    with pytest.raises(ValueError, match="not a frame filter"):
        stream.StreamPredictor.from_runs(run, run)
    sp = stream.StreamPredictor.from_runs(run, saliency="none")
    with pytest.raises(ValueError, match="uint8"):
        sp(np.zeros((16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="saliency"):
        stream.StreamPredictor.from_runs(run, saliency="occlusion")


def test_predict_stream_on_a_frame_folder_writes_rows_and_summary(trained, tmp_path):
    run, frames = trained["run"], trained["frames"][:7]
    folder = tmp_path / "frames"
    folder.mkdir()
    for k, f in enumerate(frames):  # names that sort wrongly as text: 1, 10, 2, ...
        Image.fromarray(f[..., 0]).save(folder / f"img{k * 5 + 1}.png")
    res = stream.predict_stream(run.workdir, str(folder), filter_workdir=trained["filter"].workdir, window_s=0.25,
                                fps=8, out_json=str(tmp_path / "p.json"), out_csv=str(tmp_path / "p.csv"),
                                saliency="none", progress=False)
    assert res["window"]["frames"] == 2 and res["fps"] == 8.0
    rows = res["frames"]
    assert [r["name"] for r in rows] == [f"img{k * 5 + 1}.png" for k in range(7)]
    ref = runs.predict(run, frames)["probs"]
    got = np.array([[r[f"p_{c}"] for c in run.class_names] for r in rows])
    np.testing.assert_allclose(got, ref, atol=2e-5)
    np.testing.assert_allclose([r["time_s"] for r in rows], np.arange(7) / 8.0)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["summary"]["frames"] == 7 and saved["classes"] == list(run.class_names)
    assert saved["summary"]["kept"] == sum(r["kept"] for r in rows)
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert header == stream.csv_columns(run.class_names)
