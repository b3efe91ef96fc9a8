"""Shared test setup: 8 simulated CPU devices so sharding is tested for real, x64 off."""

import os

# Must be set before JAX initialises its backends (conftest is imported first).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
