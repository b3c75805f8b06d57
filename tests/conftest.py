"""Test set-up: 8 virtual CPU devices (for the sharding tests) before JAX is imported."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax  # noqa: E402

# Parity tests compare float32 results; keep XLA:CPU matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def xla_compilation_cache(tmp_path_factory):
  """XLA's persistent compilation cache in a fresh folder for one module (opt in with
  `pytestmark = pytest.mark.usefixtures("xla_compilation_cache")`): a module whose runs rebuild
  identical steps (resumes, several seeds) compiles each program once."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for name, value in before.items():
    jax.config.update(name, value)
