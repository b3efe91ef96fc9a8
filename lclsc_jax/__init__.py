"""lclsc_jax: interpretable classification of endomicroscopy images with LCL-SC in JAX/Flax."""

__version__ = "0.1.0"
