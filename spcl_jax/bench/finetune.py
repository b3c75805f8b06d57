"""Fine-tuning step throughput:
python -m spcl_jax.bench finetune --config=configs/finetune/nih14.py [--steps=N] [--classes=K]

Runs the real jitted fine-tuning step (classifier with drop path, BCE, LLRD AdamW) on random
uint8 images and labels already on the device, so the number is the model's, not the input
pipeline's. Prints compile time, then images/s, TFLOP/s (analytic FLOPs) and MFU.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags
from ml_collections import config_flags

_FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", "configs/finetune/nih14.py", "Config file.",
                                flag_values=_FLAGS)
flags.DEFINE_integer("steps", 20, "Timed steps.", flag_values=_FLAGS)
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation.", flag_values=_FLAGS)
flags.DEFINE_integer("classes", 14, "Outputs of the head (14 ChestX-ray14, 5 CheXpert, 1 RSNA).",
                     flag_values=_FLAGS)


def main(argv: list[str]) -> int:
  """argv: the arguments after `finetune` (absl wants a program name first)."""
  _FLAGS(["python -m spcl_jax.bench finetune", *argv])
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics, sharding, steps  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune.configuration import validate_finetune_config  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune.steps import build_finetuning  # pylint: disable=g-import-not-at-top
  from spcl_jax.finetune.trainer import finetune_flops_per_image  # pylint: disable=g-import-not-at-top

  from spcl_jax.finetune.recipe import resolve_pool  # pylint: disable=g-import-not-at-top

  config = _FLAGS.config
  config.model.pool = resolve_pool(config.model.pool, "random")  # no init is read here
  mesh = sharding.make_mesh(config)
  validate_finetune_config(config, num_batch_shards=sharding.num_batch_shards(config, mesh),
                           process_count=jax.process_count())
  # The schedule's length does not change the step's cost; 1000 steps/epoch keeps lr > 0.
  ft = build_finetuning(config, mesh, _FLAGS.classes, steps_per_epoch=1000)
  state = ft.init_state(jax.random.key(0))
  local = config.batch_size // jax.process_count()
  size = config.model.image_size
  rng = np.random.default_rng(0)
  images = steps.global_batch(rng.integers(0, 256, (local, size, size), dtype=np.uint8), mesh,
                              config)
  labels = steps.global_batch(rng.integers(0, 2, (local, _FLAGS.classes)).astype(np.float32),
                              mesh, config)
  key = jax.random.key(1)
  print(f"fine-tuning {config.model.variant} @ {size}, pool {config.model.pool}, drop path "
        f"{config.model.drop_path_rate}, batch {config.batch_size}, {_FLAGS.classes} classes, "
        f"dtype {config.model.dtype} on {jax.device_count()} x {jax.devices()[0].device_kind}",
        flush=True)
  start = time.perf_counter()
  state, out = ft.train_step(state, images, labels, key)
  jax.block_until_ready(out)
  print(f"compile + first step: {time.perf_counter() - start:.1f} s", flush=True)
  for i in range(_FLAGS.warmup_steps):
    state, out = ft.train_step(state, images, labels, jax.random.fold_in(key, i + 1))
  jax.block_until_ready(out)
  start = time.perf_counter()
  for i in range(_FLAGS.steps):
    state, out = ft.train_step(state, images, labels, jax.random.fold_in(key, i + 100))
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / _FLAGS.steps
  images_per_sec = config.batch_size / seconds
  flops = finetune_flops_per_image(config) * images_per_sec
  peak = metrics.peak_flops_per_device(config, jax.devices()[0])
  mfu = f"{flops / (peak * jax.device_count()):.1%}" if peak else "n/a (unknown peak)"
  print(f"step {seconds * 1e3:.1f} ms | {images_per_sec:.1f} images/s | "
        f"{images_per_sec / jax.device_count():.1f} images/s/device | "
        f"{flops / 1e12:.2f} TFLOP/s | MFU {mfu} | loss {float(out['loss']):.4f}", flush=True)
  return 0
