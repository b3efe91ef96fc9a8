"""The pretraining step: on-device views, the objective on the global batch, the optimizer, the DINO teacher.

``pretrain_step(state, batch) -> (state, metrics)`` is pure. Every array is global (sharded over the
mesh), so SimCLR's negatives, SupCon's positives and DINO's centre come from the whole batch across
devices and hosts. With ``pretrain.grad_accum = n`` the batch is split into ``n`` micro-batches and the
gradient is cached at the embeddings (``train.accumulate.cached_grads``): the loss still sees the whole
batch, so ``n`` micro-batches give the gradient of one large batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lclsc_jax import method
from lclsc_jax.data import device_augment
from lclsc_jax.train import accumulate
from lclsc_jax.train import sharding as shd
from lclsc_jax.train.config import Config
from lclsc_jax.train.pretrain_state import PretrainState, uses_teacher

#: The host batch's keys a pretraining step reads (labels only for SupCon and the probes).
PRETRAIN_KEYS = ("image", "label")


def _dtype(cfg: Config) -> jnp.dtype:
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def view_groups(cfg: Config) -> list[tuple[int, int]]:
    """``[(first view, number of views), ...]`` of equal size: the global views, then the local ones."""
    v = cfg.views
    return [(0, v.n_global)] + ([(v.n_global, v.n_local)] if v.n_local else [])


def _forward(model: Any, cfg: Config, variables: dict[str, Any], views: list[jax.Array], rng: jax.Array,
             key: str, groups: list[tuple[int, int]]) -> tuple[jax.Array, Any]:
    """Run the views (each ``(B, S, S, C)``) through the model, one call per size; ``(B, V, K)`` outputs of ``key``.

    Views of one size are concatenated along the batch (their BatchNorm statistics are shared, as in
    SimCLR and DINO). Returns the outputs and the BN statistics after the last call.
    """
    dtype, outs, stats = _dtype(cfg), [], variables["batch_stats"]
    for i, (first, n) in enumerate(groups):
        x = jnp.concatenate(views[first:first + n]).astype(dtype)
        out, mutated = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(rng, i)})
        stats = mutated.get("batch_stats", stats)
        y = out[key].astype(jnp.float32)
        outs.append(y.reshape(n, -1, *y.shape[1:]))
    return jnp.swapaxes(jnp.concatenate(outs), 0, 1), stats


def make_loss(cfg: Config) -> Callable[[dict[str, jax.Array], dict[str, Any], jax.Array], tuple[jax.Array, dict]]:
    """``loss(outputs, batch, step) -> (loss, metrics)`` on the whole batch's outputs ``(B, V, K)``."""
    p = cfg.pretrain

    def simclr(outputs, batch, step):
        z = outputs["out"]
        return method.nt_xent_loss(z[:, 0], z[:, 1], tau=p.temperature), {}

    def supcon(outputs, batch, step):
        z = jnp.swapaxes(outputs["out"], 0, 1)  # (V, B, D): view-major, as the labels are tiled
        labels = jnp.tile(batch["label"].astype(jnp.int32), z.shape[0])
        return method.supervised_contrastive_loss(z.reshape(-1, z.shape[-1]), labels, tau=p.temperature), {}

    def dino(outputs, batch, step):
        teacher_temp = method.teacher_temperature(step, p.warmup_teacher_temp_steps, p.warmup_teacher_temp,
                                                  p.teacher_temp)
        loss = method.dino_loss(jnp.swapaxes(outputs["out"], 0, 1), batch["teacher"], batch["center"],
                                student_temp=p.student_temp, teacher_temp=teacher_temp)
        return loss, {"teacher_temp": teacher_temp}

    return {"simclr": simclr, "supcon": supcon, "dino": dino}[p.objective]


def make_pretrain_step(model: Any, tx: optax.GradientTransformation, cfg: Config
                       ) -> Callable[[PretrainState, dict[str, jax.Array]], tuple[PretrainState, dict[str, jax.Array]]]:
    """``pretrain_step(state, batch) -> (state, metrics)``; ``batch``: ``image (B, H, W, C)``, ``label (B,)``.

    A step whose loss or gradient is not finite leaves the state untouched and reports ``nonfinite = 1``.
    """
    p = cfg.pretrain
    groups = view_groups(cfg)
    key = "dino" if uses_teacher(cfg) else "embedding"
    loss_on_outputs = make_loss(cfg)
    n_teacher = cfg.views.n_global

    def pretrain_step(state: PretrainState, batch: dict[str, jax.Array]):
        rng, view_rng, fwd_rng = jax.random.split(state.rng, 3)
        views = device_augment.make_views(view_rng, batch["image"], cfg.views, cfg.data.image_size)
        extra: dict[str, jax.Array] = {}
        if uses_teacher(cfg):  # the teacher sees the global views only; no gradient
            t, _ = _forward(model, cfg, state.teacher, views[:n_teacher], fwd_rng, key, groups[:1])
            extra = {"teacher": jax.lax.stop_gradient(jnp.swapaxes(t, 0, 1)), "center": state.center}

        def encode(params, stats, micro, r):
            out, new_stats = _forward(model, cfg, {"params": params, "batch_stats": stats}, micro["views"], r,
                                      key, groups)
            return {"out": out}, new_stats

        def loss_fn(outputs):
            return loss_on_outputs(outputs, {"label": batch["label"], **extra}, state.step)

        loss, grads, new_stats, metrics = accumulate.cached_grads(
            encode, loss_fn, state.params, state.batch_stats, {"views": views}, p.grad_accum,
            jax.random.fold_in(fwd_rng, 1))
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        teacher, center = state.teacher, state.center
        if uses_teacher(cfg):
            m = method.cosine_schedule(state.step, cfg.train.steps, p.teacher_momentum, 1.0)
            teacher = {"params": method.ema_params(state.teacher["params"], new_params, m),
                       "batch_stats": new_stats}
            center = method.dino_center_update(state.center, extra["teacher"], p.center_momentum)
            metrics = {**metrics, "teacher_momentum": m}
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats, opt_state=new_opt,
                            teacher=teacher, center=center, rng=rng)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, state.replace(step=state.step + 1, rng=rng))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                       nonfinite=(~ok).astype(jnp.float32))
        return new, metrics

    return pretrain_step


def jit_pretrain_step(step_fn: Callable, mesh: jax.sharding.Mesh, shardings: PretrainState,
                      donate: bool = True) -> Callable:
    """Compile the step: the state in ``shardings`` (FSDP), the batch over all devices."""
    bat, rep = shd.batch_sharded(mesh), shd.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(shardings, bat), out_shardings=(shardings, rep),
                   donate_argnums=(0,) if donate else ())


def make_embed_fn(model: Any, cfg: Config, mesh: jax.sharding.Mesh) -> Callable[[Any, jax.Array], jax.Array]:
    """``embed(encoder_variables, images (B, H, W, C)) -> pooled features (B, F)`` float32, compiled (probes)."""
    dtype = _dtype(cfg)

    def embed(variables, images):
        out = model.encoder.apply(variables, images.astype(dtype), train=False)
        return out["pooled"].astype(jnp.float32)

    return jax.jit(embed, out_shardings=shd.batch_sharded(mesh))


def encoder_of(state: PretrainState, cfg: Config) -> dict[str, Any]:
    """The encoder's variables to probe: DINO's teacher, else the student."""
    src = state.teacher if uses_teacher(cfg) else state.variables
    return {"params": src["params"]["encoder"], "batch_stats": src["batch_stats"].get("encoder", {})}
