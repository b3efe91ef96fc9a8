"""LCL-SC losses: this project's JAX functions vs an independent PyTorch implementation.

The PyTorch versions below are written from the equations in docs/method.md (Khosla et al. 2020
L_out; prototype CE against stop-gradient global embeddings; TK-MMP with top/bottom-k means),
in float64 with autograd, and compared to the JAX float32 values *and* gradients w.r.t. the
embeddings at 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import method

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch
TOL = 1e-5


# ----------------------------------------------------------------------- PyTorch reference


def t_normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def t_gei_logits(z, g, tau):
    return t_normalize(z) @ t_normalize(g).T / tau


def t_supcon(z, labels, tau):
    """Khosla et al. L_out: mean over anchors with >= 1 positive; 0 when there is none."""
    zn = t_normalize(z)
    sim = zn @ zn.T / tau
    n = z.shape[0]
    total, anchors = z.new_zeros(()), 0
    for i in range(n):
        others = [a for a in range(n) if a != i]
        pos = [p for p in others if labels[p] == labels[i]]
        if not pos:
            continue
        log_denom = torch.logsumexp(sim[i, others], dim=0)
        total = total - torch.stack([sim[i, p] - log_denom for p in pos]).mean()
        anchors += 1
    return total / anchors if anchors else (z * 0).sum()  # 0 with a (zero) gradient


def t_proto(z, labels, g, tau):
    return F.cross_entropy(t_gei_logits(z, g.detach(), tau), labels)


def t_tk_mmp(maps, k_max, k_min, alpha):
    b, h, w, c = maps.shape
    flat = maps.reshape(b, h * w, c)
    top = flat.topk(k_max, dim=1, largest=True).values.mean(dim=1)
    bottom = flat.topk(k_min, dim=1, largest=False).values.mean(dim=1)
    return top + alpha * bottom


def t_saliency_maps(local_z, g):
    return torch.einsum("bhwd,cd->bhwc", t_normalize(local_z), t_normalize(g.detach()))


def t_d4(x, t):
    """The project's D4 convention on (h, w) = dims (1, 2) of one sample batch."""
    y = torch.rot90(x, t % 4, dims=(1, 2))
    return torch.flip(y, dims=(2,)) if t >= 4 else y


# ----------------------------------------------------------------------- helpers


def both(jax_fn, torch_fn, *arrays):
    """Value and gradient w.r.t. the first array, in JAX (float32) and PyTorch (float64)."""
    j_val, j_grad = jax.value_and_grad(jax_fn)(*[jnp.asarray(a, jnp.float32) for a in arrays])
    ts = [torch.tensor(np.asarray(a, np.float64)) for a in arrays]
    ts[0].requires_grad_(True)
    t_val = torch_fn(*ts)
    (t_grad,) = torch.autograd.grad(t_val, ts[0], allow_unused=True)
    t_grad = torch.zeros_like(ts[0]) if t_grad is None else t_grad
    return float(j_val), np.asarray(j_grad), float(t_val.detach()), t_grad.numpy()


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    b, d, c = 8, 16, 3
    return {
        "z": rng.standard_normal((b, d)) * 2.0,  # deliberately not unit norm
        "labels": np.array([0, 0, 1, 2, 1, 0, 2, 1]),
        "labels_lonely": np.array([0, 0, 1, 2, 1, 0, 2, 3]),  # class 3: anchor without positive
        "g": rng.standard_normal((c + 1, d)),
        "local": rng.standard_normal((4, 5, 5, d)),
        "local_t": rng.standard_normal((4, 5, 5, d)),
    }


# ----------------------------------------------------------------------- tests


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_gei_logits(data, tau):
    j = np.asarray(method.gei_logits(jnp.asarray(data["z"], jnp.float32), jnp.asarray(data["g"], jnp.float32), tau))
    t = t_gei_logits(torch.tensor(data["z"]), torch.tensor(data["g"]), tau).numpy()
    assert_close(j, t)


@pytest.mark.parametrize("labels_key", ["labels", "labels_lonely"])
@pytest.mark.parametrize("tau", [0.1, 0.3])
def test_supervised_contrastive(data, labels_key, tau):
    labels = data[labels_key]
    jv, jg, tv, tg = both(
        lambda z: method.supervised_contrastive_loss(z, jnp.asarray(labels), tau),
        lambda z: t_supcon(z, torch.tensor(labels), tau),
        data["z"],
    )
    assert_close(jv, tv)
    assert_close(jg, tg)


def test_supervised_contrastive_without_positives_is_zero(data):
    labels = np.arange(8)
    jv, jg, tv, tg = both(
        lambda z: method.supervised_contrastive_loss(z, jnp.asarray(labels), 0.1),
        lambda z: t_supcon(z, torch.tensor(labels), 0.1),
        data["z"],
    )
    assert jv == tv == 0.0
    assert np.all(jg == 0) and np.all(tg == 0)


def test_prototype_contrastive(data):
    labels = data["labels_lonely"]
    jv, jg, tv, tg = both(
        lambda z, g: method.prototype_contrastive_loss(z, jnp.asarray(labels), g, 0.1),
        lambda z, g: t_proto(z, torch.tensor(labels), g, 0.1),
        data["z"], data["g"],
    )
    assert_close(jv, tv)
    assert_close(jg, tg)
    # G is a constant: no gradient flows into it.
    g_grad = jax.grad(lambda g: method.prototype_contrastive_loss(
        jnp.asarray(data["z"], jnp.float32), jnp.asarray(labels), g, 0.1))(jnp.asarray(data["g"], jnp.float32))
    assert np.all(np.asarray(g_grad) == 0)


@pytest.mark.parametrize("w_ss", [1.0, 0.5])
def test_label_contrastive(data, w_ss):
    labels = data["labels_lonely"]
    jv, jg, tv, tg = both(
        lambda z, g: method.label_contrastive_loss(z, jnp.asarray(labels), g, 0.1, w_ss),
        lambda z, g: t_proto(z, torch.tensor(labels), g, 0.1) + w_ss * t_supcon(z, torch.tensor(labels), 0.1),
        data["z"], data["g"],
    )
    assert_close(jv, tv)
    assert_close(jg, tg)


@pytest.mark.parametrize("k_max,k_min,alpha", [(3, 2, 1.0), (5, 5, -1.0), (25, 25, 1.0), (1, 4, 0.5)])
def test_tk_mmp(data, k_max, k_min, alpha):
    maps = np.tanh(data["local"][..., :4])  # (B, 5, 5, 4) in [-1, 1] like cosines
    j = np.asarray(method.tk_mmp(jnp.asarray(maps, jnp.float32), k_max / 25, k_min / 25, alpha))  # counts of 5x5
    t = t_tk_mmp(torch.tensor(maps), k_max, k_min, alpha).numpy()
    assert_close(j, t)


@pytest.mark.parametrize("alpha", [-1.0, 1.0])
def test_saliency_consistency_from_local_embeddings(data, alpha):
    """Gradient w.r.t. the per-location embeddings through cos maps, TK-MMP and the CE."""
    labels = data["labels"][:4]
    k_max, k_min, tau = 3, 2, 0.1

    def j_loss(local, g):
        maps = method.class_saliency_maps(local, g)
        return method.saliency_consistency_loss(maps, jnp.asarray(labels), tau=tau, k_max=k_max / 25, k_min=k_min / 25,
                                                alpha=alpha)

    def t_loss(local, g):
        s = t_tk_mmp(t_saliency_maps(local, g), k_max, k_min, alpha) / tau
        return F.cross_entropy(s, torch.tensor(labels))

    jv, jg, tv, tg = both(j_loss, t_loss, data["local"], data["g"][:3])
    assert_close(jv, tv)
    assert_close(jg, tg)


def test_saliency_consistency_with_equivariance(data):
    """CE term plus w_eq * mean (S(Tx) - T S(x))^2 with per-sample D4 transforms."""
    labels = data["labels"][:4]
    t_idx = np.array([1, 4, 6, 3])
    g = data["g"][:3]
    w_eq = 0.7

    def j_loss(local, local_t):
        maps = method.class_saliency_maps(local, jnp.asarray(g, jnp.float32))
        maps_t = method.class_saliency_maps(local_t, jnp.asarray(g, jnp.float32))
        return method.saliency_consistency_loss(
            maps, jnp.asarray(labels), tau=0.1, k_max=3 / 25, k_min=2 / 25, alpha=-1.0,
            maps_transformed=maps_t, transform=jnp.asarray(t_idx), w_eq=w_eq,
        )

    def t_loss(local, local_t):
        gt = torch.tensor(g)
        maps, maps_t = t_saliency_maps(local, gt), t_saliency_maps(local_t, gt)
        ce = F.cross_entropy(t_tk_mmp(maps, 3, 2, -1.0) / 0.1, torch.tensor(labels))
        target = torch.stack([t_d4(maps[i : i + 1], int(t))[0] for i, t in enumerate(t_idx)])
        return ce + w_eq * ((maps_t - target) ** 2).mean()

    jv, jg, tv, tg = both(j_loss, t_loss, data["local"], data["local_t"])
    assert_close(jv, tv)
    assert_close(jg, tg)
