"""The device's matmul speed, measured: python -m spcl_jax.bench matmul --config=configs/vitb512.py

A square bf16 matmul (8192^3 by default) jitted and timed like the train step: the FLOP/s this
device really reaches on dense matrix work, a better yardstick than the datasheet peak. Divided
by the config's analytic training FLOPs per image (metrics.train_flops_per_image) it gives the
images/s a step made of nothing but such matmuls would reach: the limit the train step's
images/s is compared against. Prints a line and one JSON line.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

_FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", "configs/vitb512.py",
                                "Config whose FLOPs per training image set the images/s limit.",
                                flag_values=_FLAGS)
flags.DEFINE_integer("size", 8192, "M = N = K of the matmul.", flag_values=_FLAGS)
flags.DEFINE_string("dtype", "bfloat16", "Operand dtype.", flag_values=_FLAGS)
flags.DEFINE_integer("steps", 10, "Timed matmuls.", flag_values=_FLAGS)
flags.DEFINE_integer("warmup_steps", 3, "Untimed matmuls after compilation.", flag_values=_FLAGS)


def time_matmul(size: int, dtype: str, steps: int, warmup_steps: int) -> float:
  """Seconds per (size x size) @ (size x size) product, after compile and warm-up."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
  # Random operands: zeros run measurably faster on GPUs (less switching power, higher clocks).
  from spcl_jax.bench.train import time_steps  # pylint: disable=g-import-not-at-top
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=x.dtype))
  # timed like the train step: compile, warm-up, then `steps` back to back
  _, seconds, _ = time_steps(lambda _: matmul(a, b), jax.block_until_ready, warmup_steps, steps)
  return seconds


def main(argv: list[str]) -> int:
  """argv: the arguments after `matmul`."""
  _FLAGS(["python -m spcl_jax.bench matmul", *argv])
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics  # pylint: disable=g-import-not-at-top

  config, size = _FLAGS.config, _FLAGS.size
  if size <= 0 or _FLAGS.steps <= 0:
    raise ValueError(f"--size={size} and --steps={_FLAGS.steps} must be positive")
  seconds = time_matmul(size, _FLAGS.dtype, _FLAGS.steps, _FLAGS.warmup_steps)
  flops_per_s = 2.0 * size ** 3 / seconds
  per_image = metrics.train_flops_per_image(config)
  limit = flops_per_s / per_image
  device = jax.devices()[0].device_kind
  print(f"matmul {size}^3 {_FLAGS.dtype} on {device}: {seconds * 1e3:.2f} ms, "
        f"{flops_per_s / 1e12:.1f} TFLOP/s; at {per_image / 1e9:.1f} GFLOP per training image "
        f"({config.model.variant} @ {config.model.image_size}, mask {config.spcl.mask_ratio}) "
        f"a step of such matmuls would reach {limit:.0f} images/s per device", flush=True)
  print(json.dumps({"variant": "matmul", "device": device, "size": size, "dtype": _FLAGS.dtype,
                    "ms": seconds * 1e3, "tflops_per_s": flops_per_s / 1e12,
                    "gflop_per_image": per_image / 1e9, "images_per_s_limit": limit}),
        flush=True)
  return 0
