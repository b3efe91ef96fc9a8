"""Model-randomisation sanity check (Adebayo et al. 2018) on a tiny model trained in the test.

Toy task: a bright 8x8 square on noise; its half of the image (left/right) is the class. After a
few dozen Adam steps the model solves it; re-initialising the weights must then change the
Grad-CAM maps substantially (low Spearman rank correlation), while the same weights reproduce them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr

from lclsc_jax import explain, models

S = 32


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    x = rs.randn(n, S, S, 1).astype(np.float32) * 0.3
    y = rs.randint(0, 2, n).astype(np.int32)
    mask = np.zeros((n, S, S), bool)
    for i in range(n):
        r = rs.randint(0, S - 8)
        c = rs.randint(0, S // 2 - 8) + (S // 2 if y[i] else 0)
        x[i, r:r + 8, c:c + 8] += 2.0
        mask[i, r:r + 8, c:c + 8] = True
    return x, y, mask


@pytest.mark.slow
def test_randomising_weights_changes_gradcam():
    model = models.create("tiny", 2, head="linear", embed_dim=8, in_channels=1)
    x, y, _ = _toy(256, 0)
    variables = model.init(jax.random.key(0), jnp.asarray(x[:2]), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss_fn(p):
            out, upd = model.apply({"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out["logits"], yb).mean(), upd["batch_stats"]

        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    rs = np.random.RandomState(1)
    for _ in range(60):
        idx = rs.choice(len(x), 32, replace=False)
        params, stats, opt_state, _ = step(params, stats, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    trained = {"params": params, "batch_stats": stats}

    xt, yt, _ = _toy(16, 2)
    logits = model.apply(trained, jnp.asarray(xt), train=False)["logits"]
    assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(yt))) >= 0.9, "toy model did not train"

    maps = np.asarray(explain.saliency("gradcam", model, trained, jnp.asarray(xt), jnp.asarray(yt), "stage3"))
    randomised = model.init(jax.random.key(123), jnp.asarray(xt[:2]), train=False)
    rmaps = np.asarray(explain.saliency("gradcam", model, randomised, jnp.asarray(xt), jnp.asarray(yt), "stage3"))
    rho = [spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(maps, rmaps)]
    rho = np.nan_to_num(np.array(rho), nan=0.0)
    assert np.median(np.abs(rho)) < 0.5, rho
    # control: the same weights give the same maps (rank correlation 1)
    again = np.asarray(explain.saliency("gradcam", model, trained, jnp.asarray(xt), jnp.asarray(yt), "stage3"))
    assert spearmanr(maps[0].ravel(), again[0].ravel())[0] > 0.999
