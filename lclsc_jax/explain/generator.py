"""``perturbation_generator``: the relevance map of a trained optimal perturbation generator, one forward pass.

The generator (a :class:`lclsc_jax.models.unet3d.UNet3D` trained against the frozen classifier by
``lclsc_jax.train.relevance``; Rajapaksa & Khalvati 2022) maps inputs ``x (B, *S, C)`` to a mask
``m (B, *S)`` in [0, 1]: where perturbing the input changes the classifier's prediction most for
the least area. The map is that mask: the classifier is not run and the targets do not enter (the
generator explains the class it was trained on, by default the predicted one). Optionally the mask
is averaged per supervoxel (SLIC, ``n_segments > 0`` or given ``segments``), as in training.

Options: ``generator`` (the module) and ``generator_variables`` (``{"params": ...}``), both
required; ``protocols.relevance.load_generator(workdir)`` returns them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lclsc_jax.explain.core import Explainer
from lclsc_jax.explain.perturbation import slic_segments
from lclsc_jax.method.relevance import pool_to_segments


def prepare_generator(x: jax.Array, opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Host-side options: ``(static {generator, num_segments}, dynamic {generator_variables, segments?})``.

    ``ValueError`` when the generator or its variables are missing, or ``segments`` do not match
    ``x (B, *S, C)``; SLIC supervoxels are computed here when ``n_segments > 0`` and no ``segments``.
    """
    opts = dict(opts)
    generator, variables = opts.pop("generator"), opts.pop("generator_variables")
    segments, n_seg = opts.pop("segments"), int(opts.pop("n_segments"))
    compactness, sigma = opts.pop("compactness"), opts.pop("slic_sigma")
    if generator is None or variables is None:
        raise ValueError("perturbation_generator needs generator= and generator_variables= (a trained generator: "
                         "protocols.relevance.load_generator(workdir)); train one with `lclsc relevance train`")
    dynamic: dict[str, Any] = {"generator_variables": variables}
    static = {**opts, "generator": generator, "num_segments": 0}
    if segments is None and n_seg > 0:
        try:
            host = np.asarray(x)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            raise ValueError("perturbation_generator with n_segments under jit needs precomputed segments=") from None
        segments = slic_segments(host, n_seg, compactness, sigma)
    if segments is not None:
        seg = np.asarray(segments)
        if seg.shape != tuple(x.shape[:-1]) or not np.issubdtype(seg.dtype, np.integer) or seg.min() < 0:
            raise ValueError(f"segments must be non-negative integer labels of shape {tuple(x.shape[:-1])}, "
                             f"got {seg.dtype} {seg.shape}")
        static["num_segments"] = int(seg.max()) + 1
        dynamic["segments"] = jnp.asarray(seg, jnp.int32)
    return static, dynamic


def perturbation_generator(ex: Explainer, x: jax.Array, targets: jax.Array | None, generator: Any,
                           generator_variables: Any, num_segments: int = 0,
                           segments: jax.Array | None = None) -> jax.Array:
    """The generator's mask ``(B, *S)`` in [0, 1] for inputs ``x (B, *S, C)``; ``ex`` and ``targets`` are unused.

    ``segments (B, *S)`` int labels in ``[0, num_segments)``: the mask is averaged per segment.
    """
    del ex, targets  # one forward pass of the generator; the classifier is not needed
    m = generator.apply(generator_variables, x.astype(jnp.float32))[..., 0]
    return m if segments is None else pool_to_segments(m, segments, num_segments)
