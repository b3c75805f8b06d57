"""Config checks run before anything is built: a bad value stops the run with one line that
names the field, instead of a shape error deep inside jit minutes later."""

from __future__ import annotations

import jax
import ml_collections

from spcl_jax import evaluators, losses, masking
from spcl_jax.data.decode import resize_filter_names
from spcl_jax.data.sources import check_source_spec
from spcl_jax.errors import ConfigError
from spcl_jax.models.attention import ATTENTION_IMPLS, CUDNN_DTYPES, is_nvidia_gpu
from spcl_jax.models.vit import REMAT_POLICIES, variant_dims

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ACCUMULATION_MODES = ("cached", "plain")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_positive_ints(config: ml_collections.ConfigDict) -> None:
  for field in ("total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps",
                "max_checkpoints_to_keep"):
    value = config[field]
    _require(isinstance(value, int) and value >= 1,
             f"config.{field}={value!r} must be a positive integer")


def _check_model(config: ml_collections.ConfigDict) -> None:
  try:
    dims = variant_dims(config.model.variant)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  size = config.model.image_size
  _require(isinstance(size, int) and size > 0 and size % dims["patch_size"] == 0,
           f"config.model.image_size={size!r} must be a positive multiple of the patch size "
           f"{dims['patch_size']}")
  _require(config.model.channels == 1,
           f"config.model.channels={config.model.channels!r}: pre-training reads grayscale "
           "images, so 1 (export can write 3-channel weights)")
  _require(config.model.dtype in COMPUTE_DTYPES,
           f"config.model.dtype={config.model.dtype!r} must be one of {COMPUTE_DTYPES}")
  _require(config.model.attention_impl in ATTENTION_IMPLS,
           f"config.model.attention_impl={config.model.attention_impl!r} must be one of "
           f"{', '.join(ATTENTION_IMPLS)}")
  if config.model.attention_impl == "cudnn":
    device = jax.devices()[0]
    _require(is_nvidia_gpu(device),
             f"config.model.attention_impl='cudnn' needs an NVIDIA GPU, this job runs on "
             f"{device.platform} ({device.device_kind}): use 'auto'")
    _require(config.model.dtype in CUDNN_DTYPES,
             f"config.model.attention_impl='cudnn' computes in bfloat16 or float16, not "
             f"config.model.dtype={config.model.dtype!r}: use 'auto' (XLA for float32)")
  multiple = config.model.get("attention_seq_multiple", 0)
  _require(isinstance(multiple, int) and multiple >= 0,
           f"config.model.attention_seq_multiple={multiple!r} must be 0 (the kernel's own need) "
           "or a positive token multiple")
  remat = config.model.remat
  _require(remat in REMAT_POLICIES,
           f"config.model.remat={remat!r} must be one of {', '.join(REMAT_POLICIES)}")


def _check_spcl(config: ml_collections.ConfigDict) -> None:
  spcl = config.spcl
  _require(0.0 < spcl.mask_ratio < 1.0,
           f"config.spcl.mask_ratio={spcl.mask_ratio!r} must be in (0, 1)")
  num_patches = (config.model.image_size // variant_dims(config.model.variant)["patch_size"]) ** 2
  try:
    masking.view_size(num_patches, spcl.mask_ratio)
  except ValueError as e:
    raise ConfigError(f"config.spcl.mask_ratio={spcl.mask_ratio!r}: {e}") from None
  _require(spcl.similarity in losses.SIMILARITIES,
           f"config.spcl.similarity={spcl.similarity!r} must be one of "
           f"{tuple(losses.SIMILARITIES)}")
  _require(spcl.kappa > 0, f"config.spcl.kappa={spcl.kappa!r} must be > 0")
  _require(spcl.init_temperature > 0,
           f"config.spcl.init_temperature={spcl.init_temperature!r} must be > 0")
  _require(spcl.max_scale >= 1, f"config.spcl.max_scale={spcl.max_scale!r} must be >= 1")
  # log_s is clamped to [0, log max_scale] after every update: a start outside is moved at once.
  _require(1.0 / spcl.max_scale <= spcl.init_temperature <= 1.0,
           f"config.spcl.init_temperature={spcl.init_temperature!r} must be in "
           f"[1 / config.spcl.max_scale, 1] = [{1.0 / spcl.max_scale:g}, 1]")
  _require(spcl.negatives in losses.NEGATIVES,
           f"config.spcl.negatives={spcl.negatives!r} must be one of {losses.NEGATIVES}")


def _check_optim(config: ml_collections.ConfigDict) -> None:
  optim = config.optim
  # A negative value would silently fall back to the base rate (learning_rate > 0 selects it).
  _require(optim.learning_rate >= 0,
           f"config.optim.learning_rate={optim.learning_rate!r} must be >= 0 (0 = use "
           "config.optim.base_learning_rate)")
  _require(optim.base_learning_rate >= 0,
           f"config.optim.base_learning_rate={optim.base_learning_rate!r} must be >= 0")
  _require(optim.base_learning_rate > 0 or optim.learning_rate > 0,
           "config.optim.base_learning_rate or config.optim.learning_rate must be > 0")
  _require(0.0 <= optim.warmup_fraction < 1.0,
           f"config.optim.warmup_fraction={optim.warmup_fraction!r} must be in [0, 1)")
  _require(0.0 <= optim.b1 < 1.0 and 0.0 <= optim.b2 < 1.0,
           "config.optim.b1 and config.optim.b2 must be in [0, 1)")
  _require(optim.weight_decay >= 0,
           f"config.optim.weight_decay={optim.weight_decay!r} must be >= 0")
  _require(optim.grad_clip_norm >= 0,
           f"config.optim.grad_clip_norm={optim.grad_clip_norm!r} must be >= 0 (0 = off)")


def _check_data(config: ml_collections.ConfigDict) -> None:
  data = config.data
  try:
    check_source_spec(data.source)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(data.std > 0, f"config.data.std={data.std!r} must be > 0")
  _require(data.resize_filter in resize_filter_names(),
           f"config.data.resize_filter={data.resize_filter!r} must be one of "
           f"{resize_filter_names()}")
  _require(data.num_workers >= 0, f"config.data.num_workers={data.num_workers!r} must be >= 0")


def _check_batching(config: ml_collections.ConfigDict, num_batch_shards: int,
                    process_count: int) -> None:
  _require(config.accumulation in ACCUMULATION_MODES,
           f"config.accumulation={config.accumulation!r} must be one of {ACCUMULATION_MODES}")
  k = config.grad_accum_steps
  _require(isinstance(k, int) and k >= 1,
           f"config.grad_accum_steps={k!r} must be a positive integer")
  per_device = config.get("batch_size_per_device")
  _require(per_device is None or (isinstance(per_device, int) and per_device >= 1),
           f"config.batch_size_per_device={per_device!r} must be a positive integer or unset")
  _require(config.batch_size % num_batch_shards == 0,
           f"config.batch_size={config.batch_size} is not divisible by the {num_batch_shards} "
           "devices it is split over")
  # Each device splits its own block into k micro-batches: no image crosses devices.
  _require((config.batch_size // num_batch_shards) % k == 0,
           f"config.grad_accum_steps={k}: the {config.batch_size // num_batch_shards} images "
           f"per device (config.batch_size={config.batch_size} over {num_batch_shards} "
           f"devices) do not split into {k} equal micro-batches")
  _require(config.batch_size % process_count == 0,
           f"config.batch_size={config.batch_size} is not divisible by the {process_count} "
           "processes")
  _require(config.batch_size >= 2,
           f"config.batch_size={config.batch_size}: a contrastive batch needs >= 2 images")


def _check_evals(config: ml_collections.ConfigDict) -> None:
  evaluators.check_eval_configs(config.get("evals") or ml_collections.ConfigDict())


def resolve_batch_size(config: ml_collections.ConfigDict,
                       num_batch_shards: int) -> ml_collections.ConfigDict:
  """A copy with batch_size = batch_size_per_device x devices when the former is set.

  Called once the device count is known (after jax.distributed.initialize): a config written
  for one GPU then scales its global batch, and its learning rate, with the job.
  """
  per_device = config.get("batch_size_per_device")
  if per_device is None:
    return config
  _require(isinstance(per_device, int) and per_device >= 1,
           f"config.batch_size_per_device={per_device!r} must be a positive integer or unset")
  resolved = config.copy_and_resolve_references()
  resolved.batch_size = per_device * num_batch_shards
  return resolved


def validate_config(config: ml_collections.ConfigDict, *, num_batch_shards: int = 1,
                    process_count: int = 1) -> None:
  """Raises ConfigError naming the first bad field."""
  _check_positive_ints(config)
  _check_model(config)
  _check_spcl(config)
  _check_optim(config)
  _check_data(config)
  _check_batching(config, num_batch_shards, process_count)
  _check_evals(config)
