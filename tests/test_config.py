"""Config presets, overrides and their errors."""

import json

import pytest

from lclsc_jax.train import config as C


def test_presets_are_valid_and_distinct():
    for name, cfg in C.PRESETS.items():
        C.validate(cfg)
    assert C.PRESETS["demo"].model.arch == "tiny"
    assert C.PRESETS["default"].loss.alpha == -1.0  # DESIGN.md: the SC loss defaults to top - bottom


def test_overrides_are_typed():
    cfg = C.load("default", ["train.lr=3e-4", "train.steps=12", "loss.fov_mask=false", "model.arch=resnet50", "seed=7"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.steps, int) and cfg.train.steps == 12
    assert cfg.loss.fov_mask is False and cfg.model.arch == "resnet50" and cfg.seed == 7


@pytest.mark.parametrize("bad,suggestion", [("train.lrr=1", "train.lr"), ("lr=1", "train.lr"),
                                             ("loss.nme=ce", "loss.name"), ("model.arh=tiny", "model.arch")])
def test_unknown_key_names_the_closest(bad, suggestion):
    with pytest.raises(C.ConfigError) as e:
        C.load("default", [bad])
    assert bad.split("=")[0] in str(e.value) and suggestion in str(e.value)


@pytest.mark.parametrize("bad", ["train.steps=abc", "loss.name=mse", "loss.ema_momentum=1.0", "train.batch_size=0",
                                 "loss.k_max=1.5", "loss.fov_mask=maybe", "notakeyvalue"])
def test_bad_values_are_errors(bad):
    with pytest.raises(ValueError):
        C.load("default", [bad])


def test_json_round_trip(tmp_path):
    cfg = C.load("tiny", ["loss.name=ce"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(C.to_dict(cfg)))
    assert C.load(str(path)) == cfg
    path.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(C.ConfigError, match="train.steps"):
        C.load(str(path))


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        C.load("no-such-preset")
