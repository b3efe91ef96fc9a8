"""The train state: everything that must persist between steps, as one pytree."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lclsc_jax import method
from lclsc_jax.train import sharding as shd
from lclsc_jax.train.config import Config


@flax.struct.dataclass
class TrainState:
    """Step, parameters, BN statistics, optimizer state, EMA global class embeddings, RNG.

    ``global_emb (C, D)`` float32 and ``seen (C,)`` bool carry the LCL-SC class anchors; they
    receive no gradient and change only by EMA (``lclsc_jax.method.ema_update``).
    ``rng`` is a raw ``uint32[2]`` key so every checkpoint format can store it.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    global_emb: jax.Array
    seen: jax.Array
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The model variables ``{'params', 'batch_stats'}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def _decay_mask(params: Any) -> Any:
    """Weight decay on kernels only (no biases, no BN scales)."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup to ``train.lr``, then cosine decay to 1% of it at ``train.steps``."""
    t = cfg.train
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else t.lr, peak_value=t.lr, warmup_steps=warmup,
        decay_steps=max(t.steps, warmup + 1), end_value=t.lr * 1e-2)


#: Top-level parameter groups that are heads, not backbone (``interop``'s ``fc``/``head``).
HEAD_GROUPS: tuple[str, ...] = ("fc", "head")


def param_groups(params: Any) -> Any:
    """``"head"`` for the leaves under a top-level ``fc``/``head``, ``"backbone"`` for every other leaf."""
    return {name: jax.tree_util.tree_map(lambda _, g="head" if name in HEAD_GROUPS else "backbone": g, sub)
            for name, sub in params.items()}


def backbone_multiplier(freeze_steps: int, scale: float) -> optax.Schedule:
    """``0`` for steps ``< freeze_steps``, then ``scale``: what the backbone's updates are multiplied by."""
    return lambda step: jnp.where(step < freeze_steps, 0.0, scale)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """Gradient clipping, the warmup-cosine schedule, AdamW, SGD-momentum or LARS per ``cfg.train``.

    With ``train.freeze_backbone_steps > 0`` or ``train.backbone_lr_scale != 1`` the backbone's
    updates (decoupled weight decay included) are multiplied by ``backbone_multiplier``: none while
    frozen, then the scaled learning rate; its optimizer moments accumulate while it is frozen. The
    gradient is clipped over all parameters together. BatchNorm statistics are not parameters and
    keep updating in a frozen backbone.
    """
    t = cfg.train

    def base() -> optax.GradientTransformation:
        schedule = lr_schedule(cfg)
        if t.optimizer == "adamw":
            return optax.adamw(schedule, weight_decay=t.weight_decay, mask=_decay_mask)
        if t.optimizer == "lars":  # SimCLR's optimizer for large batches (You et al. 2017); no adaptation of biases/BN
            return optax.lars(schedule, weight_decay=t.weight_decay, weight_decay_mask=_decay_mask,
                              trust_ratio_mask=_decay_mask, momentum=0.9)
        return optax.chain(optax.add_decayed_weights(t.weight_decay, mask=_decay_mask),
                           optax.sgd(schedule, momentum=0.9, nesterov=True))

    opt = base()
    if t.freeze_backbone_steps > 0 or t.backbone_lr_scale != 1.0:
        mult = backbone_multiplier(t.freeze_backbone_steps, t.backbone_lr_scale)
        opt = optax.multi_transform({"backbone": optax.chain(base(), optax.scale_by_schedule(mult)), "head": opt},
                                    param_groups)
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    return optax.chain(*chain, opt)


def learning_rate(cfg: Config, step: int) -> float:
    """The scheduled learning rate at ``step`` (for logging)."""
    return float(lr_schedule(cfg)(step))


def create_state(model: Any, tx: optax.GradientTransformation, num_classes: int, embed_dim: int,
                 image_shape: tuple[int, int, int], rng: jax.Array) -> TrainState:
    """Initialise a state for ``model`` on images of ``image_shape (H, W, C)``; jittable."""
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(init_rng, dummy, train=False)
    params = variables["params"]
    global_emb, seen = method.init_global_embeddings(num_classes, embed_dim)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        global_emb=global_emb,
        seen=seen,
        rng=state_rng,
    )


def state_sharding(shapes: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of a train state: parameters and optimizer state over ``fsdp`` (ZeRO-3), the rest replicated.

    ``shapes``: the state or its ``jax.eval_shape``; with ``fsdp = 1`` everything is replicated
    (``sharding.state_sharding``).
    """
    return shd.state_sharding(shapes, mesh)
