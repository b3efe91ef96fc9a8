"""One prediction path: ``data.pad_rows`` / ``array_batches``, ``protocols.runs.predict`` and who calls it.

Probabilities are checked against NumPy recomputations of the two policies (GEI cosine softmax
for contrastive runs, softmax of the linear head for ``ce`` runs) from the model's raw outputs.
"""

import os

import numpy as np
import pytest

from lclsc_jax import data
from lclsc_jax.protocols import cross_validation, runs
from lclsc_jax.train import config as C
from lclsc_jax.train import loop
from lclsc_jax.train import predict as predict_lib


def test_pad_rows_repeats_the_first_row_or_the_fill_and_marks_valid():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    p, valid = data.pad_rows(x, 5)
    np.testing.assert_array_equal(p, np.concatenate([x, x[[0, 0]]]))
    np.testing.assert_array_equal(valid, [True, True, True, False, False])
    p, valid = data.pad_rows(x[:0], 2, fill=np.array([7.0, 8.0], np.float32))
    np.testing.assert_array_equal(p, [[7, 8], [7, 8]])
    assert not valid.any()
    p, valid = data.pad_rows(x, 3)
    assert p is x or np.array_equal(p, x)
    assert valid.all()
    with pytest.raises(ValueError, match="do not fit"):
        data.pad_rows(x, 2)
    with pytest.raises(ValueError, match="empty"):
        data.pad_rows(x[:0], 2)


def test_array_batches_normalise_and_pad_the_last_batch():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    batches = list(data.array_batches(imgs, 2))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (2, 4, 4, 1) and b["valid"].shape == (2,)
    got = np.concatenate([b["image"][b["valid"]] for b in batches])
    np.testing.assert_allclose(got, (imgs / 255.0 - 0.5) / 0.25, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["index"][b["valid"]] for b in batches]), np.arange(5))
    assert batches[-1]["valid"].tolist() == [True, False]


def _train(root, loss):
    cfg = C.load("tiny", {"data.cache_dir": str(root / "cache"), "train.steps": 4, "train.eval_every": 4,
                          "train.checkpoint_every": 4, "loss.name": loss})
    work = str(root / loss)
    loop.train(cfg, work, progress=False)
    return work


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return {loss: _train(root, loss) for loss in ("lcl_sc", "ce")}


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_policy(run, x):
    """What the run should predict for inputs ``x``, recomputed in NumPy from the model's raw outputs."""
    out = run.model.apply(run.variables, x, train=False)
    if run.cfg.loss.name == "ce":
        return _softmax(np.asarray(out["logits"], np.float64))
    z = np.asarray(out["embedding"], np.float64)
    g = np.asarray(run.state.global_emb, np.float64)
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    return _softmax(cos / run.cfg.loss.tau)


@pytest.mark.parametrize("loss", ["lcl_sc", "ce"])
def test_predict_on_records_and_on_images_follow_the_run_policy(trained, loss):
    run = runs.load_run(trained[loss], "latest")
    ds = loop.load_dataset(run.cfg)
    idx = runs.run_splits(trained[loss], run.cfg, ds)["test"][:11]  # not a multiple of the batch: padding
    rec = runs.predict(run, ds, idx)
    images = np.stack([ds.source[int(i)]["image"] for i in idx])
    img = runs.predict(run, images)
    assert rec["probs"].shape == (len(idx), len(run.class_names))
    np.testing.assert_array_equal(rec["index"], idx)
    np.testing.assert_array_equal(rec["label"], ds.labels[idx])
    np.testing.assert_allclose(img["probs"], rec["probs"], atol=1e-6)
    np.testing.assert_allclose(rec["probs"], _numpy_policy(run, data.normalize_images(images)), atol=2e-5)
    with pytest.raises(ValueError, match="indices"):
        runs.predict(run, ds)


def test_every_protocol_predicts_through_the_one_path(trained, tmp_path, monkeypatch):
    calls = []
    real = predict_lib.predict_batches

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(predict_lib, "predict_batches", counting)
    work = trained["lcl_sc"]
    run = runs.load_run(work, "latest")
    ds = loop.load_dataset(run.cfg)
    test = runs.run_splits(work, run.cfg, ds)["test"]

    runs.evaluate_run(work, which="latest", out_dir=str(tmp_path / "eval"), figures=False)
    assert len(calls) == 1
    frame = str(tmp_path / "f.png")
    from PIL import Image

    Image.fromarray(ds.source[int(test[0])]["image"][..., 0]).save(frame)
    runs.predict_files(work, [frame], which="latest")
    assert len(calls) == 2
    cross_validation._predict_fold(work, ds, test, "latest")
    assert len(calls) == 3
    cfg = C.load("tiny", {"data.cache_dir": run.cfg.data.cache_dir, "train.steps": 2, "train.eval_every": 2,
                          "train.checkpoint_every": 2})
    loop.train(cfg, str(tmp_path / "val"), progress=False)  # training validation
    assert len(calls) >= 4
    assert os.path.exists(tmp_path / "eval" / "metrics.json")
