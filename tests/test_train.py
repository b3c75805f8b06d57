"""train_and_evaluate end to end on the bundled CXRs: learning, checkpoints, exact resume."""

import json
import shutil

import jax
import numpy as np
import pytest

from configs import demo
from spcl_jax import checkpoint, run_info, train
from spcl_jax.configuration import ConfigError


def quick_config(**overrides):
  config = demo.get_config()
  config.model.image_size = 64
  config.total_steps = 30
  config.log_every_steps = 1
  config.eval_every_steps = 15
  config.checkpoint_every_steps = 10
  config.max_checkpoints_to_keep = 5
  config.update(overrides)
  return config


def read_metrics(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def train_losses(records):
  return {r["step"]: r["loss"] for r in records if "loss" in r}


# The run these tests share uses the paper's batch layout: each device's block in 2 micro-batches
# (cached accumulation), so the exact-resume test below holds with k = 2.
ACCUMULATED = dict(grad_accum_steps=2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  summary = train.train_and_evaluate(quick_config(**ACCUMULATED), str(workdir))
  return workdir, summary


def test_training_lowers_the_loss_and_writes_everything(finished_run):
  workdir, summary = finished_run
  records = read_metrics(workdir)
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 15, 30]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  losses = train_losses(records)
  assert sorted(losses) == list(range(1, 31))
  assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)])
  last = [r for r in records if "loss" in r][-1]
  for key in ("step", "loss", "scale", "temperature", "lr", "grad_norm", "param_norm",
              "retrieval_top1", "images_per_sec", "tflops_per_sec", "mfu"):
    assert key in last
  assert last["temperature"] == pytest.approx(1 / last["scale"], rel=1e-6)
  assert 0 <= last["retrieval_top1"] <= 1 and last["images_per_sec"] > 0
  assert summary["step"] == 30
  assert checkpoint.available_steps(workdir) == [10, 20, 30]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  info = run_info.read_run_info(workdir)
  assert info["model"]["variant"] == "mu/16" and info["model"]["image_size"] == 64
  assert info["normalization"] == {"mean": 0.5056, "std": 0.252}
  assert info["config"]["spcl"]["mask_ratio"] == 0.6
  assert (info["config"]["grad_accum_steps"], info["config"]["accumulation"]) == (2, "cached")


def test_restart_after_a_checkpoint_logs_identical_losses(finished_run, tmp_path):
  workdir, _ = finished_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  for step in (20, 30):  # as if the run had died right after step 10's checkpoint
    shutil.rmtree(checkpoint.checkpoint_dir(resumed) / str(step))
  (resumed / "metrics.jsonl").unlink()
  train.train_and_evaluate(quick_config(**ACCUMULATED), str(resumed))
  original, again = train_losses(read_metrics(workdir)), train_losses(read_metrics(resumed))
  assert sorted(again) == list(range(11, 31))
  for step in range(11, 31):
    assert again[step] == pytest.approx(original[step], abs=1e-6), step


def test_params_restore_alone_for_export(finished_run):
  workdir, _ = finished_run
  params, step = checkpoint.restore_params(workdir)
  assert step == 30 and set(params) == {"encoder", "log_scale"}
  assert params["encoder"]["embedding"]["kernel"].shape == (16, 16, 1, 64)
  params10, _ = checkpoint.restore_params(workdir, step=10)
  assert not np.allclose(params10["encoder"]["cls"], params["encoder"]["cls"])
  with pytest.raises(ValueError, match="steps present: 10, 20, 30"):
    checkpoint.restore_params(workdir, step=7)


def test_resuming_with_another_model_is_refused(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  with pytest.raises(ValueError, match="started with model"):
    train.train_and_evaluate(quick_config(model=dict(variant="Ti/16")), str(copy))


def test_non_finite_loss_stops_without_checkpointing_it(tmp_path):
  # A vanishing std turns the normalised pixels into inf, so the very first loss is NaN.
  config = quick_config(total_steps=5)
  config.data.std = 1e-38
  with pytest.raises(train.NonFiniteLossError, match="at step 1.*no checkpoint was written"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint.available_steps(tmp_path) == []


@pytest.mark.parametrize("field,value,message", [
    ("spcl.mask_ratio", 1.5, r"config.spcl.mask_ratio=1.5 must be in \(0, 1\)"),
    ("batch_size", 12, "config.batch_size=12 is not divisible by the 8 devices"),
    ("data.source", "s3:bucket", "config.data.source='s3:bucket': unknown source kind"),
    ("grad_accum_steps", 3, "config.grad_accum_steps=3: the 2 images per device"),
    ("accumulation", "naive", "config.accumulation='naive' must be one of"),
    ("spcl.negatives", "some", "config.spcl.negatives='some'"),
])
def test_bad_config_values_are_named(tmp_path, field, value, message):
  config = quick_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  assert jax.device_count() == 8
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
