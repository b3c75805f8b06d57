"""Train step memory and throughput: python -m spcl_jax.bench train --config=configs/vitb512.py

First the compiled step's peak memory per device (XLA's memory analysis, no step run; on CPU an
estimate) for k = 1, 2, 4 micro-batches at the config's global batch, and with --memory_gb the
largest per-device batch that fits. Then (unless --steps=0) the real jitted step (masking, both
views, sharded loss, AdamW) on random uint8 images already on the device, so the number is the
model's, not the input pipeline's: compile time, images/s, TFLOP/s (analytic FLOPs) and MFU.
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
flags.DEFINE_list("memory_k", ["1", "2", "4"],
                  "Micro-batch counts to report the step's memory for (empty: skip).",
                  flag_values=_FLAGS)
flags.DEFINE_float("memory_gb", None,
                   "Find the largest per-device batch (at the config's grad_accum_steps) whose "
                   "step fits this many GB (10^9 bytes) per device; default: the device's own "
                   "limit if it reports one, else skipped; 0 skips.", flag_values=_FLAGS)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def report_memory(config, mesh) -> None:
  """Peak memory per device of the compiled step for each k, and the batch that fits."""
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from spcl_jax.bench import memory  # pylint: disable=g-import-not-at-top

  shards = sharding.num_batch_shards(config, mesh)
  per_device = config.batch_size // shards
  for k in (int(k) for k in _FLAGS.memory_k):
    if per_device % k:
      print(f"memory, k={k}: skipped ({per_device} per device does not split into {k})")
      continue
    figures = memory.train_step_memory(memory.with_batch(config, grad_accum_steps=k), mesh)
    label = " (XLA:CPU estimate)" if figures.is_estimate else " (XLA memory analysis)"
    print(f"memory, k={k} ({per_device // k} per micro-batch, {per_device} per device): peak "
          f"{_gib(figures.peak)} per device{label}; state+images {_gib(figures.arguments)}, "
          f"temporaries {_gib(figures.temporaries)}", flush=True)
  budget = _FLAGS.memory_gb
  if budget is not None and budget <= 0:
    return  # --memory_gb=0: no search
  if budget is None:
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    budget = limit / 1e9 if limit else None
  if budget is None:
    print("largest batch: skipped (no --memory_gb and the device reports no memory limit)")
    return
  k = config.grad_accum_steps
  print(f"largest per-device batch with k={k} within {budget:g} GB:", flush=True)
  found = memory.largest_batch_per_device(config, mesh, budget * 1e9)
  if found is None:
    print(f"  none: one micro-batch of {k} per device does not fit")
  else:
    size, figures = found
    print(f"  {size} per device ({size // k} per micro-batch), peak {_gib(figures.peak)}"
          f"{' (estimate)' if figures.is_estimate else ''}", flush=True)


def main(argv: list[str]) -> int:
  """argv: the arguments after `train` (absl wants a program name first)."""
  _FLAGS(["python -m spcl_jax.bench train", *argv])
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics, sharding, steps  # pylint: disable=g-import-not-at-top
  from spcl_jax.configuration import (  # pylint: disable=g-import-not-at-top
      resolve_batch_size, validate_config)

  config = _FLAGS.config
  mesh = sharding.make_mesh(config)
  shards = sharding.num_batch_shards(config, mesh)
  config = resolve_batch_size(config, shards)
  validate_config(config, num_batch_shards=shards, process_count=jax.process_count())
  print(f"{config.model.variant} @ {config.model.image_size}, mask {config.spcl.mask_ratio}, "
        f"global batch {config.batch_size} ({config.batch_size // shards} per device, "
        f"k={config.grad_accum_steps} {config.accumulation}), dtype {config.model.dtype}, remat "
        f"{config.model.remat}, attention '{config.model.attention_impl or 'auto'}' on "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  report_memory(config, mesh)
  if _FLAGS.steps <= 0:
    return 0
  training = steps.build_training(config, mesh)
  state = training.init_state(jax.random.key(0))
  train_step = training.train_step
  local = config.batch_size // jax.process_count()
  size = config.model.image_size
  images = np.random.default_rng(0).integers(0, 256, (local, size, size), dtype=np.uint8)
  batch = steps.global_batch(images, mesh, config)
  key = jax.random.key(1)

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
  rates = metrics.throughput(config, config.batch_size, seconds)
  mfu = f"{rates['mfu']:.1%}" if rates["mfu"] is not None else "n/a (unknown peak)"
  print(f"step {seconds * 1e3:.1f} ms | {rates['images_per_sec']:.1f} images/s | "
        f"{rates['images_per_sec'] / jax.device_count():.1f} images/s/device | "
        f"{rates['tflops_per_sec']:.2f} TFLOP/s | MFU {mfu} | loss {float(out['loss']):.4f}",
        flush=True)
  return 0
