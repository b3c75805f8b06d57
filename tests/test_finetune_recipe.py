"""What fine-tuning resolves at start (`spcl_jax.finetune.recipe`): pool 'auto', the linear
protocol, and the low-label rule, which must let every Table 1 cell run with the shipped config
and only the label fraction changed, on the real split sizes."""

import importlib
import math

import numpy as np
import pytest

from spcl_jax.configuration import ConfigError
from spcl_jax.finetune import recipe
from spcl_jax.finetune.configuration import validate_finetune_config

# (config module, split scheme) -> (train images at 100 / 10 / 1 %, val images), the real
# metadata's counts (frontal views; NIH and CheXpert paper: prepare's 7:2:1 patient split).
REAL_SIZES = {
    ("nih14", "paper"): ((78_313, 7_831, 783), 22_361),
    ("nih14", "official"): ((74_647, 7_465, 746), 11_877),
    ("chexpert", "paper"): ((133_471, 13_347, 1_335), 38_279),
    ("chexpert", "official"): ((166_898, 16_690, 1_669), 24_129),
    ("rsna", "paper"): ((18_679, 1_868, 187), 5_337),
}
DEVICES = 8  # the paper's 8 GPUs: the batch must split over them
CELLS = [(task, scheme, fraction, train, val)
         for (task, scheme), (trains, val) in REAL_SIZES.items()
         for fraction, train in zip((100, 10, 1), trains)]


def shipped(task, **overrides):
  config = importlib.import_module(f"spcl_jax.configs.finetune.{task}").get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.mark.parametrize("task,scheme,fraction,train,val", CELLS)
def test_every_table1_cell_resolves_from_the_shipped_config(task, scheme, fraction, train, val):
  config = shipped(task, split_scheme=scheme, label_fraction=fraction)
  validate_finetune_config(config, num_batch_shards=DEVICES)
  rule = config.low_label
  schedule, _ = recipe.resolve(config, init_kind="spcl", num_train=train, num_val=val,
                               batch_multiple=DEVICES)
  validate_finetune_config(config, num_batch_shards=DEVICES)  # the resolved config too
  assert (config.batch_size, config.epochs, config.val_every_epochs) == (
      schedule.batch_size, schedule.epochs, schedule.val_every_epochs)
  assert rule.min_batch_size <= schedule.batch_size <= 1024
  assert schedule.batch_size % DEVICES == 0
  assert schedule.steps_per_epoch == train // schedule.batch_size
  assert schedule.steps_per_epoch >= min(rule.min_steps_per_epoch,
                                         train // rule.min_batch_size)
  assert schedule.total_steps >= rule.min_total_steps
  # val scored within the documented multiple of the train images seen, plus one last pass
  seen = schedule.total_steps * schedule.batch_size
  assert schedule.val_passes() * val <= rule.val_images_per_train_image * seen + val
  assert schedule.val_passes() >= 2  # the selection has a choice


def test_the_rule_changes_nothing_on_full_nih_and_gives_the_documented_nih_1pct():
  full = recipe.low_label_schedule(78_313, 22_361, batch_size=1024, epochs=75,
                                   rule=shipped("nih14").low_label)
  assert (full.batch_size, full.epochs, full.val_every_epochs) == (1024, 75, 1)
  one = recipe.low_label_schedule(783, 22_361, batch_size=1024, epochs=75,
                                  rule=shipped("nih14").low_label)
  # configs/finetune/common.py's comment: batch 64, 75 epochs of 12 steps, val every 8 epochs
  assert (one.batch_size, one.epochs, one.steps_per_epoch, one.val_every_epochs) == (
      64, 75, 12, 8)
  assert one.val_passes() == 10  # epochs 8, 16, ..., 72, and the last (75)


def test_rule_raises_epochs_to_the_minimum_steps_and_never_exceeds_the_configured_batch():
  rule = shipped("rsna").low_label
  tiny = recipe.low_label_schedule(40, 100, batch_size=1024, epochs=75, rule=rule)
  assert tiny.batch_size == rule.min_batch_size and tiny.steps_per_epoch == 2
  assert tiny.epochs == math.ceil(rule.min_total_steps / 2)
  capped = recipe.low_label_schedule(10_000, 100, batch_size=32, epochs=3, rule=rule)
  assert capped.batch_size == 32


def test_disabled_rule_runs_batch_and_epochs_as_given_and_too_large_a_batch_fails():
  rule = shipped("nih14").low_label
  rule.enabled = False
  plain = recipe.low_label_schedule(783, 22_361, batch_size=256, epochs=75, rule=rule)
  assert (plain.batch_size, plain.epochs, plain.val_every_epochs) == (256, 75, 1)
  with pytest.raises(ValueError, match="config.batch_size=1024 is larger than the 783"):
    recipe.low_label_schedule(783, 22_361, batch_size=1024, epochs=75, rule=rule)


def test_auto_pool_is_the_measured_winner_for_workdirs_and_random_avg_for_imported_files():
  assert recipe.AUTO_POOL == "cls"  # docs/method.md, from `python -m spcl_jax.bench transfer`
  for kind in ("spcl", "random"):
    assert recipe.resolve_pool("auto", kind) == recipe.AUTO_POOL
  for kind in ("timm", "medical_mae", "big_vision"):
    assert recipe.resolve_pool("auto", kind) == "avg"
  assert recipe.resolve_pool("avg", "spcl") == "avg"
  assert recipe.resolve_pool("cls", "timm") == "cls"


def test_resolve_writes_pool_and_linear_protocol_into_the_config():
  config = shipped("nih14", protocol="linear")
  _, changes = recipe.resolve(config, init_kind="medical_mae", num_train=78_313,
                              num_val=22_361, batch_multiple=8)
  assert config.model.pool == "avg" and config.optim.freeze_encoder
  assert config.model.drop_path_rate == 0.0
  assert any(line.startswith("config.model.pool: auto -> avg") for line in changes)
  full = shipped("nih14")
  recipe.resolve(full, init_kind="spcl", num_train=783, num_val=22_361, batch_multiple=8)
  assert full.model.pool == "cls" and not full.optim.freeze_encoder
  assert full.model.drop_path_rate == 0.2


def test_config_checks_name_the_field():
  config = shipped("nih14")
  config.optim.freeze_encoder = True
  with pytest.raises(ConfigError, match="use config.protocol='linear'"):
    validate_finetune_config(config)
  config = shipped("nih14")
  config.low_label.min_total_steps = 0
  with pytest.raises(ConfigError, match="config.low_label.min_total_steps=0"):
    validate_finetune_config(config)
  validate_finetune_config(shipped("nih14", protocol="linear"))
  siim = importlib.import_module("spcl_jax.configs.finetune.siim").get_config()
  siim.protocol = "linear"
  with pytest.raises(ConfigError, match="config.protocol='linear'"):
    validate_finetune_config(siim)


def test_chexpert_defaults_to_the_official_split():
  assert shipped("chexpert").split_scheme == "official"
  assert shipped("nih14").split_scheme == "paper"


def test_linear_is_a_classification_protocol_with_its_own_name_in_results():
  from spcl_jax.finetune import workloads
  assert workloads.workload_for(shipped("nih14", protocol="linear")).protocol == "linear"
  assert workloads.workload_for(shipped("nih14")).protocol == "classification"
  assert recipe.is_classification("linear") and not recipe.is_classification("mgca")


def test_linear_evaluation_shows_the_frozen_encoder_whole_images_as_pre_training_did():
  """S-PCL learns no invariance to crops or RandAugment; a frozen encoder under them fed its
  linear head features of images it never saw (below chance in `bench transfer`)."""
  from spcl_jax.finetune import data  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
  for protocol, whole in (("linear", True), ("classification", False)):
    config = shipped("nih14", protocol=protocol)
    config.model.image_size = 64
    _, changes = recipe.resolve(config, init_kind="spcl", num_train=7_831, num_val=22_361,
                                batch_multiple=8)
    train = data.TrainTransform(config, 64).augment
    outputs = [train(image, np.random.default_rng(seed))[0] for seed in range(8)]
    as_stored = [np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outputs]
    evaluated = data.EvalTransform(config, 64).transform(image)[0]
    assert all(as_stored) == whole and np.array_equal(evaluated, image) == whole, protocol
    assert any("config.data.randaugment: True -> False" in c for c in changes) == whole
