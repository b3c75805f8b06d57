"""Where scaling stops: python -m spcl_jax.bench scaling [--config=configs/vitb512.py] [--check]

A model of one data-parallel train step (parameters replicated, sharding.fsdp = 1) on n
accelerators, per device:
  compute      the ViT on the device's batch: batch / (images/s per device)
  loss         the T-SP logits of the device's 2b rows against all 2B = 2nb embeddings, float32
               at full precision: 3 matmuls (forward, two in backward) of 2 (2b)(2B) D FLOPs.
               It grows with n: with every negative kept, it is what stops scaling first.
  gradients    one all-reduce of the float32 gradients (P parameters x 4 bytes) per step, also
               with k micro-batches (cached accumulation reduces once, after the last one)
  embeddings   the loss's all-gather of the normalised z of both views (2 B D x 4 bytes) and
               its transpose, a reduce-scatter of as many bytes, in the backward pass
Collectives use ring algorithms, hierarchical over nodes: inside a node at the NVLink (or ICI)
bandwidth, across nodes each device's share at its NIC's bandwidth. Nothing overlaps (the
gradient all-reduce comes after the last micro-batch's backward; the loss sits between the two
passes), so the step time is the sum; efficiency = step time on 1 device / step time on n.

--check compiles the real train step on 8 CPU devices and compares the bytes modelled for each
collective with the collectives XLA put in the compiled program (spcl_jax/bench/collectives.py).
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import flags
from ml_collections import config_flags

_FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", "configs/vitb512.py", "Config file (model, batch, k).",
                                flag_values=_FLAGS)
flags.DEFINE_list("devices", ["8", "64", "256", "1024"], "Accelerator counts.", flag_values=_FLAGS)
flags.DEFINE_integer("batch_per_device", 0, "Images per device and step (all micro-batches); "
                     "0: config.batch_size_per_device, else config.batch_size.",
                     flag_values=_FLAGS)
flags.DEFINE_float("images_per_sec_per_device", 0.0,
                   "Measured train images/s of one device (python -m spcl_jax.bench train); 0: "
                   "analytic FLOPs at --mfu of the fabric's peak.", flag_values=_FLAGS)
flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation when images/s is not given.",
                   flag_values=_FLAGS)
flags.DEFINE_list("fabric", ["h100", "tpu_v5p"], "Interconnects to tabulate (FABRICS).",
                  flag_values=_FLAGS)
flags.DEFINE_float("intra_gbs", 0.0, "Override: GB/s per device and direction inside a node.",
                   flag_values=_FLAGS)
flags.DEFINE_float("inter_gbs", 0.0, "Override: GB/s per device and direction across nodes.",
                   flag_values=_FLAGS)
flags.DEFINE_bool("check", False, "Check the modelled bytes against the compiled step's "
                  "collectives on 8 CPU devices (a small model of the config's structure).",
                  flag_values=_FLAGS)


@dataclasses.dataclass(frozen=True)
class Fabric:
  name: str
  devices_per_node: int   # the fast domain (NVLink node, or the whole ICI slice)
  intra_gbs: float        # GB/s per device and direction inside the domain
  inter_gbs: float        # GB/s per device and direction between domains
  peak_tflops: float      # dense bf16, for the analytic images/s
  loss_tflops: float      # float32 matmuls at full precision (the loss)
  source: str


FABRICS = {
    # NVLink 4: 900 GB/s bidirectional per H100 SXM GPU (nvidia.com/en-us/data-center/h100);
    # DGX H100: one 400 Gb/s ConnectX-7 (NDR InfiniBand) per GPU (docs.nvidia.com/dgx/
    # dgxh100-user-guide/introduction-to-dgxh100.html). FP32 (non-tensor-core) 67 TFLOP/s and
    # dense BF16 989 TFLOP/s: the H100 SXM datasheet.
    "h100": Fabric("H100 SXM, NVLink 4 + NDR InfiniBand", 8, 450.0, 50.0, 989.0, 67.0,
                   "NVLink 900 GB/s bidir (nvidia.com/en-us/data-center/h100); 400 Gb/s NDR "
                   "per GPU (DGX H100 user guide)"),
    # TPU v5p: 1200 GB/s bidirectional ICI per chip, 3D torus, 459 TFLOP/s BF16
    # (cloud.google.com/tpu/docs/v5p). One slice is one ICI domain (up to 6144 chips).
    # Full-precision float32 matmuls run as 6 bf16 passes on the MXU: 459 / 6.
    "tpu_v5p": Fabric("TPU v5p, ICI 3D torus", 1 << 30, 600.0, 600.0, 459.0, 459.0 / 6,
                      "ICI 1200 GB/s bidir per chip (cloud.google.com/tpu/docs/v5p)"),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What the step moves and computes, from the config."""
  num_params: int
  width: int
  flops_per_image: float   # ViT forward + backward (+ the re-run forward of cached k > 1)


def model_shape(config) -> ModelShape:
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax import metrics, optimizer, steps  # pylint: disable=g-import-not-at-top
  from spcl_jax.models.vit import build_encoder, variant_dims  # pylint: disable=g-import-not-at-top

  model = build_encoder(config.model)
  abstract, _ = _abstract_state(model, optimizer.make_optimizer(config), config)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  flops = metrics.train_flops_per_image(config)
  if config.grad_accum_steps > 1 and config.accumulation == "cached":
    flops *= 4 / 3  # forward, backward (2 forwards' worth), and the forward again
  del steps
  return ModelShape(num_params, variant_dims(config.model.variant)["width"], flops)


def _abstract_state(model, tx, config):
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spcl_jax import steps  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  return steps.state_shardings(model, tx, mesh, config)


def payload_bytes(shape: ModelShape, num_devices: int, batch_per_device: int) -> dict[str, int]:
  """Per device and step, by collective kind (what collectives.bytes_by_kind reports)."""
  global_batch = num_devices * batch_per_device
  embeddings = 2 * global_batch * shape.width * 4  # z1 and z2, float32
  return {"all-reduce": shape.num_params * 4, "all-gather": embeddings,
          "reduce-scatter": embeddings, "all-to-all": 0, "collective-permute": 0}


def _ring_seconds(payload: float, n: int, fabric: Fabric, passes: int) -> float:
  """passes = 2 for an all-reduce (reduce-scatter + all-gather), 1 for either half alone."""
  if n <= 1:
    return 0.0
  g = min(n, fabric.devices_per_node)
  nodes = math.ceil(n / g)
  seconds = passes * (g - 1) / g * payload / (fabric.intra_gbs * 1e9)
  if nodes > 1:  # each device carries its 1/g share of the payload across nodes
    seconds += passes * (nodes - 1) / nodes * (payload / g) / (fabric.inter_gbs * 1e9)
  return seconds


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  devices: int
  compute_s: float
  loss_s: float
  gradient_s: float
  embedding_s: float
  logits_gib: float
  efficiency: float

  @property
  def step_s(self) -> float:
    return self.compute_s + self.loss_s + self.gradient_s + self.embedding_s


def estimate(shape: ModelShape, fabric: Fabric, num_devices: int, batch_per_device: int,
             images_per_sec: float) -> StepEstimate:
  b, big_b = batch_per_device, num_devices * batch_per_device

  def loss_seconds(global_batch):
    return 3 * 2 * (2 * b) * (2 * global_batch) * shape.width / (fabric.loss_tflops * 1e12)

  compute = b / images_per_sec
  payloads = payload_bytes(shape, num_devices, b)
  gradients = _ring_seconds(payloads["all-reduce"], num_devices, fabric, passes=2)
  embeddings = (_ring_seconds(payloads["all-gather"], num_devices, fabric, passes=1)
                + _ring_seconds(payloads["reduce-scatter"], num_devices, fabric, passes=1))
  single = compute + loss_seconds(b)
  step = compute + loss_seconds(big_b) + gradients + embeddings
  return StepEstimate(num_devices, compute, loss_seconds(big_b), gradients, embeddings,
                      (2 * b) * (2 * big_b) * 4 / 2**30, single / step)


def format_table(shape: ModelShape, fabric: Fabric, devices: list[int], batch_per_device: int,
                 images_per_sec: float) -> str:
  rows = [f"{fabric.name}: {batch_per_device} images per device, {images_per_sec:.0f} images/s "
          f"per device, {fabric.intra_gbs:g} GB/s in a node, {fabric.inter_gbs:g} GB/s across "
          f"({fabric.source})",
          "| devices | global batch | compute s | loss s | grad all-reduce s | z gather s | "
          "step s | logits GiB/device | efficiency |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for n in devices:
    e = estimate(shape, fabric, n, batch_per_device, images_per_sec)
    rows.append(f"| {n} | {n * batch_per_device} | {e.compute_s:.3f} | {e.loss_s:.3f} | "
                f"{e.gradient_s:.4f} | {e.embedding_s:.4f} | {e.step_s:.3f} | "
                f"{e.logits_gib:.2f} | {e.efficiency:.1%} |")
  return "\n".join(rows)


def check_collectives(config, mesh, compiled=None) -> list[tuple[str, int, int]]:
  """(kind, modelled bytes, compiled bytes) per collective kind of the compiled train step.

  `compiled`: the step already compiled for (config, mesh), to save a compile.
  """
  from spcl_jax import sharding  # pylint: disable=g-import-not-at-top
  from spcl_jax.bench import collectives, memory  # pylint: disable=g-import-not-at-top

  if int(mesh.shape["fsdp"]) != 1:
    raise ValueError("the scaling model covers data parallelism (config.sharding.fsdp=1)")
  compiled = compiled or memory.compile_train_step(config, mesh)
  found = collectives.bytes_by_kind(collectives.collectives(compiled.as_text()))
  n = sharding.num_batch_shards(config, mesh)
  modelled = payload_bytes(model_shape(config), n, config.batch_size // n)
  return [(kind, modelled[kind], found[kind]) for kind in collectives.KINDS]


def _check() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spcl_jax import sharding  # pylint: disable=g-import-not-at-top

  if jax.device_count() != 8:
    print(f"--check needs 8 CPU devices, found {jax.device_count()}")
    return 1
  base = _FLAGS.config
  config = demo.get_config()  # small and float32: same step structure, a fast compile
  config.model.image_size = 64
  config.batch_size, config.grad_accum_steps = 64, base.grad_accum_steps
  config.accumulation, config.spcl.negatives = base.accumulation, base.spcl.negatives
  mesh = sharding.make_mesh(config)
  print(f"compiled step on 8 CPU devices ({config.model.variant} @ 64, batch 64, "
        f"k={config.grad_accum_steps} {config.accumulation}): bytes per device and step")
  worst = 0.0
  for kind, modelled, compiled in check_collectives(config, mesh):
    error = abs(compiled - modelled) / max(modelled, 1)
    worst = max(worst, error if modelled or compiled else 0.0)
    print(f"  {kind:18s} modelled {modelled:>10d}  compiled {compiled:>10d}")
  print(f"largest relative difference {worst:.2e}" + ("" if worst < 0.01 else "  MISMATCH"))
  return 0 if worst < 0.01 else 1


def main(argv: list[str]) -> int:
  _FLAGS(["python -m spcl_jax.bench scaling", *argv])
  if _FLAGS.check:
    # Before JAX starts: 8 virtual CPU devices stand in for a node.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    os.environ["JAX_PLATFORMS"] = "cpu"
    return _check()
  config = _FLAGS.config
  batch = (_FLAGS.batch_per_device or config.get("batch_size_per_device")
           or config.batch_size)
  shape = model_shape(config)
  devices = [int(d) for d in _FLAGS.devices]
  print(f"{config.model.variant} @ {config.model.image_size}, {shape.num_params / 1e6:.1f}M "
        f"parameters, k={config.grad_accum_steps} {config.accumulation}, "
        f"{shape.flops_per_image / 1e9:.0f} GFLOP per image and step")
  for name in _FLAGS.fabric:
    if name not in FABRICS:
      print(f"--fabric={name}: unknown, expected one of {', '.join(FABRICS)}")
      return 2
    fabric = FABRICS[name]
    if _FLAGS.intra_gbs or _FLAGS.inter_gbs:
      fabric = dataclasses.replace(fabric, intra_gbs=_FLAGS.intra_gbs or fabric.intra_gbs,
                                   inter_gbs=_FLAGS.inter_gbs or fabric.inter_gbs)
    rate = _FLAGS.images_per_sec_per_device or (
        _FLAGS.mfu * fabric.peak_tflops * 1e12 / shape.flops_per_image)
    print()
    print(format_table(shape, fabric, devices, batch, rate))
  return 0
