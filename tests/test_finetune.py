"""Fine-tuning controls: a frozen backbone for N steps, then a lower backbone learning rate (train.*)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import cli, interop
from lclsc_jax.protocols import runs
from lclsc_jax.train import config as C
from lclsc_jax.train import loop
from lclsc_jax.train import state as S

PARAMS = {"conv1": {"kernel": jnp.ones((2, 3))},
          "layer1_0": {"conv1": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}},
          "head": {"proj": {"kernel": jnp.ones((2, 2))}}, "fc": {"bias": jnp.ones(3)}}


def _updates(optimizer, steps, **train):
    cfg = C.load("tiny", {"train.optimizer": optimizer, "train.warmup_steps": 0, "train.grad_clip": 0.0, **train})
    tx = S.make_optimizer(cfg)
    opt_state = tx.init(PARAMS)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    out = []
    for _ in range(steps):
        u, opt_state = tx.update(grads, opt_state, PARAMS)
        out.append(jax.tree_util.tree_map(np.asarray, u))
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_then_scaled_backbone(optimizer):
    plain = _updates(optimizer, 5)
    tuned = _updates(optimizer, 5, **{"train.freeze_backbone_steps": 3, "train.backbone_lr_scale": 0.1})
    for step, (p, t) in enumerate(zip(plain, tuned)):
        for group in ("head", "fc"):  # the heads train as without the controls
            jax.tree_util.tree_map(np.testing.assert_allclose, t[group], p[group])
        for group in ("conv1", "layer1_0"):  # the same moments, multiplied by 0 then by 0.1
            want = jax.tree_util.tree_map(lambda x: x * (0.0 if step < 3 else 0.1), p[group])
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), t[group], want)
        assert np.abs(t["head"]["proj"]["kernel"]).min() > 0


def test_default_optimizer_state_is_unchanged():
    # Without the controls the optimizer (and so a checkpoint's opt_state) has its old structure.
    cfg = C.load("tiny")
    plain = jax.tree_util.tree_structure(S.make_optimizer(cfg).init(PARAMS))
    cfg2 = C.load("tiny", {"train.backbone_lr_scale": 0.5})
    assert jax.tree_util.tree_structure(S.make_optimizer(cfg2).init(PARAMS)) != plain
    assert S.param_groups(PARAMS) == {
        "conv1": {"kernel": "backbone"}, "layer1_0": {"conv1": {"kernel": "backbone", "bias": "backbone"}},
        "head": {"proj": {"kernel": "head"}}, "fc": {"bias": "head"}}


@pytest.mark.parametrize("bad, match", [({"train.freeze_backbone_steps": -1}, "freeze_backbone_steps"),
                                        ({"train.backbone_lr_scale": -0.5}, "backbone_lr_scale")])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        C.load("tiny", bad)


def test_cli_init_from_with_a_frozen_backbone(tmp_path):
    # A PyTorch-named file of the tiny backbone; `lclsc train --init-from` with the backbone frozen for
    # the whole run keeps it bit for bit; unfrozen after 2 of the 4 steps it moves.
    cache = str(tmp_path / "cache")
    cfg = C.load("tiny", {"data.cache_dir": cache})
    model = loop.build_model(cfg, 3)
    variables = model.init(jax.random.key(5), jnp.zeros((1, cfg.data.image_size, cfg.data.image_size,
                                                            cfg.data.channels)))
    path = interop.export_torch_weights(variables, "tiny", tmp_path / "backbone.safetensors")
    args = ["--config", "tiny", "--no-progress", "--set", "train.steps=4", "train.checkpoint_every=4",
            "train.eval_every=4", f"data.cache_dir={cache}"]
    for name, freeze in (("frozen", 100), ("thawed", 2)):
        code = cli.main(["train", "--workdir", str(tmp_path / name), *args, f"train.freeze_backbone_steps={freeze}",
                         "train.backbone_lr_scale=0.5", "--init-from", str(path)])
        assert code == 0
    file_params = variables["params"]
    for name, same in (("frozen", True), ("thawed", False)):
        got = runs.load_run(str(tmp_path / name), "latest").variables["params"]
        backbone = [k for k in got if k not in S.HEAD_GROUPS]
        assert backbone and set(backbone) == {k for k in file_params if k not in S.HEAD_GROUPS}
        equal = all(np.array_equal(a, b) for k in backbone for a, b in
                    zip(jax.tree_util.tree_leaves(got[k]), jax.tree_util.tree_leaves(file_params[k])))
        assert equal is same, name
        head_moved = any(not np.array_equal(a, b) for a, b in
                         zip(jax.tree_util.tree_leaves(got["head"]), jax.tree_util.tree_leaves(file_params["head"])))
        assert head_moved  # the heads are the run's own (the file's fc/head are skipped)
