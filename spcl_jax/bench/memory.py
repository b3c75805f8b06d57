"""Device memory of the compiled train step, from XLA's memory analysis (no step is run).

The step is lowered on abstract inputs (shapes and shardings only), so the figures for a
batch that would not fit, or for an accelerator this machine does not have, cost one compile
and no memory. Per device: arguments (state, images) + outputs + temporaries - the donated
buffers the outputs reuse. On CPU this is an estimate: XLA:CPU schedules and fuses differently
from the GPU and TPU compilers, so expect the accelerator's own figure to differ.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from spcl_jax import sharding, steps


@dataclasses.dataclass(frozen=True)
class StepMemory:
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  platform: str

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def is_estimate(self) -> bool:
    return self.platform == "cpu"


def compiled_memory(compiled: jax.stages.Compiled, platform: str) -> StepMemory:
  stats = compiled.memory_analysis()
  return StepMemory(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                    aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                    platform=platform)


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> jax.stages.Compiled:
  """The jitted train step for `config`, compiled on abstract state and images."""
  training = steps.build_training(config, mesh)
  size = config.model.image_size
  images = jax.ShapeDtypeStruct((config.batch_size, size, size), np.uint8,
                                sharding=sharding.batch_sharding(mesh, config, 3))
  key = jax.eval_shape(lambda: jax.random.key(0))
  return training.train_step.lower(training.abstract_state, images, key).compile()


def train_step_memory(config: ml_collections.ConfigDict, mesh: Mesh) -> StepMemory:
  return compiled_memory(compile_train_step(config, mesh), mesh.devices.flat[0].platform)


def with_batch(config: ml_collections.ConfigDict, *, batch_size: int | None = None,
               grad_accum_steps: int | None = None) -> ml_collections.ConfigDict:
  out = config.copy_and_resolve_references()
  if batch_size is not None:
    out.batch_size = batch_size
  if grad_accum_steps is not None:
    out.grad_accum_steps = grad_accum_steps
  return out


def largest_batch_per_device(config: ml_collections.ConfigDict, mesh: Mesh, budget_bytes: float,
                             log=print) -> tuple[int, StepMemory] | None:
  """The largest per-device batch (a multiple of grad_accum_steps) whose step fits the budget.

  Memory is close to affine in the batch: two compiles give the line, a third checks the
  predicted batch, and the batch steps down (by a micro-batch per device at a time, at most a
  few compiles) until the compiled figure fits. None if even one micro-batch does not fit.
  """
  k = config.grad_accum_steps
  shards = sharding.num_batch_shards(config, mesh)

  def measure(per_device: int) -> StepMemory:
    memory = train_step_memory(with_batch(config, batch_size=per_device * shards), mesh)
    log(f"  {per_device} per device: {memory.peak / 2**30:.2f} GiB")
    return memory

  small, large = 2 * k, 8 * k
  m_small, m_large = measure(small), measure(large)
  per_image = (m_large.peak - m_small.peak) / (large - small)
  if m_small.peak > budget_bytes:
    return None if measure(k).peak > budget_bytes else (k, measure(k))
  guess = small if per_image <= 0 else int(small + (budget_bytes - m_small.peak) / per_image)
  guess = max(k, guess // k * k)
  step = max(k, guess // 100 // k * k)  # 1% per retry: the line is close, not exact
  for _ in range(8):
    memory = measure(guess)
    if memory.peak <= budget_bytes:
      return guess, memory
    guess -= step
    if guess < k:
      return None
  return None
