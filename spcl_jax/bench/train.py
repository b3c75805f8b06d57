"""Train-step throughput: python -m spcl_jax.bench train --config=configs/vitb512.py [--steps=N]

Runs the real jitted step (masking, both views, sharded loss, AdamW) on random uint8 images
already on the device, so the number is the model's, not the input pipeline's. Prints compile
time, then images/s, TFLOP/s (analytic FLOPs) and MFU over the timed steps.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags
from ml_collections import config_flags

_FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", "configs/vitb512.py", "Config file.",
                                flag_values=_FLAGS)
flags.DEFINE_integer("steps", 20, "Timed steps.", flag_values=_FLAGS)
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation.", flag_values=_FLAGS)


def main(argv: list[str]) -> int:
  """argv: the arguments after `train` (absl wants a program name first)."""
  _FLAGS(["python -m spcl_jax.bench train", *argv])
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics, sharding, steps  # pylint: disable=g-import-not-at-top
  from spcl_jax.configuration import validate_config  # pylint: disable=g-import-not-at-top

  config = _FLAGS.config
  mesh = sharding.make_mesh(config)
  validate_config(config, num_batch_shards=sharding.num_batch_shards(config, mesh),
                  process_count=jax.process_count())
  training = steps.build_training(config, mesh)
  state = training.init_state(jax.random.key(0))
  train_step = training.train_step
  local = config.batch_size // jax.process_count()
  size = config.model.image_size
  images = np.random.default_rng(0).integers(0, 256, (local, size, size), dtype=np.uint8)
  batch = steps.global_batch(images, mesh, config)
  key = jax.random.key(1)

  print(f"{config.model.variant} @ {size}, mask {config.spcl.mask_ratio}, batch "
        f"{config.batch_size}, dtype {config.model.dtype}, remat {config.model.remat}, "
        f"attention '{config.model.attention_impl or 'auto'}' on {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}", flush=True)
  start = time.perf_counter()
  state, out = train_step(state, batch, key)
  jax.block_until_ready(out)
  print(f"compile + first step: {time.perf_counter() - start:.1f} s", flush=True)
  for i in range(_FLAGS.warmup_steps):
    state, out = train_step(state, batch, jax.random.fold_in(key, i + 1))
  jax.block_until_ready(out)
  start = time.perf_counter()
  for i in range(_FLAGS.steps):
    state, out = train_step(state, batch, jax.random.fold_in(key, i + 100))
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / _FLAGS.steps
  images_per_sec = config.batch_size / seconds
  flops = metrics.train_flops_per_image(config) * images_per_sec
  peak = metrics.peak_flops_per_device(config, jax.devices()[0])
  mfu = f"{flops / (peak * jax.device_count()):.1%}" if peak else "n/a (unknown peak)"
  print(f"step {seconds * 1e3:.1f} ms | {images_per_sec:.1f} images/s | "
        f"{images_per_sec / jax.device_count():.1f} images/s/device | "
        f"{flops / 1e12:.2f} TFLOP/s | MFU {mfu} | loss {float(out['loss']):.4f}", flush=True)
  return 0
