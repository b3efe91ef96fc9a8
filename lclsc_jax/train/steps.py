"""Pure train and eval steps, and their sharded ``jax.jit`` wrappers.

The losses see the *global* batch (arrays are global ``jax.Array`` s sharded over the ``data``
axis), so every number is independent of the device and process count. Batches are images
``(B, H, W, C)`` or, with a 3D arch, volumes ``(B, D, H, W, C)``: the same steps, the equivariance
view turns every slice's axial plane (``method.transform_axes``), and ``loss.fov_mask`` (pCLE's
circular field of view) applies to 2D frames only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lclsc_jax import method
from lclsc_jax.evaluate.shortcuts import inscribed_disc
from lclsc_jax.method.transforms import NUM_DIHEDRAL
from lclsc_jax.train import sharding as shd
from lclsc_jax.train.config import Config, uses_gei
from lclsc_jax.train.state import TrainState

AUX_WEIGHT = 0.4  # weight of an auxiliary classifier's cross-entropy (torchvision's InceptionV3 recipe)
TRAIN_KEYS = ("image", "label")
EVAL_KEYS = ("image", "label")


def _compute_dtype(cfg: Config) -> jnp.dtype:
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def sc_maps(cfg: Config, out: dict[str, jax.Array], global_emb: jax.Array) -> jax.Array:
    """The run's class saliency maps ``(B, h, w, C)`` (volumes ``(B, d, h, w, C)``) from a model output.

    ``loss.sc_maps`` decides which. ``cosine``: ``cos(g(F(u)), G_c)`` (the paper's maps);
    ``decomposed``: maps whose mean is the GEI cosine (``method.decomposed_saliency_maps``; exact
    with ``model.projection_layers=1``).
    """
    g = jax.lax.stop_gradient(global_emb)
    if cfg.loss.sc_maps == "decomposed":
        return method.decomposed_saliency_maps(out["local_embedding"], out["embedding"], g)
    return method.class_saliency_maps(out["local_embedding"], g)


def _sc_terms(cfg: Config, out: dict[str, jax.Array], out_t: dict[str, jax.Array] | None, labels: jax.Array,
              global_emb: jax.Array, t: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Saliency-consistency loss: TK-MMP cross-entropy on all views plus the equivariance MSE; and the SC logits."""
    loss_cfg = cfg.loss
    maps = sc_maps(cfg, out, global_emb)
    # Feature cells in pCLE's disc; volumes (B, d, h, w, C) have no circular field of view.
    mask = inscribed_disc(*maps.shape[1:3]) if loss_cfg.fov_mask and maps.ndim == 4 else None
    kw = dict(tau=loss_cfg.tau, k_max=float(loss_cfg.k_max), k_min=float(loss_cfg.k_min), alpha=loss_cfg.alpha)
    if out_t is None:
        ce = method.saliency_consistency_loss(maps, labels, mask=mask, **kw)
        eq = jnp.zeros((), jnp.float32)
        logits = method.sc_logits(maps, mask=mask, **kw)
        return ce, eq, logits
    maps_t = sc_maps(cfg, out_t, global_emb)
    sub = slice(None, None, loss_cfg.eq_stride)
    # TK-MMP cross-entropy over both views; the equivariance term on the pairs (x, T x).
    ce = method.saliency_consistency_loss(jnp.concatenate([maps, maps_t]),
                                          jnp.concatenate([labels, labels[sub]]), mask=mask, **kw)
    eq = method.equivariance_loss(maps[sub], maps_t, t, mask=mask)
    logits = method.sc_logits(maps, mask=mask, **kw)
    return ce, eq, logits


def make_loss_fn(model: Any, cfg: Config) -> Callable[..., tuple[jax.Array, tuple[dict, Any, dict]]]:
    """``loss_fn(params, state, batch, rng) -> (loss, (metrics, new_batch_stats, aux))``; pure."""
    lc = cfg.loss
    dtype = _compute_dtype(cfg)
    second_view = lc.name == "lcl_sc" and lc.lambda_sc > 0 and lc.w_eq > 0

    def forward(params, batch_stats, x, rng):
        # "dropout": stochastic depth of the registry backbones (unused by the others).
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, x.astype(dtype),
                                   train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        return out, mutated.get("batch_stats", batch_stats)

    def loss_fn(params, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        x, y = batch["image"], batch["label"].astype(jnp.int32)
        drop_rng = jax.random.fold_in(rng, 1)  # stochastic depth; rng itself draws the view transforms
        out, new_bs = forward(params, state.batch_stats, x, drop_rng)
        z = out["embedding"]
        metrics: dict[str, jax.Array] = {}
        aux: dict[str, jax.Array] = {"z": z, "labels": y}
        # InceptionV3's auxiliary classifier: torchvision's recipe, 0.4 x its cross-entropy.
        aux_loss = (AUX_WEIGHT * method.cross_entropy_loss(out["aux_logits"], y, label_smoothing=lc.label_smoothing)
                    if "aux_logits" in out else None)
        if aux_loss is not None:
            metrics["loss_aux"] = aux_loss
        if not uses_gei(cfg):
            loss = method.cross_entropy_loss(out["logits"], y, label_smoothing=lc.label_smoothing)
            metrics["accuracy"] = jnp.mean(jnp.argmax(out["logits"], -1) == y)
            return (loss if aux_loss is None else loss + aux_loss), (metrics, new_bs, aux)

        out_t, t = None, None
        if second_view:
            sub = slice(None, None, lc.eq_stride)
            t = jax.random.randint(rng, (x[sub].shape[0],), 0, NUM_DIHEDRAL)
            x_t = method.apply_transform(x[sub], t)
            # A separate forward pass: the views stay on the devices that hold them (no resharding);
            # BN statistics of the running average follow the first view only.
            out_t, _ = forward(params, state.batch_stats, x_t, jax.random.fold_in(rng, 2))
            z_all = jnp.concatenate([z, out_t["embedding"]])
            y_all = jnp.concatenate([y, y[sub]])
        else:
            z_all, y_all = z, y
        aux = {"z": z_all, "labels": y_all}

        if lc.name == "supcon":
            loss = method.supervised_contrastive_loss(z_all, y_all, tau=lc.tau)
        else:
            loss = method.label_contrastive_loss(z_all, y_all, state.global_emb, tau=lc.tau, w_ss=lc.w_ss)
        gei = method.gei_logits(z, state.global_emb, tau=lc.tau)
        if lc.name == "lcl_sc" and lc.lambda_sc > 0:
            ce, eq, sc_logits = _sc_terms(cfg, out, out_t, y, state.global_emb, t)
            cons = method.prediction_consistency_loss(sc_logits, gei) if lc.w_consistency > 0 else jnp.zeros(())
            loss = loss + lc.lambda_sc * (ce + lc.w_eq * eq + lc.w_consistency * cons)
            metrics.update(loss_sc=ce, loss_eq=eq, loss_consistency=cons,
                           sc_accuracy=jnp.mean(jnp.argmax(sc_logits, -1) == y))
        metrics["accuracy"] = jnp.mean(jnp.argmax(gei, -1) == y)
        return (loss if aux_loss is None else loss + aux_loss), (metrics, new_bs, aux)

    return loss_fn


def make_train_step(model: Any, tx: optax.GradientTransformation, cfg: Config
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``: one optimizer step plus the EMA update.

    A step whose loss or gradient is not finite leaves the state untouched and reports
    ``nonfinite = 1`` so the loop can stop with the last good state.
    """
    loss_fn = make_loss_fn(model, cfg)
    gei = uses_gei(cfg)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng, step_rng = jax.random.split(state.rng)
        (loss, (metrics, new_bs, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, step_rng)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        global_emb, seen = state.global_emb, state.seen
        if gei:
            global_emb, seen = method.ema_update(global_emb, seen, jax.lax.stop_gradient(aux["z"]),
                                                 aux["labels"], momentum=cfg.loss.ema_momentum)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = state.replace(step=state.step + 1, params=new_params, batch_stats=new_bs, opt_state=new_opt,
                            global_emb=global_emb, seen=seen, rng=rng)
        # Keep the old values where the step went wrong (a select, fused by XLA).
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new,
                                     state.replace(step=state.step + 1, rng=rng))
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                       nonfinite=(~ok).astype(jnp.float32))
        return new, metrics

    return train_step


def make_eval_step(model: Any, cfg: Config) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
    """``eval_step(state, batch) -> {probs (B, C), embedding (B, D)}``; GEI or linear head by config."""
    dtype = _compute_dtype(cfg)
    tau = cfg.loss.tau

    def eval_step(state: TrainState, batch: dict[str, jax.Array]):
        out = model.apply(state.variables, batch["image"].astype(dtype), train=False)
        if uses_gei(cfg):
            probs, _ = method.gei_predict(out["embedding"], state.global_emb, tau=tau)
        else:
            probs = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)
        return {"probs": probs, "embedding": out["embedding"].astype(jnp.float32)}

    return eval_step


def jit_train_step(step_fn: Callable, mesh: jax.sharding.Mesh, state_sharding: Any = None,
                   donate: bool = True) -> Callable:
    """Compile ``train_step``: the batch over all devices, the state in ``state_sharding`` (default replicated).

    With FSDP shardings (``state.state_sharding``) XLA all-gathers the parameters for the forward
    and backward passes and reduce-scatters the gradients; the state stays sharded between steps.
    """
    st, bat = (state_sharding if state_sharding is not None else shd.replicated(mesh)), shd.batch_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(st, bat), out_shardings=(st, shd.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def jit_eval_step(step_fn: Callable, mesh: jax.sharding.Mesh, state_sharding: Any = None) -> Callable:
    """Compile ``eval_step``: batch sharded in, per-example outputs sharded out; state as in :func:`jit_train_step`."""
    st, bat = (state_sharding if state_sharding is not None else shd.replicated(mesh)), shd.batch_sharded(mesh)
    return jax.jit(step_fn, in_shardings=(st, bat), out_shardings=bat)
