"""Train step memory and throughput: python -m spcl_jax.bench train --config=configs/vitb512.py

First the compiled step's peak memory per device (XLA's memory analysis, no step run; on CPU an
estimate) for k = 1, 2, 4 micro-batches at the config's global batch, and with --memory_gb the
largest per-device batch that fits. Then (unless --steps=0) the real jitted step (masking, both
views, sharded loss, AdamW) on random uint8 images already on the device, so the number is the
model's, not the input pipeline's: compile time, images/s, TFLOP/s (analytic FLOPs) and MFU,
and one JSON line with those figures.

--reference torch then times, in the same process on the same device, the S-PCL step written in
PyTorch from timm blocks (torch_reference.py), eager and under torch.compile, from the same
weights with the same batch, dtype and warm-up/step counts, one JSON line each with
`jax_over_torch`. torch is imported only then.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

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
flags.DEFINE_enum("reference", "none", ["none", "torch"],
                  "torch: also time the PyTorch reference step (eager and torch.compile) in "
                  "this run on the same device.", flag_values=_FLAGS)
flags.DEFINE_string("torch_compile_backend", "inductor",
                    "torch.compile backend of the reference ('aot_eager': traced, no generated "
                    "kernels; compiles in seconds on CPU).", flag_values=_FLAGS)
flags.DEFINE_string("torch_compile_mode", None,
                    "torch.compile mode of the reference with inductor (e.g. max-autotune); "
                    "default: torch's.", flag_values=_FLAGS)
flags.DEFINE_string("profile_dir", None,
                    "After the timed steps, trace --profile_steps more with jax.profiler into "
                    "this folder (Perfetto + XPlane); `python -m spcl_jax.bench profile DIR` "
                    "then says where the time went.", flag_values=_FLAGS)
flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.", flag_values=_FLAGS)


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


def torch_device_for(platform: str) -> str:
  """The torch device on the accelerator JAX runs on; a clear error where torch has none."""
  if platform == "cpu":
    return "cpu"
  if platform == "gpu":
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      raise SystemExit("error: --reference torch: JAX runs on a GPU but torch sees no CUDA "
                       "device (a CPU-only torch build?)")
    return "cuda"
  raise SystemExit(f"error: --reference torch runs on CPUs and NVIDIA GPUs, not on {platform}")


def time_steps(run_step, sync, warmup_steps: int, timed_steps: int
               ) -> tuple[float, float, Any]:
  """(compile + first step seconds, seconds per timed step, last output) of run_step(i)."""
  start = time.perf_counter()
  out = run_step(0)
  sync(out)
  compile_seconds = time.perf_counter() - start
  for i in range(warmup_steps):
    out = run_step(1 + i)
  sync(out)
  start = time.perf_counter()
  for i in range(timed_steps):
    out = run_step(1 + warmup_steps + i)
  sync(out)
  return compile_seconds, (time.perf_counter() - start) / timed_steps, out


def print_record(record: dict[str, Any]) -> None:
  """One JSON line per variant: what scripts parse (rounded for reading; the rates to 0.1)."""
  rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
  print(json.dumps(rounded), flush=True)


def run_torch_reference(config, start_params, images: np.ndarray, platform: str,
                        jax_rate: float, learning_rates: np.ndarray) -> None:
  """Times the PyTorch step eager and compiled; jax_rate: ours per device (CPU: per host)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics  # pylint: disable=g-import-not-at-top
  from spcl_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  device = torch_device_for(platform)
  if config.grad_accum_steps > 1:
    print(f"torch reference: the {len(images)} images in one pass (no micro-batches; ours "
          f"k={config.grad_accum_steps})", flush=True)
  batch = torch.from_numpy(images).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  peak = metrics.peak_flops_per_device(config, jax.devices()[0])
  for variant, backend in (("torch-eager", None), ("torch-compile", _FLAGS.torch_compile_backend)):
    reference = torch_reference.TorchStep(config, device, compile_backend=backend,
                                          compile_mode=_FLAGS.torch_compile_mode,
                                          params=start_params)
    compile_seconds, seconds, loss = time_steps(
        lambda i: reference.step(batch, float(learning_rates[i])), lambda _: sync(),
        _FLAGS.warmup_steps, _FLAGS.steps)
    rate = len(images) / seconds
    flops = rate * metrics.train_flops_per_image(config)
    attention = "sdpa" if reference.encoder.blocks[0].attn.fused_attn else "math"
    print(f"{variant}: step {seconds * 1e3:.1f} ms | {rate:.1f} images/s | jax/torch "
          f"{jax_rate / rate:.2f}x | compile + first step {compile_seconds:.1f} s", flush=True)
    print_record({
        "variant": variant, "attention": attention, "remat": "none",
        "dtype": config.model.dtype, "batch": len(images), "devices": 1, "device": device_name,
        "images_per_s": rate, "step_ms": seconds * 1e3, "tflops_per_s": flops / 1e12,
        "mfu": flops / peak if peak else None, "loss": float(loss), "compile_s": compile_seconds,
        "compile": backend and f"{backend}/{_FLAGS.torch_compile_mode or 'default'}",
        "jax_over_torch": jax_rate / rate})
    del reference
    if device == "cuda":
      torch.cuda.empty_cache()  # the compiled variant starts with the eager one's memory freed


def main(argv: list[str]) -> int:
  """argv: the arguments after `train` (absl wants a program name first)."""
  _FLAGS(["python -m spcl_jax.bench train", *argv])
  with_torch = _FLAGS.reference == "torch"
  if with_torch:
    if _FLAGS.steps <= 0:
      raise SystemExit("error: --reference torch needs --steps > 0 (it compares timed steps)")
    try:
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      import timm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise SystemExit(f"error: --reference torch needs torch and timm ({e}): "
                       "pip install -e '.[torch]'") from e
    # JAX would otherwise reserve 75% of the GPU up front and leave torch too little. Set
    # before JAX starts its backend; what JAX has used stays in its pool after our steps.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics, optimizer, sharding, steps  # pylint: disable=g-import-not-at-top
  from spcl_jax.configuration import (  # pylint: disable=g-import-not-at-top
      resolve_batch_size, validate_config)

  config = _FLAGS.config
  mesh = sharding.make_mesh(config)
  shards = sharding.num_batch_shards(config, mesh)
  config = resolve_batch_size(config, shards)
  validate_config(config, num_batch_shards=shards, process_count=jax.process_count())
  platform = jax.devices()[0].platform
  if with_torch:
    torch_device_for(platform)  # fail before the long part
  print(f"{config.model.variant} @ {config.model.image_size}, mask {config.spcl.mask_ratio}, "
        f"global batch {config.batch_size} ({config.batch_size // shards} per device, "
        f"k={config.grad_accum_steps} {config.accumulation}), dtype {config.model.dtype}, remat "
        f"{config.model.remat}, attention '{config.model.attention_impl or 'auto'}' on "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  report_memory(config, mesh)
  if _FLAGS.steps <= 0:
    return 0
  training = steps.build_training(config, mesh)
  model = training.model
  print(f"attention kernel: {model.attention_impl}"
        + (f", tokens padded to a multiple of {model.seq_multiple}" if model.seq_multiple > 1
           else ""), flush=True)
  state = training.init_state(jax.random.key(0))
  start_params = jax.device_get(state.params) if with_torch else None  # state is donated
  train_step = training.train_step
  local = config.batch_size // jax.process_count()
  size = config.model.image_size
  images = np.random.default_rng(0).integers(0, 256, (local, size, size), dtype=np.uint8)
  batch = steps.global_batch(images, mesh, config)
  key = jax.random.key(1)

  def run_step(i):
    nonlocal state
    state, out = train_step(state, batch, jax.random.fold_in(key, i))
    return out

  compile_seconds, seconds, out = time_steps(run_step, jax.block_until_ready,
                                             _FLAGS.warmup_steps, _FLAGS.steps)
  print(f"compile + first step: {compile_seconds:.1f} s", flush=True)
  if _FLAGS.profile_dir:  # after the timing, so tracing never slows the figures
    first = 1 + _FLAGS.warmup_steps + _FLAGS.steps
    with jax.profiler.trace(_FLAGS.profile_dir, create_perfetto_trace=True):
      for i in range(_FLAGS.profile_steps):
        out = run_step(first + i)
      jax.block_until_ready(out)
    print(f"profile of {_FLAGS.profile_steps} steps: python -m spcl_jax.bench profile "
          f"{_FLAGS.profile_dir} --steps {_FLAGS.profile_steps}", flush=True)
  rates = metrics.throughput(config, config.batch_size, seconds)
  per_device = rates["images_per_sec"] / jax.device_count()
  mfu = f"{rates['mfu']:.1%}" if rates["mfu"] is not None else "n/a (unknown peak)"
  print(f"step {seconds * 1e3:.1f} ms | {rates['images_per_sec']:.1f} images/s | "
        f"{per_device:.1f} images/s/device | "
        f"{rates['tflops_per_sec']:.2f} TFLOP/s | MFU {mfu} | loss {float(out['loss']):.4f}",
        flush=True)
  print_record({
      # the kernel that ran ('auto' resolved) and the length its tokens were padded to
      "variant": "jax", "attention": model.attention_impl,
      "seq_multiple": model.seq_multiple, "remat": str(config.model.remat),
      "dtype": config.model.dtype, "batch": config.batch_size,
      "devices": jax.device_count(), "device": jax.devices()[0].device_kind,
      "images_per_s": rates["images_per_sec"], "images_per_s_per_device": per_device,
      "step_ms": seconds * 1e3, "tflops_per_s": rates["tflops_per_sec"], "mfu": rates["mfu"],
      "loss": float(out["loss"]), "compile_s": compile_seconds})
  if not with_torch:
    return 0
  # One accelerator against one: torch gets one device's share of the batch. XLA's CPU
  # "devices" are slices of the same host, so on CPU torch runs the whole batch.
  on_cpu = platform == "cpu"
  torch_images = images if on_cpu else images[:config.batch_size // jax.device_count()]
  total_steps = 1 + _FLAGS.warmup_steps + _FLAGS.steps
  learning_rates = np.asarray(optimizer.learning_rate_schedule(config)(np.arange(total_steps)))
  del state, batch, out  # their memory back to JAX's pool before torch allocates
  run_torch_reference(config, start_params, torch_images, platform,
                      rates["images_per_sec"] if on_cpu else per_device, learning_rates)
  return 0
