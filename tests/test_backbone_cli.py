"""The registry backbones through the commands a user types: train (from scratch and --init-from a
PyTorch file), evaluate, and verify a timm file."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lclsc_jax import cli, interop, models
from lclsc_jax.protocols import runs
from lclsc_jax.train import state as S

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from lclsc_jax.interop.torch_classic import torch_lenet5  # noqa: E402


def _train_args(cache, arch, steps=4):
    return ["--config", "tiny", "--no-progress", "--set", f"model.arch={arch}", f"train.steps={steps}",
            f"train.checkpoint_every={steps}", f"train.eval_every={steps}", f"data.cache_dir={cache}"]


def _backbone_equal(got, file_params):
    a, b = jax.tree_util.tree_leaves(got["backbone"]), jax.tree_util.tree_leaves(file_params["backbone"])
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_train_lenet5_from_a_pytorch_file_then_evaluate(tmp_path, capsys):
    # A PyTorch LeNet-5 (grey frames, a 7-class classifier the run does not use) starts the LCL-SC run;
    # frozen for the whole run its backbone stays bit for bit the file's.
    cache = str(tmp_path / "cache")
    net = torch_lenet5(num_classes=7, in_channels=1)
    path = tmp_path / "lenet5.pth"
    torch.save(net.state_dict(), path)
    file_vars = interop.load_torch_weights(str(path), "lenet5")
    code = cli.main(["train", "--workdir", str(tmp_path / "run"), *_train_args(cache, "lenet5"),
                     "train.freeze_backbone_steps=100", "--init-from", str(path)])
    assert code == 0
    run = runs.load_run(str(tmp_path / "run"), "latest")
    assert run.cfg.model.arch == "lenet5" and set(run.variables["params"]) == {"backbone", "head"}
    assert _backbone_equal(run.variables["params"], file_vars["params"])
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "run")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_train_rejects_a_file_of_another_arch(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    path = tmp_path / "lenet5.pth"
    torch.save(torch_lenet5(num_classes=3, in_channels=1).state_dict(), path)
    code = cli.main(["train", "--workdir", str(tmp_path / "run"), *_train_args(cache, "alexnet", 2),
                     "data.image_size=64", "--init-from", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "features.0.weight" in err or "mis-shaped" in err or "missing" in err


@pytest.fixture(scope="module")
def timm_convnext(tmp_path_factory):
    try:
        from lclsc_jax.interop.timm_reference import reference_model, require_timm

        require_timm()
    except ImportError:
        pytest.skip("timm is not installed")
    from safetensors.torch import save_file

    from lclsc_jax.interop import torch_reference as tref

    torch.manual_seed(0)
    net = reference_model("convnext_tiny", num_classes=4, in_channels=1)
    tref.randomize_batch_norm(net, 0)
    path = tmp_path_factory.mktemp("timm") / "convnext_tiny.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_verify_a_timm_file_from_the_command_line(timm_convnext, capsys):
    code = cli.main(["verify", "--torch-weights", str(timm_convnext), "--arch", "convnext_tiny",
                     "--image-size", "64", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS: convnext_tiny" in out and "features/stage4" in out and "logits" in out
    # The wrong arch for the file: one clear error naming keys, no traceback.
    assert cli.main(["verify", "--torch-weights", str(timm_convnext), "--arch", "densenet121"]) == 2
    assert "features.conv0.weight" in capsys.readouterr().err


@pytest.mark.slow
def test_fine_tune_a_timm_convnext_with_the_usual_controls(timm_convnext, tmp_path):
    # CLE papers' transfer learning: a timm checkpoint, frozen for 2 of 4 steps, then a 10x lower
    # backbone learning rate, with stochastic depth on.
    cache = str(tmp_path / "cache")
    file_vars = interop.load_torch_weights(str(timm_convnext), "convnext_tiny")
    code = cli.main(["train", "--workdir", str(tmp_path / "run"), *_train_args(cache, "convnext_tiny"),
                     "train.freeze_backbone_steps=2", "train.backbone_lr_scale=0.1", "model.drop_path_rate=0.1",
                     "--init-from", str(timm_convnext)])
    assert code == 0
    got = runs.load_run(str(tmp_path / "run"), "latest").variables["params"]
    assert not _backbone_equal(got, file_vars["params"])  # thawed after step 2: it moved
    assert set(got) - set(S.HEAD_GROUPS) == {"backbone"}
    assert models.num_params(got["backbone"]) == models.num_params(file_vars["params"]["backbone"])
