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
                             log=print, max_compiles: int = 10
                             ) -> tuple[int, StepMemory] | None:
  """The largest per-device batch (a multiple of grad_accum_steps) whose step fits the budget.

  Memory is close to affine in the batch, not exactly (XLA picks other fusions and layouts at
  other sizes): a secant search on compiled figures, keeping the largest batch that fit and
  the smallest that did not, until they are one micro-batch apart. None if even k images per
  device (one per micro-batch) do not fit.
  """
  k = config.grad_accum_steps
  shards = sharding.num_batch_shards(config, mesh)

  def measure(per_device: int) -> StepMemory:
    memory = train_step_memory(with_batch(config, batch_size=per_device * shards), mesh)
    log(f"  {per_device} per device: {memory.peak / 2**30:.2f} GiB")
    return memory

  points: list[tuple[int, StepMemory]] = []
  fits: tuple[int, StepMemory] | None = None
  too_big: int | None = None

  def record(per_device: int) -> None:
    nonlocal fits, too_big
    memory = measure(per_device)
    points.append((per_device, memory))
    if memory.peak <= budget_bytes:
      if fits is None or per_device > fits[0]:
        fits = (per_device, memory)
    elif too_big is None or per_device < too_big:
      too_big = per_device

  record(k)
  if fits is None:
    return None
  record(8 * k)
  while len(points) < max_compiles and (too_big is None or too_big - fits[0] > k):
    (b0, m0), (b1, m1) = points[-2], points[-1]
    slope = (m1.peak - m0.peak) / (b1 - b0) if b1 != b0 else 0.0
    guess = 2 * b1 if slope <= 0 else int(b1 + (budget_bytes - m1.peak) / slope)
    guess = max(guess // k * k, fits[0] + k)
    if too_big is not None:
      guess = min(guess, too_big - k)
    record(guess)
  return fits
