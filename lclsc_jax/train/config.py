"""Typed, nested, overridable run configuration.

A config is a tree of frozen dataclasses. Named presets live in :data:`PRESETS`; a JSON file
can stand in for a preset; ``key=value`` overrides (dotted keys) are parsed with the field's
type. Unknown keys are an error that names the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from lclsc_jax.data.settings import AugmentConfig, BrainConfig, SyntheticConfig, ViewsConfig, parse_value


class ConfigError(ValueError):
    """A config key or value no run can use."""


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and head."""

    arch: str = "resnet18"  # one of ARCHS
    embed_dim: int = 128
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    remat: bool = False
    projection_layers: int = 2  # 2: MLP projection head (the paper's); 1: linear (loss.sc_maps=decomposed needs it)
    drop_path_rate: float = 0.0  # stochastic depth of the timm-layout backbones (EfficientNetV2, ViT, ConvNeXt)


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are fed."""

    source: str = "synthetic"  # synthetic | brain3d (3D benchmark) | folder path | CSV manifest path
    labelled: bool = True  # False: a folder ROOT/<patient>/<frame> or a CSV without labels (lclsc pretrain)
    allow_outside_root: bool = False  # a CSV manifest may name files outside its folder (../x.png, /abs/x.png)
    image_size: int = 128  # side of the square frame (2D) or the cube volume (3D archs)
    channels: int = 1
    spacing: float = 0.0  # volumes: resample to this isotropic voxel spacing (mm) before the crop/pad; 0: zoom to fit
    cache_dir: str = ""  # "" -> $LCLSC_DATA_DIR or ~/.cache/lclsc_jax
    num_workers: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int = 0
    # Label efficiency: train on the labels of this fraction of the training patients (per class, rounded up, at
    # least one; drawn with `seed`); val/test unchanged.
    label_fraction: float = 1.0
    # What the run predicts: class (the tissue class) | diagnostic (a non-diagnostic frame filter, classes
    # non_diagnostic/diagnostic, split by patient as the tissue classifier is; docs/sequences.md).
    target: str = "class"


@dataclass(frozen=True)
class LossConfig:
    """Which objective and its hyper-parameters (docs/method.md)."""

    name: str = "lcl_sc"  # lcl_sc | lcl | supcon | ce
    tau: float = 0.1
    w_ss: float = 1.0
    lambda_sc: float = 1.0
    k_max: float = 0.1  # fraction of the feature map's h*w locations, in (0, 1] (1.0 = all)
    k_min: float = 0.1
    alpha: float = -1.0  # -1: top - bottom (our default); +1: WILDCAT negative evidence
    w_eq: float = 1.0
    eq_stride: int = 4  # every eq_stride-th sample of the batch also runs as a D4-transformed view
    ema_momentum: float = 0.99
    label_smoothing: float = 0.0
    fov_mask: bool = True  # keep pCLE's black corners out of TK-MMP and the equivariance term
    # The SC variants of docs/method.md, "Tying the maps to the decision" (both off: the paper's SC module).
    w_consistency: float = 0.0  # weight of KL(GEI prediction || pooled saliency prediction)
    sc_maps: str = "cosine"  # cosine: cos(g(F(u)), G_c) | decomposed: maps whose mean is the GEI cosine


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the loop."""

    steps: int = 2000
    batch_size: int = 64  # global batch, across all devices and processes
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd | lars
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    log_every: int = 20
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 2
    eval_batch_size: int = 128
    best_metric: str = "accuracy"  # one of BEST_METRICS: the validation metric that picks the "best" checkpoint
    # Fine-tuning (e.g. after --init-from): the backbone (every parameter but the heads `head`/`fc`) gets no
    # update for the first `freeze_backbone_steps` steps, then `backbone_lr_scale` x the learning rate.
    freeze_backbone_steps: int = 0
    backbone_lr_scale: float = 1.0
    # ZeRO-3 style sharding: parameters and optimizer state split over this many devices (must divide the device
    # count; 1 = replicated, plain data parallelism). The batch is split over all devices either way.
    fsdp: int = 1


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining (``lclsc pretrain``; docs/pretrain.md): the objective and its recipe."""

    objective: str = "simclr"  # one of OBJECTIVES: simclr | dino | supcon (supcon needs labels)
    temperature: float = 0.2  # NT-Xent (SimCLR) / SupCon temperature
    grad_accum: int = 1  # micro-batches per step; gradient caching makes them equal one large batch
    # DINO (Caron et al. 2021): head sizes, temperatures, teacher EMA momentum, centring momentum.
    dino_out_dim: int = 4096
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # after the warm-up
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    teacher_momentum: float = 0.996  # cosine schedule from this to 1 over train.steps
    center_momentum: float = 0.9
    # Encoder probes on the held-out (val) patients, at every train.eval_every steps, when labels exist.
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_max_train: int = 4096  # training-split frames embedded for the probes (a fixed subsample beyond)


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentation (data.settings)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # the simulator, for data.source=synthetic
    brain: BrainConfig = field(default_factory=BrainConfig)  # the 3D brain benchmark, for data.source=brain3d
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # lclsc pretrain only
    views: ViewsConfig = field(default_factory=ViewsConfig)  # lclsc pretrain's on-device views (data.settings)
    seed: int = 0


def _preset(**sections: dict[str, Any]) -> Config:
    return override(Config(), {f"{s}.{k}": v for s, kv in sections.items() for k, v in kv.items()})


PRESETS: dict[str, Config] = {}


def _register_presets() -> None:
    PRESETS["default"] = Config()
    # The CPU demo: a tiny CNN on 64x64 synthetic frames, minutes on 2 cores.
    PRESETS["demo"] = _preset(
        model=dict(arch="tiny"),
        data=dict(image_size=64),
        synthetic=dict(num_patients=24, images_per_patient=40),
        # lambda_sc=0.1: at the paper's 1.0 the SC term dominates the first thousand steps of a tiny
        # model on the pCLE simulator (held-out accuracy 0.62 vs 0.81; experiments/RESULTS.md).
        loss=dict(lambda_sc=0.1),
        train=dict(steps=1000, batch_size=64, lr=3e-3, warmup_steps=50, eval_every=250,
                   checkpoint_every=250, log_every=25),
    )
    # Tests: as small as still means something.
    PRESETS["tiny"] = _preset(
        model=dict(arch="tiny", embed_dim=32),
        data=dict(image_size=32),
        synthetic=dict(num_patients=9, images_per_patient=8),
        train=dict(steps=20, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=10,
                   checkpoint_every=10, log_every=5, eval_batch_size=32),
    )
    # Pretraining on the CPU: SimCLR, the demo's tiny CNN and data (docs/pretrain.md).
    PRESETS["pretrain"] = _preset(
        model=dict(arch="tiny"),
        data=dict(image_size=64),
        synthetic=dict(num_patients=24, images_per_patient=40),
        pretrain=dict(objective="simclr", temperature=0.2, dino_out_dim=1024, dino_hidden_dim=512,
                      dino_bottleneck_dim=128),
        train=dict(steps=1000, batch_size=64, lr=3e-3, warmup_steps=50, eval_every=250, checkpoint_every=250,
                   log_every=25),
    )
    # Tests of pretraining.
    PRESETS["pretrain-tiny"] = _preset(
        model=dict(arch="tiny", embed_dim=32),
        data=dict(image_size=32),
        synthetic=dict(num_patients=9, images_per_patient=8),
        pretrain=dict(objective="simclr", dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16, knn_k=5),
        train=dict(steps=6, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=3, checkpoint_every=3,
                   log_every=3, eval_batch_size=32),
    )
    PRESETS["resnet50"] = _preset(
        model=dict(arch="resnet50", dtype="bfloat16"),
        data=dict(image_size=224, channels=1, num_workers=8),
        train=dict(steps=20000, batch_size=256, lr=1e-3, warmup_steps=1000),
    )


def _register_volume_presets() -> None:
    # Volumes: the 3D brain benchmark and a tiny 3D CNN (docs/volumes.md), CPU minutes at 32^3.
    PRESETS["brain3d"] = _preset(
        model=dict(arch="tiny3d", embed_dim=64),
        data=dict(source="brain3d", image_size=32),
        brain=dict(n_subjects=90),
        loss=dict(lambda_sc=0.1),
        train=dict(steps=600, batch_size=16, lr=3e-3, warmup_steps=30, eval_every=150, checkpoint_every=150,
                   log_every=25, eval_batch_size=16),
    )
    # Tests of the 3D path.
    PRESETS["tiny3d"] = _preset(
        model=dict(arch="tiny3d", embed_dim=16),
        data=dict(source="brain3d", image_size=16),
        brain=dict(n_subjects=12),
        train=dict(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=2, checkpoint_every=2,
                   log_every=2, eval_batch_size=8),
    )


#: Keys a config holds but does not set: their value follows another key's (one source each).
DERIVED = {"synthetic.image_size": "data.image_size", "brain.size": "data.image_size",
           "brain.channels": "data.channels"}

#: Keys of older configs (``config.json`` of earlier runs) and where their setting lives now.
RENAMED = {"data.augment": "augment.enabled", "data.synthetic_patients": "synthetic.num_patients",
           "data.synthetic_images_per_patient": "synthetic.images_per_patient", "data.synthetic_seed": "synthetic.seed"}


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config into ``{"section.key": value}`` (without the :data:`DERIVED` keys)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        elif key not in DERIVED:
            out[key] = v
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain-dict form (what ``config.json`` holds; tuples as lists, no :data:`DERIVED` keys)."""
    d = dataclasses.asdict(cfg)
    for key in DERIVED:
        sec, name = key.split(".")
        d[sec].pop(name, None)
    return d


def synthetic_config(cfg: Config) -> SyntheticConfig:
    """The simulator settings of a run, generating frames of ``data.image_size``."""
    return dataclasses.replace(cfg.synthetic, image_size=cfg.data.image_size)


def brain_config(cfg: Config) -> BrainConfig:
    """The 3D benchmark's settings of a run: volumes of ``data.image_size``^3 voxels and ``data.channels``."""
    return dataclasses.replace(cfg.brain, size=cfg.data.image_size, channels=cfg.data.channels)


def spatial_ndim(cfg: Config) -> int:
    """2 for a frame classifier, 3 for a volume one (``model.arch`` in :data:`VOLUME_ARCHS`); imports no JAX."""
    return 3 if cfg.model.arch in VOLUME_ARCHS else 2


def input_shape(cfg: Config) -> tuple[int, ...]:
    """One input without the batch axis: ``(S, S, C)`` for 2D archs, ``(S, S, S, C)`` for 3D ones."""
    return (cfg.data.image_size,) * spatial_ndim(cfg) + (cfg.data.channels,)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any, current: Any = None) -> Any:
    """Convert ``value`` (often a string from the command line) to ``typ`` (``current``: the value it replaces)."""
    if typing.get_origin(typ) is tuple:  # "lo,hi" or a JSON list, typed like the current value
        raw = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        try:
            return parse_value(f"config key {key!r}", raw, current)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r}: expected a boolean, got {value!r}")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from None
    return value


def _unknown_key_error(key: str, valid: list[str]) -> ConfigError:
    if key in RENAMED:
        return ConfigError(f"config key {key!r} is now {RENAMED[key]!r}")
    if key == "data.synthetic_options":
        return ConfigError("config key 'data.synthetic_options' is gone: set each simulator parameter as "
                           "'synthetic.KEY=VALUE' (see `lclsc config --list`)")
    if key in DERIVED:
        return ConfigError(f"config key {key!r} follows {DERIVED[key]!r}: set that instead")
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # also match the last component alone, e.g. "lr" -> "train.lr"
        tail = key.split(".")[-1]
        close = [k for k in valid if k.split(".")[-1] == tail] or difflib.get_close_matches(
            tail, [k.split(".")[-1] for k in valid], n=3, cutoff=0.6)
        close = [k for k in valid if k in close or k.split(".")[-1] in close][:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def override(cfg: Config, updates: dict[str, Any]) -> Config:
    """Return ``cfg`` with dotted-key ``updates`` applied, type-checked."""
    valid = list(flatten(cfg))
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    hints = _field_types(Config)
    for key, value in updates.items():
        if key not in valid:
            raise _unknown_key_error(key, valid)
        if "." in key:
            sec, name = key.split(".", 1)
            typ = _field_types(type(getattr(cfg, sec)))[name]
            sections.setdefault(sec, {})[name] = _coerce(key, value, typ, getattr(getattr(cfg, sec), name))
        else:
            top[key] = _coerce(key, value, hints[key])
    try:  # the data sections check their own values (data.settings)
        new = {sec: dataclasses.replace(getattr(cfg, sec), **kv) for sec, kv in sections.items()}
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None
    cfg = dataclasses.replace(cfg, **new, **top)
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Parse ``["a.b=1", ...]`` into a dict; a malformed item, or a key given two different values, is an error."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        k, v = (s.strip() for s in item.split("=", 1))
        if k in out and out[k] != v:
            raise ConfigError(f"config key {k!r} is set twice, to {out[k]!r} and to {v!r}: give it once")
        out[k] = v
    return out


def from_dict(d: dict[str, Any]) -> Config:
    """Build a config from a nested dict (e.g. a saved ``config.json``); unknown keys are errors.

    Keys of older configs (:data:`RENAMED`, ``data.synthetic_options``) are read into their new
    place, so earlier runs still load; :data:`DERIVED` keys are ignored.
    """
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    for old, new in RENAMED.items():
        if old in flat:
            flat[new] = flat.pop(old)
    for opt in str(flat.pop("data.synthetic_options", "") or "").split(";"):
        if opt.strip():
            k, _, v = opt.partition("=")
            flat[f"synthetic.{k.strip()}"] = v.strip()
    for key in DERIVED:
        flat.pop(key, None)
    return override(Config(), flat)


def load(name_or_file: str = "default", overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """A preset by name, or a JSON file, with ``key=value`` overrides applied."""
    if name_or_file in PRESETS:
        cfg = PRESETS[name_or_file]
    elif os.path.isfile(name_or_file):
        with open(name_or_file) as f:
            cfg = from_dict(json.load(f))
    else:
        raise ValueError(
            f"config {name_or_file!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        cfg = override(cfg, ov)
    return cfg


LOSSES = ("lcl_sc", "lcl", "supcon", "ce")
OPTIMIZERS = ("adamw", "sgd", "lars")
#: The self-supervised (and supervised-contrastive) objectives of ``lclsc pretrain``.
OBJECTIVES = ("simclr", "dino", "supcon")
#: ``models.ARCHS`` (a test keeps the two equal; listed here so a config is checked without importing Flax).
#: The archs that take volumes (B, D, H, W, C): ``models.arch_spec(a).ndim == 3`` (a test keeps the two in step).
VOLUME_ARCHS = ("tiny3d", "resnet18_3d", "resnet34_3d")
CORE_ARCHS = ("tiny", "resnet18", "resnet34", "resnet50", *VOLUME_ARCHS)
ARCHS = (*CORE_ARCHS, "tf_efficientnetv2_s", "efficientnetv2_s", "inception_v3", "inception_v3_aux",
         "vit_small_patch16", "vit_small_patch16_gap", "vit_base_patch16", "vit_base_patch16_gap",
         "convnext_tiny", "densenet121", "alexnet", "lenet5")
#: The SC maps of ``loss.sc_maps``.
SC_MAPS = ("cosine", "decomposed")
#: What a run predicts (``data.target``); data.targets.TARGETS says the same (tests/test_targets.py).
TARGETS = ("class", "diagnostic")
#: What training validation measures (higher is better), for ``train.best_metric``.
BEST_METRICS = ("accuracy", "balanced_accuracy")


def validate(cfg: Config) -> None:
    """Raise ``ValueError`` on values no run could use."""
    errors = []
    if cfg.loss.name not in LOSSES:
        errors.append(f"loss.name must be one of {LOSSES}, got {cfg.loss.name!r}")
    if cfg.model.arch not in ARCHS:
        errors.append(f"model.arch must be one of {ARCHS}, got {cfg.model.arch!r}")
    if cfg.data.target not in TARGETS:
        errors.append(f"data.target must be one of {TARGETS}, got {cfg.data.target!r}")
    if cfg.train.best_metric not in BEST_METRICS:
        errors.append(f"train.best_metric must be one of {BEST_METRICS}, got {cfg.train.best_metric!r}")
    if cfg.loss.sc_maps not in SC_MAPS:
        errors.append(f"loss.sc_maps must be one of {SC_MAPS}, got {cfg.loss.sc_maps!r}")
    elif cfg.loss.sc_maps == "decomposed" and cfg.model.projection_layers != 1:
        errors.append("loss.sc_maps=decomposed needs a linear projection head (model.projection_layers=1): only "
                      "then is the mean of the maps the GEI cosine")
    if not 0.0 <= cfg.model.drop_path_rate < 1.0:
        errors.append(f"model.drop_path_rate must be in [0, 1), got {cfg.model.drop_path_rate}")
    elif cfg.model.drop_path_rate and cfg.model.arch in CORE_ARCHS:
        errors.append(f"model.drop_path_rate (stochastic depth) is for the timm-layout backbones, not {cfg.model.arch}")
    if cfg.model.projection_layers not in (1, 2):
        errors.append(f"model.projection_layers must be 1 or 2, got {cfg.model.projection_layers}")
    if cfg.loss.w_consistency < 0:
        errors.append("loss.w_consistency must be >= 0")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        errors.append(f"model.dtype must be float32 or bfloat16, got {cfg.model.dtype!r}")
    if cfg.train.freeze_backbone_steps < 0:
        errors.append(f"train.freeze_backbone_steps must be >= 0, got {cfg.train.freeze_backbone_steps}")
    if not cfg.train.backbone_lr_scale >= 0:
        errors.append(f"train.backbone_lr_scale must be >= 0, got {cfg.train.backbone_lr_scale}")
    if cfg.train.optimizer not in OPTIMIZERS:
        errors.append(f"train.optimizer must be one of {OPTIMIZERS}, got {cfg.train.optimizer!r}")
    for key in ("train.steps", "train.batch_size", "data.image_size", "data.channels", "model.embed_dim",
                "train.eval_batch_size", "train.log_every", "train.checkpoint_every", "train.keep_last",
                "train.fsdp"):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) < 1:
            errors.append(f"{key} must be >= 1")
    if not 0.0 < cfg.data.label_fraction <= 1.0:
        errors.append(f"data.label_fraction must be in (0, 1], got {cfg.data.label_fraction}")
    if not 0.0 <= cfg.loss.ema_momentum < 1.0:
        errors.append("loss.ema_momentum must be in [0, 1)")
    if cfg.loss.eq_stride < 1:
        errors.append("loss.eq_stride must be >= 1")
    if cfg.loss.tau <= 0:
        errors.append("loss.tau must be > 0")
    for key in ("k_max", "k_min"):
        v = getattr(cfg.loss, key)
        if not 0 < v <= 1:
            errors.append(f"loss.{key} must be a fraction in (0, 1] of the feature map's locations, got {v}")
    errors += _pretrain_errors(cfg) + _volume_errors(cfg)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


def _volume_errors(cfg: Config) -> list[str]:
    """Frames need a 2D arch and volumes a 3D one, as far as the config alone tells."""
    errors = []
    if cfg.data.spacing < 0:
        errors.append(f"data.spacing must be >= 0 (0: zoom to data.image_size), got {cfg.data.spacing}")
    if cfg.model.arch not in ARCHS:
        return errors
    ndim = spatial_ndim(cfg)
    if ndim == 3 and cfg.data.source == "synthetic":
        errors.append(f"model.arch={cfg.model.arch} takes volumes, and the pCLE simulator makes 2D frames: use "
                      "data.source=brain3d (the 3D benchmark) or a folder/CSV of volumes")
    if ndim == 2 and cfg.data.source == "brain3d":
        errors.append(f"data.source=brain3d makes volumes, and model.arch={cfg.model.arch} takes 2D frames: use a "
                      f"3D arch ({', '.join(VOLUME_ARCHS)})")
    return errors


def _pretrain_errors(cfg: Config) -> list[str]:
    """The ``pretrain`` section's invalid values."""
    p, errors = cfg.pretrain, []
    if p.objective not in OBJECTIVES:
        errors.append(f"pretrain.objective must be one of {OBJECTIVES}, got {p.objective!r}")
    for key in ("temperature", "student_temp", "teacher_temp", "warmup_teacher_temp", "knn_temperature"):
        if not getattr(p, key) > 0:
            errors.append(f"pretrain.{key} must be > 0")
    for key in ("grad_accum", "dino_out_dim", "dino_hidden_dim", "dino_bottleneck_dim", "knn_k", "probe_max_train"):
        if getattr(p, key) < 1:
            errors.append(f"pretrain.{key} must be >= 1")
    for key in ("teacher_momentum", "center_momentum"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            errors.append(f"pretrain.{key} must be in [0, 1]")
    if p.warmup_teacher_temp_steps < 0:
        errors.append("pretrain.warmup_teacher_temp_steps must be >= 0")
    return errors


def uses_gei(cfg: Config) -> bool:
    """Whether inference is global-embedding inference (all contrastive losses) or a linear head."""
    return cfg.loss.name != "ce"


_register_presets()
_register_volume_presets()
