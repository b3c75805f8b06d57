"""Checks of a fine-tuning config before anything is built: one line naming the field."""

from __future__ import annotations

import ml_collections

from spcl_jax.configuration import COMPUTE_DTYPES
from spcl_jax.data.decode import resize_filter_names
from spcl_jax.downstream import (CHEXPERT_POLICIES, LABEL_FRACTIONS, SEGMENTATION_TASKS,
                                 SPLIT_SCHEMES, TASK_DATASETS, protocols_of)
from spcl_jax.errors import ConfigError
from spcl_jax.finetune.recipe import POOL_CHOICES
from spcl_jax.models.vit import variant_dims


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate_finetune_config(config: ml_collections.ConfigDict, *, num_batch_shards: int = 1,
                             process_count: int = 1) -> None:
  _require(config.task in TASK_DATASETS,
           f"config.task={config.task!r} must be one of {tuple(TASK_DATASETS)}")
  segmentation = config.task in SEGMENTATION_TASKS
  protocols = protocols_of(config.task)
  _require(config.get("protocol", "classification") in protocols,
           f"config.protocol={config.get('protocol')!r} must be one of {protocols} for "
           f"config.task={config.task!r}")
  if segmentation:
    # Scoring compares the replicated predictions with this process's block of masks only.
    _require(process_count == 1, f"config.task='siim': segmentation runs on one process, not "
             f"{process_count} (its Dice reads this process's masks only)")
    _require(not config.get("classes", ""),
             f"config.classes={config.get('classes')!r}: segmentation has one class; leave it ''")
    _require(config.split_scheme != "official",
             "config.split_scheme='official': SIIM has no official labelled test set; use 'paper'")
    for field in ("bce_weight", "dice_weight"):
      _require(config.loss[field] >= 0, f"config.loss.{field}={config.loss[field]!r} must be >= 0")
    _require(config.loss.bce_weight + config.loss.dice_weight > 0,
             "config.loss.bce_weight + config.loss.dice_weight must be > 0")
  _require(not (config.get("protocol") == "classification"
                and config.optim.get("freeze_encoder", False)),
           "config.optim.freeze_encoder=True with config.protocol='classification' (full "
           "fine-tuning): use config.protocol='linear' for a frozen encoder")
  _validate_low_label(config)
  _require(config.label_fraction in LABEL_FRACTIONS,
           f"config.label_fraction={config.label_fraction!r} must be one of {LABEL_FRACTIONS}")
  _require(config.split_scheme in SPLIT_SCHEMES,
           f"config.split_scheme={config.split_scheme!r} must be one of {SPLIT_SCHEMES}")
  _require(not (config.task == "rsna" and config.split_scheme == "official"),
           "config.split_scheme='official': RSNA has no official labelled test set; use 'paper'")
  _require(config.chexpert_policy in CHEXPERT_POLICIES,
           f"config.chexpert_policy={config.chexpert_policy!r} must be one of "
           f"{CHEXPERT_POLICIES}")
  for field in ("epochs", "batch_size", "val_every_epochs", "log_every_steps",
                "checkpoint_every_steps",
                "max_checkpoints_to_keep", "bootstrap_samples"):
    value = config[field]
    _require(isinstance(value, int) and value >= 1,
             f"config.{field}={value!r} must be a positive integer")
  _require(0 <= config.optim.warmup_epochs < config.epochs,
           f"config.optim.warmup_epochs={config.optim.warmup_epochs!r} must be in "
           f"[0, config.epochs={config.epochs})")
  _require(config.optim.base_learning_rate > 0 or config.optim.learning_rate > 0,
           "config.optim.base_learning_rate or config.optim.learning_rate must be > 0")
  _require(0 < config.optim.layer_decay <= 1,
           f"config.optim.layer_decay={config.optim.layer_decay!r} must be in (0, 1]")
  _require(config.optim.weight_decay >= 0,
           f"config.optim.weight_decay={config.optim.weight_decay!r} must be >= 0")
  _require(config.optim.min_learning_rate >= 0,
           f"config.optim.min_learning_rate={config.optim.min_learning_rate!r} must be >= 0")
  try:
    dims = variant_dims(config.model.variant)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(config.model.image_size % dims["patch_size"] == 0,
           f"config.model.image_size={config.model.image_size!r} must be a multiple of the "
           f"patch size {dims['patch_size']}")
  _require(config.model.channels == 1,
           f"config.model.channels={config.model.channels!r}: fine-tuning reads grayscale, so 1")
  _require(config.model.dtype in COMPUTE_DTYPES,
           f"config.model.dtype={config.model.dtype!r} must be one of {COMPUTE_DTYPES}")
  _require(config.model.pool in POOL_CHOICES,
           f"config.model.pool={config.model.pool!r} must be one of {POOL_CHOICES}")
  _require(0 <= config.model.drop_path_rate < 1,
           f"config.model.drop_path_rate={config.model.drop_path_rate!r} must be in [0, 1)")
  _require(config.data.resize_filter in resize_filter_names(),
           f"config.data.resize_filter={config.data.resize_filter!r} must be one of "
           f"{resize_filter_names()}")
  _require(0 < config.data.eval_crop_fraction <= 1,
           f"config.data.eval_crop_fraction={config.data.eval_crop_fraction!r} must be in (0, 1]")
  _require(config.data.std > 0, f"config.data.std={config.data.std!r} must be > 0")
  _require(config.batch_size % num_batch_shards == 0,
           f"config.batch_size={config.batch_size} is not divisible by the {num_batch_shards} "
           "devices it is split over")
  _require(config.batch_size % process_count == 0,
           f"config.batch_size={config.batch_size} is not divisible by the {process_count} "
           "processes")


def _validate_low_label(config: ml_collections.ConfigDict) -> None:
  rule = config.get("low_label")
  _require(rule is not None and isinstance(rule.get("enabled"), bool),
           "config.low_label.enabled must be True or False (configs/finetune/common.py)")
  for field in ("min_steps_per_epoch", "min_batch_size", "min_total_steps",
                "val_images_per_train_image"):
    value = rule.get(field)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"config.low_label.{field}={value!r} must be a positive integer")
