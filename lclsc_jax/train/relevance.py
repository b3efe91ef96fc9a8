"""Train the optimal perturbation generator (a U-Net) against a frozen classifier; save and restore it.

The generator ``G`` maps a volume ``x (B, *S, C)`` to a mask ``m (B, *S)``; the loss is
:func:`lclsc_jax.method.relevance.perturbation_loss` of the classifier's logits on ``x`` and on
the perturbed ``x (1 - m) + m b``. Only ``G``'s params get gradients (Adam); the classifier's
variables enter the step under ``stop_gradient`` through ``logit_fn(classifier, x) -> (B, K)``,
which must run the classifier in eval mode (``train=False``: BatchNorm running statistics, no
dropout). Masks are voxel-wise, or pooled over supervoxels (``n_segments > 0``: segments of every
training volume computed once on the host by ``segment_fn``, e.g. ``explain.slic_segments``).

Data: a host array of model-input volumes ``(N, *S, C)`` float32 (the caller reads the run's
train split); batch ``t`` is drawn by ``np.random.default_rng((seed, t))``, so a resumed run sees
the batches it would have seen. Layout of ``out_dir`` (``WORKDIR/relevance``): ``config.json``
(the :class:`GeneratorConfig` plus the caller's ``extra``), ``checkpoints/<step>/state``
(Orbax, :class:`lclsc_jax.train.checkpoint.Checkpointer`), ``log.jsonl`` (one line per logged step).
Training again into the same ``out_dir`` resumes from its last checkpoint when the config is the
same, and is refused (``ValueError`` naming the differing keys) when it is not.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from lclsc_jax.data import storage
from lclsc_jax.method import relevance as rel
from lclsc_jax.models.unet3d import UNet3D
from lclsc_jax.train.checkpoint import Checkpointer, abstract_like

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
TARGETS = ("predicted", "label")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Everything that defines a generator and its training (``steps`` aside, which a resume may raise)."""

    base_width: int = 8  # U-Net channels of the first level
    depth: int = 3  # U-Net levels
    blocks_per_level: int = 2  # convs per U-Net block
    area_weight: float = 0.1  # weight of mean(m) in the loss
    tv_weight: float = 0.0  # weight of the mask's total variation (0 = off)
    score: str = "prob"  # what the perturbation must lower (method.relevance.SCORES)
    baseline: float | str = 0.0  # what masked voxels become: a number, "mean" or "blur"
    blur_sigma: float = 2.0  # voxels, for baseline="blur"
    target: str = "predicted"  # explained class: the classifier's "predicted" one or the "label"
    n_segments: int = 0  # 0: voxel-wise masks; > 0: masks pooled over ~this many SLIC supervoxels
    compactness: float = 10.0  # SLIC compactness (volumes min-max scaled first)
    slic_sigma: float = 1.0  # SLIC pre-smoothing
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in rel.SCORES:
            raise ValueError(f"score must be one of {rel.SCORES}, got {self.score!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if isinstance(self.baseline, str) and self.baseline not in rel.BASELINES:
            raise ValueError(f"baseline must be a number or one of {rel.BASELINES}, got {self.baseline!r}")
        if self.batch_size < 1 or self.depth < 1 or self.base_width < 1:
            raise ValueError("batch_size, depth and base_width must be >= 1")


@struct.dataclass
class GeneratorState:
    """The generator's training state: ``step`` (int32 scalar), ``params``, Adam's ``opt_state``."""

    step: jax.Array
    params: Any
    opt_state: Any


def make_generator(cfg: GeneratorConfig) -> UNet3D:
    """The U-Net a config describes."""
    return UNet3D(base_width=cfg.base_width, depth=cfg.depth, blocks_per_level=cfg.blocks_per_level)


def init_state(cfg: GeneratorConfig, generator: UNet3D, input_shape: tuple[int, ...]) -> GeneratorState:
    """A fresh state from ``cfg.seed`` for inputs of ``input_shape`` ``(*S, C)`` (one volume)."""
    params = generator.init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, *input_shape), jnp.float32))["params"]
    return GeneratorState(jnp.zeros((), jnp.int32), params, optax.adam(cfg.lr).init(params))


def masks(generator: UNet3D, params: Any, x: jax.Array, segments: jax.Array | None = None,
          n_segments: int = 0) -> jax.Array:
    """Generator masks ``(B, *S)`` of ``x (B, *S, C)``; pooled over ``segments (B, *S)`` when given."""
    m = generator.apply({"params": params}, x)[..., 0]
    return m if segments is None else rel.pool_to_segments(m, segments, n_segments)


def make_train_step(generator: UNet3D, logit_fn: Callable[[Any, jax.Array], jax.Array], cfg: GeneratorConfig,
                    n_segments: int = 0) -> Callable[..., tuple[GeneratorState, dict[str, jax.Array]]]:
    """Jitted ``step(state, classifier, x (B, *S, C), labels (B,), segments (B, *S) | None) -> (state, metrics)``.

    ``logit_fn(classifier, x) -> (B, K)`` is the frozen classifier in eval mode; ``classifier``
    (its variables, any pytree) gets no gradient. ``metrics``: ``loss``, ``drop``, ``area``, ``tv``
    (means over the batch). ``labels`` are used only with ``cfg.target == "label"``.
    """
    tx = optax.adam(cfg.lr)

    def step(state: GeneratorState, classifier: Any, x: jax.Array, labels: jax.Array,
             segments: jax.Array | None) -> tuple[GeneratorState, dict[str, jax.Array]]:
        classifier = jax.lax.stop_gradient(classifier)
        x = x.astype(jnp.float32)
        clean = jax.lax.stop_gradient(logit_fn(classifier, x))
        targets = labels.astype(jnp.int32) if cfg.target == "label" else jnp.argmax(clean, axis=-1)
        base = rel.baseline_values(x, cfg.baseline, cfg.blur_sigma)

        def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            m = masks(generator, params, x, segments, n_segments)
            perturbed = logit_fn(classifier, rel.perturb(x, m, base))
            return rel.perturbation_loss(clean, perturbed, targets, m, cfg.area_weight, cfg.tv_weight, cfg.score)

        grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return GeneratorState(state.step + 1, params, opt_state), terms

    return jax.jit(step)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Record indices ``(batch_size,)`` of training step ``step`` (with replacement only when ``n < batch_size``)."""
    return np.random.default_rng((seed, step)).choice(n, size=batch_size, replace=n < batch_size)


def compute_segments(volumes: np.ndarray, segment_fn: Callable[[np.ndarray], np.ndarray],
                     chunk: int = 8) -> tuple[np.ndarray, int]:
    """Supervoxels of every volume ``(N, *S, C)`` on the host: ``(labels (N, *S) int32, n_segments bound)``."""
    out = [np.asarray(segment_fn(volumes[i:i + chunk]), np.int32) for i in range(0, len(volumes), chunk)]
    seg = np.concatenate(out)
    if seg.shape != volumes.shape[:-1] or seg.min() < 0:
        raise ValueError(f"segment_fn must return non-negative labels of shape {volumes.shape[:-1]}, got {seg.shape}")
    return seg, int(seg.max()) + 1


def config_dict(cfg: GeneratorConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def load_config(out_dir: str) -> dict[str, Any]:
    """``out_dir/config.json``: ``{"generator": GeneratorConfig fields, "input_shape": [...], ...extra}``."""
    path = storage.join(out_dir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{out_dir} holds no trained generator (no {CONFIG_FILE}); train one first")
    return json.loads(storage.read_text(path))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys (``generator.area_weight``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same(out_dir: str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to train into ``out_dir`` with another config than the one it holds."""
    saved, wanted = _flat(saved), _flat(wanted)
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if keys:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys)
        raise ValueError(f"{out_dir} holds a generator trained with another config ({diff}); refusing to overwrite "
                         "it: use the same settings to resume, or another / emptied folder")


def train_generator(volumes: np.ndarray, logit_fn: Callable[[Any, jax.Array], jax.Array], classifier: Any,
                    out_dir: str, steps: int, cfg: GeneratorConfig = GeneratorConfig(), *,
                    labels: np.ndarray | None = None, segment_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                    log_every: int = 50, checkpoint_every: int | None = None, extra: dict[str, Any] | None = None,
                    log: Callable[[str], None] | None = print) -> tuple[UNet3D, GeneratorState, list[dict[str, float]]]:
    """Train (or resume) a generator on ``volumes (N, *S, C)`` float32 up to ``steps``: ``(module, state, log)``.

    ``logit_fn(classifier, x (B, *S, C)) -> (B, K)``: the frozen classifier in eval mode.
    ``labels (N,)``: needed for ``cfg.target == "label"``. ``segment_fn(volumes (n, *S, C)) ->
    (n, *S)`` int labels: needed when ``cfg.n_segments > 0``. Saves every ``checkpoint_every``
    steps (default: only at the end) and at the end; ``extra`` (JSON-ready) goes into config.json.
    The returned log holds one dict per logged step (``step``, ``loss``, ``drop``, ``area``, ``tv``,
    ``seconds``).
    """
    volumes = np.asarray(volumes, np.float32)
    if volumes.ndim < 3 or len(volumes) == 0:
        raise ValueError(f"volumes must be a non-empty (N, *S, C) array, got shape {volumes.shape}")
    if cfg.target == "label":
        if labels is None or len(labels) != len(volumes):
            raise ValueError("target='label' needs labels (N,) for the volumes")
    labels = np.zeros(len(volumes), np.int32) if labels is None else np.asarray(labels, np.int32)
    segments, n_seg = None, 0
    if cfg.n_segments > 0:
        if segment_fn is None:
            raise ValueError("n_segments > 0 needs segment_fn (e.g. explain.slic_segments) to compute supervoxels")
        segments, n_seg = compute_segments(volumes, segment_fn)
    wanted = {"generator": config_dict(cfg), "input_shape": list(volumes.shape[1:]), "n_segments_bound": n_seg,
              **(extra or {})}
    generator = make_generator(cfg)
    state = init_state(cfg, generator, volumes.shape[1:])
    ckpt = Checkpointer(storage.join(out_dir, "checkpoints"), keep_last=2, best_metric=None, async_save=False)
    history: list[dict[str, float]] = []
    try:
        if storage.exists(storage.join(out_dir, CONFIG_FILE)):
            _check_same(out_dir, load_config(out_dir), json.loads(json.dumps(wanted)))
            last = ckpt.latest_step()
            if last is not None:
                state = ckpt.restore(last, abstract_like(state, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
                if log:
                    log(f"resuming the generator in {out_dir} from step {last}")
        else:
            storage.write_text(storage.join(out_dir, CONFIG_FILE), json.dumps(wanted, indent=2))
        step_fn = make_train_step(generator, logit_fn, cfg, n_seg)
        start = int(state.step)
        t0 = time.time()
        pending: list[dict[str, jax.Array]] = []
        for t in range(start, steps):
            idx = batch_indices(len(volumes), cfg.batch_size, cfg.seed, t)
            seg = None if segments is None else jnp.asarray(segments[idx])
            state, terms = step_fn(state, classifier, jnp.asarray(volumes[idx]), jnp.asarray(labels[idx]), seg)
            pending.append(terms)
            done = t + 1
            if done % max(1, log_every) == 0 or done == steps:
                row = {k: float(np.mean([float(p[k]) for p in pending])) for k in ("loss", "drop", "area", "tv")}
                if not np.isfinite(row["loss"]):
                    raise FloatingPointError(f"generator loss is {row['loss']} at step {done}; lower the lr")
                row = {"step": done, **row, "seconds": round(time.time() - t0, 2)}
                history.append(row)
                pending = []
                _append_log(out_dir, row)
                if log:
                    log(f"relevance step {done}/{steps}: loss {row['loss']:.4f} drop {row['drop']:.4f} "
                        f"area {row['area']:.4f}")
            if checkpoint_every and done % checkpoint_every == 0 and done != steps:
                ckpt.save(done, state)
        if steps > start or ckpt.latest_step() is None:
            ckpt.save(int(state.step), state)
        ckpt.wait()
    finally:
        ckpt.close(quiet=True)
    return generator, state, history


def _append_log(out_dir: str, row: dict[str, float]) -> None:
    """One JSON line per logged step in ``out_dir/log.jsonl`` (local folders; buckets skip it)."""
    if storage.is_url(out_dir):
        return
    with open(storage.join(out_dir, LOG_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")


def restore_generator(out_dir: str, step: int | None = None) -> tuple[UNet3D, dict[str, Any], dict[str, Any]]:
    """``(module, variables {"params": ...}, config dict)`` of the generator saved in ``out_dir`` (latest step)."""
    saved = load_config(out_dir)
    fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
    cfg = GeneratorConfig(**{k: v for k, v in saved["generator"].items() if k in fields})
    generator = make_generator(cfg)
    abstract = jax.eval_shape(lambda: init_state(cfg, generator, tuple(saved["input_shape"])))
    ckpt = Checkpointer(storage.join(out_dir, "checkpoints"), keep_last=2, best_metric=None, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{out_dir} has no generator checkpoint yet")
        state = ckpt.restore(step, abstract_like(abstract, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
    finally:
        ckpt.close(quiet=True)
    return generator, {"params": state.params}, {**saved, "step": int(step)}
