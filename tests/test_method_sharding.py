"""Global-batch semantics: the method gives the same numbers with the batch sharded over 8 devices.

Both mesh axis types are covered: ``Auto`` (XLA inserts the collectives) and ``Explicit``
(the default of ``jax.make_mesh`` in jax 0.10, where the sharding is part of the type).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lclsc_jax.method as M

B, D, C, H = 16, 8, 5, 4


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    """Fail (not skip) without 8 devices, as test_train_steps does: tests/conftest.py sets them."""
    assert jax.device_count() >= 8, (
        f"{jax.device_count()} devices: tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "before JAX starts; an XLA_FLAGS already in the environment overrides it"
    )


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C - 1, B).astype(np.int32)  # class C-1 absent
    return dict(
        z=jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
        labels=jnp.asarray(labels),
        g=jnp.asarray(rng.normal(size=(C, D)), jnp.float32),
        seen=jnp.asarray([True, False, True, True, False]),
        maps=jnp.asarray(rng.uniform(-1, 1, size=(B, H, H, C)), jnp.float32),
        maps_t=jnp.asarray(rng.uniform(-1, 1, size=(B, H, H, C)), jnp.float32),
        t=jnp.asarray(rng.integers(0, 8, B), jnp.int32),
        mask=jnp.asarray(rng.random((B, H, H)) > 0.3),
    )


def _ema(g, seen, z, labels):
    return M.ema_update(g, seen, z, labels, 0.9)


def _supcon(z, labels):
    return M.supervised_contrastive_loss(z, labels, 0.1), jax.grad(M.supervised_contrastive_loss)(z, labels)


def _lcl(z, labels, g):
    return jax.value_and_grad(M.label_contrastive_loss)(z, labels, g, 0.1, 0.5)


def _sc(maps, labels, maps_t, t, mask):
    loss = lambda a, at: M.saliency_consistency_loss(  # noqa: E731
        a, labels, k_max=3 / 16, k_min=2 / 16, alpha=-1.0, tau=0.1, maps_transformed=at, transform=t,
        w_eq=1.0, mask=mask)  # k: 3 and 2 of the H*H = 16 locations
    return jax.value_and_grad(loss, argnums=(0, 1))(maps, maps_t)


CASES = {
    # name: (fn, argument names, which arguments carry the batch axis)
    "ema_update": (_ema, ("g", "seen", "z", "labels"), (False, False, True, True)),
    "supervised_contrastive": (_supcon, ("z", "labels"), (True, True)),
    "label_contrastive": (_lcl, ("z", "labels", "g"), (True, True, False)),
    "saliency_consistency": (_sc, ("maps", "labels", "maps_t", "t", "mask"), (True,) * 5),
}


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(batch, name, axis_type):
    fn, names, batched = CASES[name]
    args = [batch[n] for n in names]
    want = jax.jit(fn)(*args)  # one device

    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    shardings = tuple(NamedSharding(mesh, P("data") if b else P()) for b in batched)
    with jax.set_mesh(mesh):
        sharded_args = [jax.device_put(a, s) for a, s in zip(args, shardings)]
        got = jax.jit(fn, in_shardings=shardings)(*sharded_args)
    assert len(sharded_args[names.index("labels")].sharding.device_set) == 8
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert w.dtype == g.dtype and w.shape == g.shape
        if w.dtype == jnp.bool_:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-6, atol=2e-7)
