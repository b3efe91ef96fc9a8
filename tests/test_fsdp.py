"""FSDP (ZeRO-3): the (data, fsdp) mesh, the sharding rule, the same numbers with the state sharded, 1/N memory.

Every number is checked against an independent computation: the same steps on one device (plain
replication), XLA's own memory analysis of the compiled step, the shard arithmetic of the shapes,
the arrays written to a checkpoint by another sharding.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lclsc_jax import cli
from lclsc_jax.protocols import runs
from lclsc_jax.train import config as C
from lclsc_jax.train import loop
from lclsc_jax.train import sharding as shd
from lclsc_jax.train import steps as S
from lclsc_jax.train.checkpoint import Checkpointer
from lclsc_jax.train.state import make_optimizer

B, HW, NC = 16, 32, 3
CFG = C.load("tiny", ["loss.name=lcl_sc"])
#: (devices, fsdp): one device; 8 data-parallel; 2 data x 4 fsdp; 8-way fsdp.
LAYOUTS = [(1, 1), (8, 1), (8, 4), (8, 8)]


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    assert jax.device_count() >= 8, (
        f"{jax.device_count()} devices: tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "before JAX starts; an XLA_FLAGS already in the environment overrides it")


def _batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(B, HW, HW, 1)).astype(np.float32),
             "label": rng.integers(0, NC, B).astype(np.int32)} for _ in range(n)]


@functools.cache
def _model():
    return loop.build_model(CFG, NC)


@functools.cache
def _initial_state():
    """The fresh state on the host (initialised once: every layout starts from the same numbers)."""
    return jax.device_get(loop.init_state(CFG, _model(), NC, shd.make_mesh(1)))


@functools.cache
def _compiled(num_devices: int, fsdp: int):
    """Mesh, initial state and the train step compiled ahead of time for one layout (shared by the tests)."""
    mesh = shd.make_mesh(num_devices, fsdp=fsdp)
    state = jax.device_put(_initial_state(), shd.state_sharding(_initial_state(), mesh))
    step = S.jit_train_step(S.make_train_step(_model(), make_optimizer(CFG), CFG), mesh, shd.shardings_of(state),
                            donate=False)
    batch = shd.to_global(_batches(1)[0], mesh, S.TRAIN_KEYS)
    return mesh, state, step.lower(state, batch).compile()


@functools.cache
def _trained(num_devices: int, fsdp: int):
    """Three steps on fixed batches: (final state, losses)."""
    mesh, state, step = _compiled(num_devices, fsdp)
    losses = []
    for b in _batches(3):
        state, m = step(state, shd.to_global(b, mesh, S.TRAIN_KEYS))
        losses.append(float(m["loss"]))
        assert float(m["nonfinite"]) == 0.0
    return state, losses


def _assert_states_close(a, b):
    np.testing.assert_allclose(np.asarray(a.global_emb), np.asarray(b.global_emb), atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=2e-5)


def test_the_sharding_rule_splits_the_largest_divisible_axis():
    assert shd.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")  # output channels: the largest
    assert shd.fsdp_spec((3, 3, 128, 128), 8) == P(None, None, "fsdp")  # a tie: the first of the largest
    assert shd.fsdp_spec((1000, 6), 8) == P("fsdp")
    assert shd.fsdp_spec((6, 1000), 8) == P(None, "fsdp")
    assert shd.fsdp_spec((1001, 8), 8) == P(None, "fsdp")  # 1001 does not split 8 ways; 8 does
    assert shd.fsdp_spec((4097,), 2) == P()  # no axis divides: replicated
    assert shd.fsdp_spec((128,), 8) == P()  # below min_size: replicated
    assert shd.fsdp_spec((128,), 8, min_size=64) == P("fsdp")
    assert shd.fsdp_spec((), 8) == P()
    assert shd.fsdp_spec((3, 3, 64, 128), 1) == P()  # fsdp = 1: all replicated


def test_mesh_axes_batch_split_and_a_bad_fsdp_is_a_clear_error():
    mesh = shd.make_mesh(8, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert shd.data_parallel_size(mesh) == 8
    x = jax.device_put(np.arange(16.0), shd.batch_sharded(mesh))
    assert sorted(int(s.data[0]) for s in x.addressable_shards) == list(range(0, 16, 2))  # 2 rows on each device
    assert dict(shd.make_mesh(8).shape) == {"data": 8, "fsdp": 1}
    msg = r"train.fsdp=3 must divide the number of devices \(8\): use one of 1, 2, 4, 8$"
    with pytest.raises(ValueError, match=msg):
        shd.make_mesh(8, fsdp=3)
    with pytest.raises(ValueError, match="global batch size 12"):
        shd.check_batch_size(12, mesh)


def test_state_sharding_shards_parameters_and_optimizer_state_only():
    mesh = shd.make_mesh(8, fsdp=4)
    abstract = loop.abstract_state(CFG, _model(), NC, mesh)
    spec = lambda x: x.sharding.spec  # noqa: E731
    p = abstract.params
    assert spec(p["stage4_conv"]["kernel"]) == P(None, None, "fsdp")  # (3, 3, 128, 128)
    assert spec(p["stage3_conv"]["kernel"]) == P(None, None, None, "fsdp")  # (3, 3, 64, 128)
    assert spec(p["head"]["hidden"]["kernel"]) == P("fsdp")  # (128, 128)
    assert spec(p["stem_conv"]["kernel"]) == P()  # 144 elements
    assert spec(p["stage4_bn"]["scale"]) == P()
    adam = abstract.opt_state[1][0]  # clip, then (adamw's scale_by_adam, ...)
    assert spec(adam.mu["stage4_conv"]["kernel"]) == spec(adam.nu["stage4_conv"]["kernel"]) == P(None, None, "fsdp")
    assert spec(adam.count) == P()
    for x in [abstract.step, abstract.rng, abstract.global_emb, abstract.seen,
              *jax.tree_util.tree_leaves(abstract.batch_stats)]:
        assert spec(x) == P()
    # fsdp = 1 is today's state: everything replicated.
    assert all(x.sharding.is_fully_replicated
               for x in jax.tree_util.tree_leaves(loop.abstract_state(CFG, _model(), NC, shd.make_mesh(8))))


def test_same_numbers_on_one_device_data_parallel_and_fsdp():
    ref, ref_losses = _trained(1, 1)
    ref = jax.device_get(ref)
    for layout in LAYOUTS[1:]:
        state, losses = _trained(*layout)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(layout))
        _assert_states_close(jax.device_get(state), ref)
        assert int(state.step) == 3


def test_the_compiled_step_keeps_the_state_sharded():
    """XLA's memory analysis of the step: its arguments are the sharded state plus a batch slice per device."""
    batch_bytes = (B * HW * HW * 4 + B * 4) // 8
    sizes = {}
    for fsdp in (1, 8):
        _, state, compiled = _compiled(8, fsdp)
        held = shd.bytes_per_device(state)
        assert len(set(held.values())) == 1  # every device holds the same amount
        sizes[fsdp] = next(iter(held.values()))
        mem = compiled.memory_analysis()
        assert mem.argument_size_in_bytes == sizes[fsdp] + batch_bytes
        out_state = compiled.output_shardings[0]
        assert jax.tree_util.tree_map(lambda s: s.spec, out_state) == jax.tree_util.tree_map(
            lambda x: x.sharding.spec, state)  # the new state stays sharded as it came in
    assert sizes[8] < 0.2 * sizes[1]
    hlo = _compiled(8, 8)[2].as_text()
    assert "all-gather" in hlo  # parameters are gathered for the forward/backward


@pytest.mark.parametrize("n", [2, 4, 8])
def test_parameter_and_optimizer_bytes_fall_as_one_over_n(n):
    """ResNet-18 with AdamW: per-device bytes = replicated leaves + the rest / N (from the shardings)."""
    cfg = C.load("tiny", ["model.arch=resnet18"])
    model = loop.build_model(cfg, NC)

    def held(mesh):
        abstract = loop.abstract_state(cfg, model, NC, mesh)
        tree = {"params": abstract.params, "opt_state": abstract.opt_state}
        per_device = shd.bytes_per_device(tree)
        assert len(per_device) == 8 and len(set(per_device.values())) == 1
        return tree, next(iter(per_device.values()))

    _, whole = held(shd.make_mesh(8))
    tree, sharded = held(shd.make_mesh(8, fsdp=n))
    leaves = jax.tree_util.tree_leaves(tree)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    rep = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves if x.sharding.is_fully_replicated)
    assert whole == total > 100e6  # 11M parameters x (params, mu, nu) x 4 bytes, all on every device
    assert rep < 0.01 * total  # biases, norms, the Adam count: a small replicated part
    assert sharded == rep + (total - rep) // n  # every sharded leaf splits evenly
    assert 1 / n <= sharded / whole <= 1 / n + rep / total
    if n == 8:  # the same measure from allocated arrays (8-way: ~17 MB per device)
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        arrays = jax.jit(lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                         out_shardings=shd.shardings_of(tree))()
        assert shd.bytes_per_device(arrays) == shd.bytes_per_device(tree)


@pytest.mark.parametrize("saved, restored", [((8, 4), [(8, 1), (1, 1), (8, 8)]), ((8, 1), [(8, 8), (8, 2)])])
def test_a_checkpoint_restores_under_another_fsdp_size(tmp_path, saved, restored):
    state, _ = _trained(*saved)
    want = jax.device_get(state)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), best_metric=None)
    ckpt.save(3, state)
    ckpt.wait()
    for layout in restored:
        mesh = shd.make_mesh(*layout)
        abstract = loop.abstract_state(CFG, _model(), NC, mesh)
        got = ckpt.restore(3, abstract)
        assert jax.tree_util.tree_map(lambda x: x.sharding, got) == jax.tree_util.tree_map(
            lambda x: x.sharding, abstract), layout
        for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(got)), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ckpt.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def _lclsc(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process on 8 simulated devices (tests/conftest.py's XLA_FLAGS)."""
    return subprocess.run([sys.executable, "-m", "lclsc_jax.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=900)


def _final_params(workdir: str) -> list[np.ndarray]:
    run = runs.load_run(workdir, "latest", num_devices=1)
    assert run.step == 6
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(run.state.params))]


@pytest.mark.slow
def test_cli_trains_resumes_and_evaluates_with_fsdp(tmp_path, cache, capsys):
    """4 steps with ``train.fsdp=4``, resumed by the CLI with ``train.fsdp=8`` to 6, evaluated: = 6 replicated steps."""
    sets = ["train.steps=6", "train.checkpoint_every=2", "train.eval_every=2", "synthetic.num_patients=9",
            "synthetic.images_per_patient=8", f"data.cache_dir={cache}"]
    common = ["--config", "tiny", "--no-progress", "--set", *sets]
    work = str(tmp_path / "fsdp")
    loop.train(C.load("tiny", [*sets, "train.fsdp=4"]), work, stop_after=4, progress=False)
    assert json.load(open(os.path.join(work, "config.json")))["train"]["fsdp"] == 4
    resumed = _lclsc("train", "--workdir", work, *common, "train.fsdp=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr + resumed.stdout and "step 4" in resumed.stderr + resumed.stdout
    evaluated = _lclsc("evaluate", "--workdir", work)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.load(open(os.path.join(work, "eval", "metrics.json")))
    assert metrics["checkpoint_step"] in (2, 4, 6) and 0.0 <= metrics["accuracy"] <= 1.0

    ref = str(tmp_path / "ref")  # the same 6 steps, replicated, uninterrupted
    assert cli.main(["train", "--workdir", ref, *common]) == 0
    for a, b in zip(_final_params(work), _final_params(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    capsys.readouterr()
    assert cli.main(["train", "--workdir", str(tmp_path / "bad"), *common, "train.fsdp=3"]) == 2
    assert "train.fsdp=3 must divide the number of devices (8)" in capsys.readouterr().err
