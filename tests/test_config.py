"""Config presets, overrides and their errors."""

import json

import pytest

from lclsc_jax.train import config as C


def test_presets_are_valid_and_distinct():
    for name, cfg in C.PRESETS.items():
        C.validate(cfg)
    assert C.PRESETS["demo"].model.arch == "tiny"
    assert C.PRESETS["default"].loss.alpha == -1.0  # the SC loss defaults to top - bottom (docs/method.md)


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


@pytest.mark.parametrize("bad,msg", [("model.arch=resnet19", "model.arch must be one of"),
                                     ("train.best_metric=auroc", "train.best_metric must be one of"),
                                     ("loss.k_max=2", r"fraction in \(0, 1\]"),
                                     ("synthetic.photons=50,10", "lo <= hi"),
                                     ("augment.scale=0,1", "scale"),
                                     ("synthetic.lesion_extent=a,b", "expected tuple")])
def test_values_no_run_can_use_fail_when_the_config_is_built(bad, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.load("tiny", [bad])


def test_config_architectures_are_the_models():
    from lclsc_jax import models

    assert set(C.ARCHS) == set(models.ARCHS)
    assert set(C.VOLUME_ARCHS) == {a for a in models.ARCHS if models.arch_spec(a).ndim == 3}


def test_volume_configs_need_volume_archs_and_shapes():
    cfg = C.load("tiny3d")
    assert C.input_shape(cfg) == (16, 16, 16, 1) and C.input_shape(C.load("tiny")) == (32, 32, 1)
    assert C.brain_config(C.load("tiny3d", ["data.image_size=20", "data.channels=2"])).size == 20
    with pytest.raises(C.ConfigError, match="brain3d"):
        C.load("tiny3d", ["data.source=synthetic"])
    with pytest.raises(C.ConfigError, match="3D arch"):
        C.load("tiny", ["data.source=brain3d"])
    with pytest.raises(C.ConfigError, match="follows"):
        C.load("tiny3d", ["brain.size=8"])


def test_k_one_means_every_location_as_in_the_method():
    from lclsc_jax.method import resolve_k

    cfg = C.load("tiny", ["loss.k_max=1"])
    assert cfg.loss.k_max == 1.0 and resolve_k(cfg.loss.k_max, 49) == 49


def test_augmentation_and_simulator_are_config_sections():
    cfg = C.load("tiny", ["augment.enabled=false", "augment.rotation_degrees=0", "synthetic.noise=false",
                          "synthetic.lesion_extent=0.2,0.4", "synthetic.fibre_cores=20000", "data.image_size=48"])
    assert not cfg.augment.enabled and cfg.augment.rotation_degrees == 0.0
    assert cfg.synthetic.noise is False and cfg.synthetic.lesion_extent == (0.2, 0.4)
    assert cfg.synthetic.fibre_cores == (20000, 20000)  # one value: a fixed range
    sc = C.synthetic_config(cfg)
    assert sc.image_size == 48 and sc.num_patients == 9  # the frame size follows data.image_size
    keys = C.flatten(cfg)
    assert "synthetic.image_size" not in keys and "augment.scale" in keys and "synthetic.photons" in keys
    with pytest.raises(C.ConfigError, match="data.image_size"):
        C.load("tiny", ["synthetic.image_size=64"])


@pytest.mark.parametrize("old,new", [("data.synthetic_patients=12", "synthetic.num_patients"),
                                     ("data.augment=false", "augment.enabled"),
                                     ("data.synthetic_options=noise=false", "synthetic.KEY=VALUE")])
def test_old_keys_say_where_they_went(old, new):
    with pytest.raises(C.ConfigError, match=new):
        C.load("tiny", [old])


def test_config_json_of_an_earlier_run_still_loads():
    old = C.to_dict(C.PRESETS["tiny"])
    syn, aug = old.pop("synthetic"), old.pop("augment")
    old["data"].update(augment=False, synthetic_patients=syn["num_patients"], synthetic_seed=3,
                       synthetic_images_per_patient=syn["images_per_patient"],
                       synthetic_options="noise=false;photons=5,20")
    cfg = C.from_dict(old)
    assert not cfg.augment.enabled and cfg.augment.flips == aug["flips"]
    assert cfg.synthetic.seed == 3 and cfg.synthetic.noise is False and cfg.synthetic.photons == (5.0, 20.0)
    assert cfg.synthetic.num_patients == 9
