"""The pretraining state and model, and reading a finished pretraining run's encoder.

A pretraining run's model is :class:`~lclsc_jax.models.SelfSupervisedModel`: the same
``models.Model`` a supervised run trains (under the variables' key ``encoder``), plus a DINO head
for ``pretrain.objective=dino``. So ``lclsc train --init-from RUN`` takes the encoder's backbone as
it is (:func:`encoder_variables`).
"""

from __future__ import annotations

import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lclsc_jax import models
from lclsc_jax.data import storage
from lclsc_jax.train import sharding as shd
from lclsc_jax.train.checkpoint import Checkpointer
from lclsc_jax.train.config import Config, from_dict

#: Written into a pretraining run's workdir: what ``--init-from`` recognises it by.
MARKER = "pretrain.json"


@flax.struct.dataclass
class PretrainState:
    """Step, student parameters and BN statistics, optimizer state, the DINO teacher and centre, RNG.

    ``teacher``: ``{"params", "batch_stats"}`` of the EMA teacher (DINO), ``{}`` otherwise;
    ``center (K,)`` float32: DINO's running mean of the teacher outputs (``(1,)`` unused otherwise).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    teacher: Any
    center: jax.Array
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The student's variables ``{'params', 'batch_stats'}``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def uses_teacher(cfg: Config) -> bool:
    """Whether the objective has an EMA teacher (DINO)."""
    return cfg.pretrain.objective == "dino"


def build_encoder(cfg: Config, num_classes: int = 1) -> models.Model:
    """The ``models.Model`` a pretraining run trains (GEI head: the projection head SimCLR and SupCon use)."""
    m = cfg.model
    return models.create(m.arch, max(1, num_classes), head="gei", embed_dim=m.embed_dim,
                         in_channels=cfg.data.channels,
                         dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
                         remat=m.remat, projection_layers=m.projection_layers,
                         **({"drop_path_rate": m.drop_path_rate} if m.drop_path_rate else {}))


def build_model(cfg: Config) -> models.SelfSupervisedModel:
    """Encoder plus, for DINO, the DINO head (``pretrain.dino_*`` sizes)."""
    p = cfg.pretrain
    head = None
    if uses_teacher(cfg):
        head = models.DINOHead(out_dim=p.dino_out_dim, hidden_dim=p.dino_hidden_dim,
                               bottleneck_dim=p.dino_bottleneck_dim)
    return models.SelfSupervisedModel(encoder=build_encoder(cfg), dino_head=head)


def create_state(model: models.SelfSupervisedModel, tx: optax.GradientTransformation, cfg: Config,
                 rng: jax.Array) -> PretrainState:
    """A fresh state for images of ``(data.image_size, data.image_size, data.channels)``; jittable."""
    init_rng, state_rng = jax.random.split(rng)
    d = cfg.data
    variables = model.init(init_rng, jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    teacher = {"params": params, "batch_stats": batch_stats} if uses_teacher(cfg) else {}
    k = cfg.pretrain.dino_out_dim if uses_teacher(cfg) else 1
    return PretrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                         opt_state=tx.init(params), teacher=teacher, center=jnp.zeros((k,), jnp.float32),
                         rng=state_rng)


def state_shardings(abstract: PretrainState, mesh: jax.sharding.Mesh) -> PretrainState:
    """Shardings of the state: parameters, optimizer state and teacher over ``fsdp`` (ZeRO-3); the rest replicated."""
    return shd.state_sharding(abstract, mesh)


def abstract_state(cfg: Config, model: models.SelfSupervisedModel, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh) -> tuple[PretrainState, PretrainState]:
    """``(shapes with shardings, shardings)`` of the state, without allocating it."""
    shapes = jax.eval_shape(lambda key: create_state(model, tx, cfg, key), jax.random.PRNGKey(0))
    shardings = state_shardings(shapes, mesh)
    return shd.with_shardings(shapes, shardings), shardings


def is_pretrain_run(path: str) -> bool:
    """Whether ``path`` is the workdir of a pretraining run (holds :data:`MARKER`)."""
    return storage.isdir(path) and storage.exists(storage.join(path, MARKER))


def read_run_config(workdir: str) -> Config:
    """The resolved config a pretraining run saved (``workdir/config.json``)."""
    return from_dict(json.loads(storage.read_text(storage.join(workdir, "config.json"))))


def encoder_variables(workdir: str, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The encoder's ``{'params', 'batch_stats'}`` (a ``models.Model``'s) from a pretraining run, and facts about it.

    DINO's encoder is the EMA teacher's (what DINO evaluates and releases); SimCLR's and SupCon's the
    student's. ``step``: a checkpoint step (default the latest). Host arrays, one device.
    """
    from lclsc_jax.train.state import make_optimizer  # the optimizer's shape only

    cfg = read_run_config(workdir)
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), best_metric=None)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise ValueError(f"{workdir}: this pretraining run has no checkpoint yet")
        mesh = shd.make_mesh(1)
        model = build_model(cfg)
        abstract, _ = abstract_state(cfg, model, make_optimizer(cfg), mesh)
        state = ckpt.restore(step, abstract)
    finally:
        ckpt.close(quiet=True)
    source = state.teacher if uses_teacher(cfg) else state.variables
    variables = {"params": source["params"]["encoder"], "batch_stats": source["batch_stats"].get("encoder", {})}
    info = {"arch": cfg.model.arch, "objective": cfg.pretrain.objective, "step": int(step),
            "image_size": cfg.data.image_size, "channels": cfg.data.channels, "embed_dim": cfg.model.embed_dim,
            "encoder": "teacher" if uses_teacher(cfg) else "student"}
    return jax.device_get(variables), info


def write_marker(workdir: str, cfg: Config) -> None:
    """Write :data:`MARKER` (process 0): the objective and the encoder a fine-tuning run will check against."""
    if jax.process_index() != 0:
        return
    storage.write_text(storage.join(workdir, MARKER), json.dumps(
        {"objective": cfg.pretrain.objective, "arch": cfg.model.arch, "image_size": cfg.data.image_size,
         "channels": cfg.data.channels}, indent=2))


def init_from_run(variables: dict[str, Any], workdir: str, cfg: Config) -> tuple[dict[str, Any], str]:
    """``variables`` (a fine-tuning ``Model``'s) with the backbone of a pretraining run's encoder; heads kept fresh.

    The backbone is every top-level group but the heads (``fc``, ``head``). Raises ``ValueError`` if the
    run's encoder is another arch, channel count or shape. Returns the variables and a one-line report.
    """
    from lclsc_jax.train.state import HEAD_GROUPS

    encoder, info = encoder_variables(workdir)
    if info["arch"] != cfg.model.arch or info["channels"] != cfg.data.channels:
        raise ValueError(f"--init-from {workdir}: pretrained a {info['arch']} on {info['channels']}-channel images, "
                         f"but this run is a {cfg.model.arch} on {cfg.data.channels}-channel images")
    out = {c: dict(v) for c, v in variables.items()}
    copied = 0
    for collection in ("params", "batch_stats"):
        for group, tree in encoder.get(collection, {}).items():
            if group in HEAD_GROUPS:
                continue
            mine = variables.get(collection, {}).get(group)
            bad = _shape_mismatch(mine, tree)
            if bad:
                raise ValueError(f"--init-from {workdir}: {collection}/{group} differs from this model's ({bad})")
            out[collection][group] = jax.tree_util.tree_map(
                lambda new, old: jnp.asarray(new, dtype=old.dtype), tree, mine)
            copied += len(jax.tree_util.tree_leaves(tree))
    report = (f"{copied} backbone arrays from the {info['objective']} run's {info['encoder']} at step "
              f"{info['step']}; heads re-initialised")
    return out, report


def _shape_mismatch(mine: Any, theirs: Any) -> str:
    """'' when the two trees have the same structure and shapes, else what differs first."""
    if mine is None:
        return "this model has no such group"
    a = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(mine)}
    b = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(theirs)}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k)} here, {b.get(k)} pretrained"
    return ""
