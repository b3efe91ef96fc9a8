"""``lclsc pretrain``: the step (devices, FSDP, accumulation), the loop through the CLI, preemption, fine-tuning.

Numbers are checked against independent computations: the same step on one device, the same batch
without micro-batches, an uninterrupted run, the checkpoint's arrays read back by Orbax directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lclsc_jax import cli
from lclsc_jax.data.splits import label_subset
from lclsc_jax.train import config as C
from lclsc_jax.train import pretrain as pretrain_lib
from lclsc_jax.train import pretrain_state as ps
from lclsc_jax.train import pretrain_steps as psteps
from lclsc_jax.train import sharding
from lclsc_jax.train.reporting import MetricWriter
from lclsc_jax.train.state import make_optimizer

TINY = ["--config", "pretrain-tiny", "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _sets(cache: str, *extra: str) -> list[str]:
    return ["--set", f"data.cache_dir={cache}", *extra]


def _cfg(**over) -> C.Config:
    return C.override(C.load("pretrain-tiny"), over)


def _run_steps(cfg: C.Config, mesh, n: int = 2, seed: int = 0) -> tuple[list[float], dict]:
    """``n`` pretraining steps on a fixed random batch; losses and the final params on the host."""
    model = ps.build_model(cfg)
    tx = make_optimizer(cfg)
    _, shardings = ps.abstract_state(cfg, model, tx, mesh)
    state = jax.jit(lambda k: ps.create_state(model, tx, cfg, k), out_shardings=shardings)(jax.random.PRNGKey(0))
    step = psteps.jit_pretrain_step(psteps.make_pretrain_step(model, tx, cfg), mesh, shardings)
    rng = np.random.default_rng(seed)
    b, s = cfg.train.batch_size, cfg.data.image_size
    batch = {"image": rng.normal(size=(b, s, s, cfg.data.channels)).astype(np.float32),
             "label": rng.integers(0, 3, size=b).astype(np.int32)}
    losses = []
    for _ in range(n):
        state, m = step(state, jax.device_put(batch, sharding.batch_sharded(mesh)))
        losses.append(float(m["loss"]))
        assert float(m["nonfinite"]) == 0.0
    return losses, jax.device_get({"params": state.params, "teacher": state.teacher, "center": state.center})


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


@pytest.mark.parametrize("objective", ["simclr", "dino", "supcon"])
def test_step_is_the_same_on_1_and_8_devices_and_with_fsdp(objective):
    extra = {"views.n_local": 2} if objective == "dino" else {}
    cfg = _cfg(**{"pretrain.objective": objective, **extra})
    ref_losses, ref = _run_steps(cfg, sharding.make_mesh(1))
    assert all(np.isfinite(ref_losses)) and ref_losses[0] > 0
    for fsdp in (1, 4):
        losses, got = _run_steps(C.override(cfg, {"train.fsdp": fsdp}), sharding.make_mesh(8, fsdp=fsdp))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        _assert_trees_close(got, ref)


def test_micro_batches_give_the_gradient_of_one_large_batch():
    """LeNet-5 has no BatchNorm: 4 cached micro-batches == the whole batch at once (SimCLR couples the batch)."""
    cfg = _cfg(**{"model.arch": "lenet5"})
    mesh = sharding.make_mesh(1)
    ref_losses, ref = _run_steps(cfg, mesh)
    losses, got = _run_steps(C.override(cfg, {"pretrain.grad_accum": 4}), mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_trees_close(got, ref)


def test_label_subset_keeps_a_fraction_of_patients_per_class():
    patients = np.repeat([f"p{i}" for i in range(30)], 4)
    labels = np.repeat(np.arange(30) % 3, 4)
    idx = np.arange(len(patients))
    sub = label_subset(patients, labels, idx, 0.25, seed=1)
    kept = np.unique(patients[sub])
    per_class = np.bincount([int(k[1:]) % 3 for k in kept], minlength=3)
    np.testing.assert_array_equal(per_class, [3, 3, 3])  # ceil(0.25 * 10) = 3 of each class's 10
    assert np.all(np.isin(patients[np.isin(patients, kept)], kept)) and len(sub) == 9 * 4
    assert len(np.unique(patients[label_subset(patients, labels, idx, 0.01, seed=1)])) == 3  # at least one each
    assert not np.array_equal(sub, label_subset(patients, labels, idx, 0.25, seed=2))
    np.testing.assert_array_equal(label_subset(patients, labels, idx, 1.0, seed=1), idx)


def test_bad_objective_settings_are_refused(tmp_path, cache, capsys):
    work = str(tmp_path / "w")
    assert cli.main(["pretrain", "--workdir", work, *TINY, *_sets(cache, "views.n_local=2")]) == 2
    assert "simclr contrasts two views" in capsys.readouterr().err
    assert cli.main(["pretrain", "--workdir", work, *TINY, *_sets(cache, "pretrain.objective=byol")]) == 2
    assert "pretrain.objective must be one of" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache):
    """A SimCLR run of the tiny preset through the CLI (6 steps, checkpoints at 3 and 6, probes)."""
    work = str(tmp_path_factory.mktemp("pre") / "run")
    assert cli.main(["pretrain", "--workdir", work, *TINY, *_sets(cache)]) == 0
    return work


@pytest.mark.slow
def test_pretrain_cli_writes_checkpoints_probes_and_a_marker(pretrained):
    assert sorted(os.listdir(os.path.join(pretrained, "checkpoints"))) == ["3", "6"]
    rows = [json.loads(line) for line in open(os.path.join(pretrained, "metrics.jsonl"))]
    probes = [r for r in rows if r["split"] == "probe"]
    assert [r["step"] for r in probes] == [3, 6]
    assert all(0.0 <= r["knn_accuracy"] <= 1.0 and 0.0 <= r["linear_accuracy"] <= 1.0 for r in probes)
    marker = json.load(open(os.path.join(pretrained, ps.MARKER)))
    assert marker["objective"] == "simclr" and marker["arch"] == "tiny"


@pytest.mark.slow
def test_train_init_from_a_pretrain_run_takes_its_backbone(pretrained, tmp_path, cache):
    raw = ocp.StandardCheckpointer().restore(os.path.join(pretrained, "checkpoints", "6", "state"))
    encoder = raw["params"]["encoder"]
    cfg = C.override(C.load("tiny"), {"data.cache_dir": cache, "model.embed_dim": 32})
    from lclsc_jax.train import loop

    model = loop.build_model(cfg, 3)
    state = loop.init_state(cfg, model, 3, sharding.make_mesh(1))
    variables, report = ps.init_from_run(jax.device_get(state.variables), pretrained, cfg)
    assert "step 6" in report and "simclr" in report
    for group, tree in encoder.items():
        if group in ("head", "fc"):
            _assert_trees_close(variables["params"][group], jax.device_get(state.params[group]), 0, 0)
        else:
            _assert_trees_close(variables["params"][group], tree, 0, 0)
    # Through the front door: a fine-tuning run starts from it and trains.
    work = str(tmp_path / "ft")
    assert cli.main(["train", "--workdir", work, "--config", "tiny", "--no-progress", "--init-from", pretrained,
                     "--set", f"data.cache_dir={cache}", "model.embed_dim=32", "train.steps=2"]) == 0
    wrong = cli.main(["train", "--workdir", str(tmp_path / "ft2"), "--config", "tiny", "--no-progress",
                      "--init-from", pretrained, "--set", f"data.cache_dir={cache}", "model.arch=resnet18",
                      "train.steps=2"])
    assert wrong == 2


def _sigterm_at(step):
    original = MetricWriter.write

    def write(self, s, metrics, prefix="train"):
        original(self, s, metrics, prefix)
        if prefix == "train" and s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return write


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_rerun_ends_where_an_uninterrupted_run_does(
        pretrained, tmp_path, cache, capsys, monkeypatch):
    work = str(tmp_path / "w")
    args = ["pretrain", "--workdir", work, *TINY, *_sets(cache, "train.log_every=1")]
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(MetricWriter, "write", _sigterm_at(4))
        assert cli.main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "preempted (SIGTERM) at step 4" in err and "saved a checkpoint of step 4" in err
    assert signal.getsignal(signal.SIGTERM) is before
    assert "4" in os.listdir(os.path.join(work, "checkpoints"))
    assert cli.main(args) == 0
    a = ocp.StandardCheckpointer().restore(os.path.join(work, "checkpoints", "6", "state"))
    b = ocp.StandardCheckpointer().restore(os.path.join(pretrained, "checkpoints", "6", "state"))
    _assert_trees_close(a["params"], b["params"], rtol=1e-5, atol=1e-6)


#: Runs ``lclsc ARGV`` with a pause after each logged step from step 4 on, so it can be killed mid-run.
_SLOW_RUN = """
import sys, time
from lclsc_jax import cli
from lclsc_jax.train.reporting import MetricWriter
write = MetricWriter.write
def slow(self, step, metrics, prefix="train"):
    write(self, step, metrics, prefix)
    if step >= 4:
        time.sleep(30)
MetricWriter.write = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_then_rerun_ends_where_an_uninterrupted_run_does(pretrained, tmp_path, cache):
    work = str(tmp_path / "k")
    args = ["pretrain", "--workdir", work, *TINY, *_sets(cache, "train.log_every=1")]
    env = dict(os.environ)  # the same 8 simulated devices as this process: the same reduction order
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ck = os.path.join(work, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(ck) and "3" in os.listdir(ck)) and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # into step 4's pause
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert sorted(os.listdir(ck)) == ["3"]
    assert cli.main(args) == 0
    a = ocp.StandardCheckpointer().restore(os.path.join(ck, "6", "state"))
    b = ocp.StandardCheckpointer().restore(os.path.join(pretrained, "checkpoints", "6", "state"))
    _assert_trees_close(a["params"], b["params"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_unlabelled_folder_pretrains_without_probes(tmp_path, cache):
    from PIL import Image
    from skimage import data as skdata

    root = tmp_path / "frames"
    images = [skdata.camera(), skdata.moon(), skdata.coins(), skdata.text()]
    for p in range(4):
        (root / f"patient{p}").mkdir(parents=True)
        for i, img in enumerate(images):
            Image.fromarray(np.roll(img, 17 * p, axis=1)).save(root / f"patient{p}" / f"f{i}.png")
    work = str(tmp_path / "u")
    assert cli.main(["pretrain", "--workdir", work, "--data", str(root), "--unlabelled", *TINY,
                     *_sets(cache, "train.batch_size=8", "data.val_fraction=0.25", "data.test_fraction=0.25")]) == 0
    rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert rows and not [r for r in rows if r["split"] == "probe"]
    assert json.load(open(os.path.join(work, "splits.json")))["class_names"] == [pretrain_lib.UNLABELLED]
