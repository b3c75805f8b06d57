"""The one pixel normalisation, shared by the train step, feature extraction and export tests.

Images travel as uint8 and are normalised on the device: x = (u8 / 255 - mean) / std.
"""

import jax
import jax.numpy as jnp


def normalize_uint8(images: jax.Array, mean: float, std: float) -> jax.Array:
  """uint8 pixels -> float32 (x / 255 - mean) / std, the pre-training normalisation."""
  return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std
