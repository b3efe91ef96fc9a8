"""SimCLR's NT-Xent, DINO's loss, centre, teacher EMA and schedules against NumPy loops and PyTorch re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lclsc_jax import method

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _nt_xent_numpy(z1, z2, tau):
    """The SimCLR paper's loss as a double loop over the 2B anchors (float64)."""
    u = np.concatenate([z1, z2]).astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    n, b = len(u), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = sum(math.exp(u[i] @ u[k] / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(u[i] @ u[pos] / tau) / denom)
    return total / n


def _nt_xent_torch(z1, z2, tau):
    """SimCLR's formulation with a masked (2B, 2B) logits matrix and cross-entropy (as in its reference code)."""
    z = F.normalize(torch.cat([torch.as_tensor(z1), torch.as_tensor(z2)]).double(), dim=1)
    b = len(z1)
    logits = z @ z.T / tau
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(logits, targets).item()


def _dino_loss_torch(student, teacher, center, student_temp, teacher_temp):
    """facebookresearch/dino's ``DINOLoss.forward`` re-written on (V, B, K) tensors."""
    s = [x / student_temp for x in torch.as_tensor(student).double()]
    t = [F.softmax((x - torch.as_tensor(center).double()) / teacher_temp, dim=-1) for x in torch.as_tensor(teacher).double()]
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(len(s)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return (total / n).item()


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)


def test_nt_xent_matches_a_double_loop_and_simclrs_cross_entropy_form(views):
    z1, z2 = views
    for tau in (0.1, 0.5):
        got = float(method.nt_xent_loss(jnp.asarray(z1), jnp.asarray(z2), tau=tau))
        np.testing.assert_allclose(got, _nt_xent_numpy(z1, z2, tau), rtol=1e-5)
        np.testing.assert_allclose(got, _nt_xent_torch(z1, z2, tau), rtol=1e-5)


def test_nt_xent_is_symmetric_scale_invariant_and_its_gradient_matches_finite_differences(views):
    z1, z2 = map(jnp.asarray, views)
    a = method.nt_xent_loss(z1, z2, tau=0.2)
    np.testing.assert_allclose(a, method.nt_xent_loss(z2, z1, tau=0.2), rtol=1e-6)
    np.testing.assert_allclose(a, method.nt_xent_loss(3.0 * z1, 0.5 * z2, tau=0.2), rtol=1e-5)
    g = np.asarray(jax.grad(lambda x: method.nt_xent_loss(x, z2, tau=0.2))(z1))
    eps, i, j = 1e-3, 2, 3
    d = np.zeros_like(views[0])
    d[i, j] = eps
    fd = (_nt_xent_numpy(views[0] + d, views[1], 0.2) - _nt_xent_numpy(views[0] - d, views[1], 0.2)) / (2 * eps)
    np.testing.assert_allclose(g[i, j], fd, rtol=1e-3, atol=1e-5)


def test_nt_xent_in_bfloat16_is_float32_and_close():
    rng = np.random.default_rng(1)
    z1, z2 = (jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(2))
    low = method.nt_xent_loss(z1.astype(jnp.bfloat16), z2.astype(jnp.bfloat16), tau=0.2)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, method.nt_xent_loss(z1, z2, tau=0.2), rtol=2e-2)


def test_dino_loss_matches_the_reference_with_multi_crop():
    rng = np.random.default_rng(2)
    student = rng.normal(size=(5, 4, 7)).astype(np.float32)  # 2 global + 3 local views
    teacher = rng.normal(size=(2, 4, 7)).astype(np.float32)
    center = rng.normal(size=(7,)).astype(np.float32) * 0.1
    for t_temp in (0.04, 0.07):
        got = float(method.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center),
                                     student_temp=0.1, teacher_temp=t_temp))
        np.testing.assert_allclose(got, _dino_loss_torch(student, teacher, center, 0.1, t_temp), rtol=1e-5)


def test_dino_loss_gives_no_gradient_to_the_teacher():
    rng = np.random.default_rng(3)
    s, t = jnp.asarray(rng.normal(size=(3, 2, 4)), jnp.float32), jnp.asarray(rng.normal(size=(2, 2, 4)), jnp.float32)
    g = jax.grad(lambda tt: method.dino_loss(s, tt, jnp.zeros(4)))(t)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_centre_ema_and_schedules_closed_forms():
    rng = np.random.default_rng(4)
    teacher = rng.normal(size=(2, 3, 5)).astype(np.float32)
    c = rng.normal(size=5).astype(np.float32)
    np.testing.assert_allclose(method.dino_center_update(jnp.asarray(c), jnp.asarray(teacher), 0.9),
                               0.9 * c + 0.1 * teacher.reshape(-1, 5).mean(0), rtol=1e-6)
    t_tree = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    s_tree = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full(3, -1.0, np.float32)}
    out = method.ema_params(t_tree, s_tree, 0.75)
    np.testing.assert_allclose(out["a"], 0.75 + 0.25 * 3.0)
    np.testing.assert_allclose(out["b"], -0.25)
    for step, want in ((0, 0.996), (50, 0.996 + 0.004 * 0.5), (100, 1.0), (150, 1.0)):
        np.testing.assert_allclose(method.cosine_schedule(step, 100, 0.996, 1.0), want, rtol=1e-6)
    np.testing.assert_allclose(method.cosine_schedule(25, 100, 0.0, 1.0), (1 - math.cos(math.pi / 4)) / 2, rtol=1e-6)
    for step, want in ((0, 0.04), (5, 0.055), (10, 0.07), (20, 0.07)):
        np.testing.assert_allclose(method.teacher_temperature(step, 10, 0.04, 0.07), want, rtol=1e-6)
    np.testing.assert_allclose(method.teacher_temperature(3, 0, 0.04, 0.07), 0.07)


def test_losses_on_a_batch_sharded_over_8_devices_equal_the_unsharded_ones():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as train.sharding's
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    cols = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    s, t = rng.normal(size=(4, 16, 6)).astype(np.float32), rng.normal(size=(2, 16, 6)).astype(np.float32)
    f = jax.jit(lambda a, b: method.nt_xent_loss(a, b, tau=0.2))
    np.testing.assert_allclose(f(jax.device_put(z1, rows), jax.device_put(z2, rows)), f(z1, z2), rtol=1e-6)
    g = jax.jit(lambda a, b: method.dino_loss(a, b, jnp.zeros(6)))
    np.testing.assert_allclose(g(jax.device_put(s, cols), jax.device_put(t, cols)), g(s, t), rtol=1e-6)
