"""NT-Xent, DINO's loss, centre, teacher EMA and schedules against NumPy loops and PyTorch re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lclsc_jax import method

torch = pytest.importorskip("torch")
F = torch.nn.functional

nt_xent_jit = jax.jit(method.nt_xent_loss, static_argnames="tau")
nt_xent_grad = jax.jit(jax.grad(method.nt_xent_loss), static_argnames="tau")
dino_jit = jax.jit(method.dino_loss, static_argnames="student_temp")
dino_grad = jax.jit(jax.grad(method.dino_loss), static_argnames="student_temp")
center_jit = jax.jit(method.dino_center_update)


# ---------------------------------------------------------------- references
def _nt_xent_numpy(z1, z2, tau):
    """The SimCLR paper's l(i, j) as a double loop over the 2B anchors (float64)."""
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
    """SimCLR's formulation: a (2B, 2B) logits matrix, its diagonal masked out, cross-entropy to the other view."""
    z = F.normalize(torch.cat([torch.as_tensor(z1), torch.as_tensor(z2)]).double(), dim=1)
    b = len(z1)
    logits = z @ z.T / tau
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(logits, targets).item()


class _DINOLossTorch(torch.nn.Module):
    """facebookresearch/dino's ``DINOLoss`` (forward + update_center), on the flat (V*B, K) layout it receives."""

    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float64))

    def forward(self, student_output, teacher_output, temp):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)  # world size 1
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def _dino_case(seed=2, vs=5, vt=2, b=4, k=7):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(vs, b, k)).astype(np.float32) * 2  # 2 global + 3 local views
    teacher = rng.normal(size=(vt, b, k)).astype(np.float32) * 2
    center = rng.normal(size=(k,)).astype(np.float32) * 0.3
    return student, teacher, center


@pytest.fixture(scope="module")
def views():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)


# ---------------------------------------------------------------- NT-Xent
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_a_double_loop_and_simclrs_cross_entropy_form(views, tau):
    z1, z2 = views
    got = nt_xent_jit(jnp.asarray(z1), jnp.asarray(z2), tau=tau)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _nt_xent_numpy(z1, z2, tau), rtol=1e-5)
    np.testing.assert_allclose(float(got), _nt_xent_torch(z1, z2, tau), rtol=1e-5)


def test_nt_xent_is_symmetric_in_the_views_and_invariant_to_scaling(views):
    z1, z2 = map(jnp.asarray, views)
    a = float(nt_xent_jit(z1, z2, tau=0.2))
    np.testing.assert_allclose(float(nt_xent_jit(z2, z1, tau=0.2)), a, rtol=1e-6)
    np.testing.assert_allclose(float(nt_xent_jit(3.0 * z1, 0.5 * z2, tau=0.2)), a, rtol=1e-5)
    # Permuting the images (the same permutation of both views) changes nothing either.
    perm = np.array([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(float(nt_xent_jit(z1[perm], z2[perm], tau=0.2)), a, rtol=1e-6)


def test_nt_xent_gradient_matches_central_finite_differences_of_the_double_loop(views):
    z1, z2 = views
    g = np.asarray(nt_xent_grad(jnp.asarray(z1), jnp.asarray(z2), tau=0.2))
    eps, fd = 1e-4, np.zeros(z1.shape)
    z1d = z1.astype(np.float64)
    for i in range(z1.shape[0]):
        for j in range(z1.shape[1]):
            d = np.zeros_like(z1d)
            d[i, j] = eps
            fd[i, j] = (_nt_xent_numpy(z1d + d, z2, 0.2) - _nt_xent_numpy(z1d - d, z2, 0.2)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=2e-5)


def test_nt_xent_in_bfloat16_is_float32_and_equals_float32_on_the_rounded_values():
    rng = np.random.default_rng(1)
    z1, z2 = (jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16) for _ in range(2))
    low = nt_xent_jit(z1, z2, tau=0.2)
    assert low.dtype == jnp.float32
    r1, r2 = np.asarray(z1, np.float32), np.asarray(z2, np.float32)  # the bf16 values, exactly
    np.testing.assert_allclose(float(low), _nt_xent_numpy(r1, r2, 0.2), rtol=1e-5)


def test_nt_xent_refuses_mismatched_views():
    with pytest.raises(AssertionError):
        method.nt_xent_loss(jnp.ones((4, 3)), jnp.ones((5, 3)))
    with pytest.raises(ValueError):
        method.nt_xent_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), tau=0.0)


# ---------------------------------------------------------------- DINO
@pytest.mark.parametrize("t_temp", [0.04, 0.07])
def test_dino_loss_and_centre_match_dinoloss_with_multi_crop(t_temp):
    student, teacher, center = _dino_case()
    vs, b, k = student.shape
    ref = _DINOLossTorch(k, ncrops=vs)
    ref.center = torch.as_tensor(center, dtype=torch.float64)[None]
    # DINOLoss receives the views concatenated along the batch: (V * B, K), view-major.
    s_flat = torch.as_tensor(student.reshape(vs * b, k), dtype=torch.float64).requires_grad_()
    t_flat = torch.as_tensor(teacher.reshape(-1, k), dtype=torch.float64)
    want = ref(s_flat, t_flat, t_temp)
    want.backward()
    args = (jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center))
    got = dino_jit(*args, student_temp=0.1, teacher_temp=t_temp)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
    grad = dino_grad(*args, student_temp=0.1, teacher_temp=t_temp)
    np.testing.assert_allclose(np.asarray(grad).reshape(vs * b, k), s_flat.grad.numpy(), rtol=1e-4, atol=1e-7)
    new_center = center_jit(jnp.asarray(center), jnp.asarray(teacher), 0.9)
    np.testing.assert_allclose(np.asarray(new_center), ref.center[0].numpy(), rtol=1e-5, atol=1e-7)


def test_dino_loss_with_only_the_global_views_pairs_them_crosswise():
    student, teacher, center = _dino_case(seed=6, vs=2)
    ref = _DINOLossTorch(7, ncrops=2)
    ref.center = torch.as_tensor(center, dtype=torch.float64)[None]
    want = ref(torch.as_tensor(student.reshape(-1, 7), dtype=torch.float64),
               torch.as_tensor(teacher.reshape(-1, 7), dtype=torch.float64), 0.04).item()
    got = method.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), 0.1, 0.04)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_dino_loss_gives_no_gradient_to_the_teacher_or_the_centre():
    student, teacher, center = map(jnp.asarray, _dino_case(seed=3))
    g_t, g_c = jax.grad(method.dino_loss, argnums=(1, 2))(student, teacher, center)
    np.testing.assert_array_equal(np.asarray(g_t), 0.0)
    np.testing.assert_array_equal(np.asarray(g_c), 0.0)


def test_dino_loss_in_bfloat16_is_float32_and_equals_float32_on_the_rounded_values():
    student, teacher, center = _dino_case(seed=7, b=6, k=16)
    sb, tb = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    low = dino_jit(sb, tb, jnp.asarray(center), student_temp=0.1, teacher_temp=0.04)
    assert low.dtype == jnp.float32
    same = dino_jit(jnp.asarray(sb, jnp.float32), jnp.asarray(tb, jnp.float32), jnp.asarray(center),
                    student_temp=0.1, teacher_temp=0.04)
    np.testing.assert_allclose(float(low), float(same), rtol=1e-6)
    full = dino_jit(*map(jnp.asarray, (student, teacher, center)), student_temp=0.1, teacher_temp=0.04)
    np.testing.assert_allclose(float(low), float(full), rtol=3e-2)
    c = method.dino_center_update(jnp.asarray(center), tb, 0.9)
    assert c.dtype == jnp.float32


def test_dino_loss_refuses_mismatched_views():
    student, teacher, center = map(jnp.asarray, _dino_case())
    with pytest.raises(ValueError):
        method.dino_loss(student[:1], teacher, center)  # fewer student than teacher views
    with pytest.raises(ValueError):
        method.dino_loss(student, teacher, center[:3])
    with pytest.raises(ValueError):
        method.dino_loss(student, teacher, center, teacher_temp=0.0)


# ---------------------------------------------------------------- centre, EMA, schedules
def test_centre_update_closed_form():
    rng = np.random.default_rng(4)
    teacher = rng.normal(size=(2, 3, 5)).astype(np.float32)
    c = rng.normal(size=5).astype(np.float32)
    want = 0.9 * c.astype(np.float64) + 0.1 * teacher.astype(np.float64).reshape(-1, 5).mean(0)
    np.testing.assert_allclose(np.asarray(center_jit(jnp.asarray(c), jnp.asarray(teacher), 0.9)), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(center_jit(jnp.asarray(c), jnp.asarray(teacher), 1.0)), c, rtol=0)


def test_teacher_ema_closed_form_and_float32_leaves():
    t_tree = {"a": np.ones((2, 2), np.float32), "b": {"c": np.zeros(3, np.float32)}}
    s_tree = {"a": np.full((2, 2), 3.0, np.float32), "b": {"c": np.full(3, -1.0, np.float32)}}
    out = jax.jit(method.ema_params)(t_tree, s_tree, jnp.float32(0.75))
    np.testing.assert_allclose(out["a"], 0.75 * 1.0 + 0.25 * 3.0, rtol=1e-7)
    np.testing.assert_allclose(out["b"]["c"], 0.25 * -1.0, rtol=1e-7)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(t_tree)
    # bf16 leaves: the result is float32, so m = 0.996 moves the teacher by 0.004 * (s - t) as it should.
    low = method.ema_params({"w": jnp.ones(4, jnp.bfloat16)}, {"w": jnp.full(4, 2.0, jnp.bfloat16)}, 0.996)
    assert low["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low["w"]), 1.004, rtol=1e-6)
    g = jax.grad(lambda s: jnp.sum(method.ema_params({"w": jnp.ones(3)}, {"w": s}, 0.5)["w"]))(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def _dino_cosine_scheduler(base, final, total):
    """DINO's utils.cosine_scheduler without warm-up, as one array per iteration."""
    iters = np.arange(total)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_cosine_schedule_matches_dinos_scheduler_and_holds_the_end_under_jit():
    f = jax.jit(method.cosine_schedule, static_argnums=(1, 2, 3))
    want = _dino_cosine_scheduler(0.996, 1.0, 100)
    for step in (0, 1, 37, 50, 99):
        np.testing.assert_allclose(float(f(jnp.int32(step), 100, 0.996, 1.0)), want[step], rtol=1e-7)
    assert float(f(jnp.int32(100), 100, 0.996, 1.0)) == 1.0 and float(f(jnp.int32(500), 100, 0.996, 1.0)) == 1.0
    np.testing.assert_allclose(float(f(jnp.int32(50), 100, 0.04, 0.4)), 0.22, rtol=1e-6)  # weight decay ramp
    np.testing.assert_allclose(float(f(jnp.int32(25), 100, 0.0, 1.0)), (1 - math.cos(math.pi / 4)) / 2, rtol=1e-6)


@pytest.mark.parametrize("warmup", [1, 2, 10])
def test_teacher_temperature_matches_dinos_linspace_schedule_under_jit(warmup):
    f = jax.jit(method.teacher_temperature, static_argnums=(1, 2, 3))
    total = 15
    want = np.concatenate([np.linspace(0.04, 0.07, warmup), np.ones(total - warmup) * 0.07])
    got = np.array([float(f(jnp.int32(s), warmup, 0.04, 0.07)) for s in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(f(jnp.int32(10_000), warmup, 0.04, 0.07)) == pytest.approx(0.07)
    assert float(method.teacher_temperature(3, 0, 0.04, 0.07)) == pytest.approx(0.07)


def test_dino_loss_takes_a_traced_teacher_temperature():
    student, teacher, center = map(jnp.asarray, _dino_case(seed=8))

    @jax.jit
    def loss_at(step):
        return method.dino_loss(student, teacher, center, 0.1, method.teacher_temperature(step, 5, 0.04, 0.07))

    for step, temp in ((0, 0.04), (2, 0.055), (9, 0.07)):  # warm-up over 5 steps: 0.04 ... 0.07 at step 4
        want = method.dino_loss(student, teacher, center, 0.1, temp)
        np.testing.assert_allclose(float(loss_at(jnp.int32(step))), float(want), rtol=1e-6)


# ---------------------------------------------------------------- global batch
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_losses_on_a_batch_sharded_over_8_devices_equal_the_unsharded_ones(axis_type):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    s, t = rng.normal(size=(4, 16, 6)).astype(np.float32), rng.normal(size=(2, 16, 6)).astype(np.float32)
    c = rng.normal(size=6).astype(np.float32)
    want = (_nt_xent_numpy(z1, z2, 0.2), float(method.dino_loss(s, t, c)), np.asarray(method.dino_center_update(c, t)))

    @jax.jit
    def losses(a, b, st, te):
        return (method.nt_xent_loss(a, b, tau=0.2), method.dino_loss(st, te, jnp.asarray(c)),
                method.dino_center_update(jnp.asarray(c), te))

    with jax.set_mesh(mesh):
        rows, cols = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))
        args = (jax.device_put(z1, rows), jax.device_put(z2, rows), jax.device_put(s, cols), jax.device_put(t, cols))
        assert len(args[0].sharding.device_set) == 8
        got = losses(*args)
    np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5)
    np.testing.assert_allclose(float(got[1]), want[1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[2]), want[2], rtol=1e-6)
