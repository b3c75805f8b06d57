"""train_and_evaluate end to end on the bundled CXRs: learning, checkpoints, exact resume."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from spcl_jax.configs import demo
from spcl_jax import accelerator_time, checkpoint, evaluators, optimizer, run_info, steps, train
from spcl_jax.configuration import ConfigError


class CountingEvaluator:
  """A plug-in defined here, outside the package: the trainer must run it on its schedule."""

  def __init__(self, name, eval_config, training):
    self.offset = eval_config.offset
    self.description = f"{name}: counts its calls"
    self.calls = 0
    assert training.config.model.variant == "pico/16"  # it is handed the run's training setup

  def images(self):
    return {}

  def run(self, params):
    self.calls += 1
    return {"calls": self.calls + self.offset,
            "cls_norm": float(np.linalg.norm(np.asarray(params["encoder"]["cls"])))}


evaluators.register("counting", CountingEvaluator)


def quick_config(**overrides):
  config = demo.get_config()
  config.model.image_size = 64
  config.total_steps = 30
  config.log_every_steps = 1
  for entry in config.evals.values():
    entry.every_steps = 15
  config.evals.count = dict(type="counting", every_steps=7, offset=100)
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


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_everything(finished_run):
  workdir, summary = finished_run
  records = read_metrics(workdir)
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 15, 30]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  for name in ("probe", "knn"):  # the demo's probes on the sample's normal/pneumonia labels
    aucs = [r for r in records if f"{name}_auc" in r]
    assert [r["step"] for r in aucs] == [0, 15, 30]
    assert all(0 <= r[f"{name}_auc"] == r[f"{name}_auc/pneumonia"] <= 1 for r in aucs)
  # The plug-in: every 7 steps, at the first and at the last step; its metrics as count_*.
  counts = [r for r in records if "count_calls" in r]
  assert [(r["step"], r["count_calls"]) for r in counts] == [
      (0, 101), (7, 102), (14, 103), (21, 104), (28, 105), (30, 106)]
  assert counts[0]["count_cls_norm"] != counts[-1]["count_cls_norm"]  # it saw trained params
  images = json.loads((workdir / "eval_images.json").read_text())
  assert sorted(images["probe"]["train"] + images["probe"]["val"]) == sorted(images["retrieval"]["eval"])
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
  assert info["model"]["variant"] == "pico/16" and info["model"]["image_size"] == 64
  assert info["normalization"] == {"mean": 0.5056, "std": 0.252}
  assert info["config"]["spcl"]["mask_ratio"] == 0.6
  assert (info["config"]["grad_accum_steps"], info["config"]["accumulation"]) == (2, "cached")


@pytest.mark.slow
def test_logged_lr_is_the_one_each_step_used(finished_run):
  workdir, _ = finished_run
  schedule = optimizer.learning_rate_schedule(quick_config())
  logged = {r["step"]: r["lr"] for r in read_metrics(workdir) if "lr" in r}
  assert logged[1] == 0.0  # warmup starts at 0: step 1 updates with schedule(0)
  for step, lr in logged.items():
    assert lr == pytest.approx(float(schedule(step - 1)), abs=1e-9), step  # float32 vs float64


@pytest.mark.slow
def test_restart_after_a_checkpoint_logs_identical_losses(finished_run, tmp_path, monkeypatch):
  workdir, _ = finished_run
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  for step in (20, 30):  # as if the run had died right after step 10's checkpoint
    shutil.rmtree(checkpoint.checkpoint_dir(resumed) / str(step))
  (resumed / "metrics.jsonl").unlink()
  clock_updates = []
  update = accelerator_time.AcceleratorClock.update
  monkeypatch.setattr(accelerator_time.AcceleratorClock, "update",
                      lambda self: clock_updates.append(1) or update(self))
  train.train_and_evaluate(quick_config(**ACCUMULATED), str(resumed))
  original, again = train_losses(read_metrics(workdir)), train_losses(read_metrics(resumed))
  assert sorted(again) == list(range(11, 31))
  for step in range(11, 31):
    assert again[step] == pytest.approx(original[step], abs=1e-6), step
  # accelerator_time.json is rewritten at each of the 20 log lines and at the end, and the
  # copied file gains this session: hours add up over restarts.
  assert len(clock_updates) == 21
  first, both = (accelerator_time.read_accelerator_time(w) for w in (workdir, resumed))
  assert len(both["sessions"]) == 2 and both["sessions"][0] == first["sessions"][0]
  assert both["accelerator_seconds"] == pytest.approx(
      first["accelerator_seconds"] + 8 * both["sessions"][1]["wall_seconds"])


@pytest.mark.slow
def test_params_restore_alone_for_export(finished_run):
  workdir, _ = finished_run
  params, step = checkpoint.restore_params(workdir)
  assert step == 30 and set(params) == {"encoder", "log_scale"}
  assert params["encoder"]["embedding"]["kernel"].shape == (16, 16, 1, 64)
  params10, _ = checkpoint.restore_params(workdir, step=10)
  assert not np.allclose(params10["encoder"]["cls"], params["encoder"]["cls"])
  with pytest.raises(ValueError, match="steps present: 10, 20, 30"):
    checkpoint.restore_params(workdir, step=7)


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(finished_run, tmp_path):
  workdir, _ = finished_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  with pytest.raises(ValueError, match="started with model"):
    train.train_and_evaluate(quick_config(model=dict(variant="Ti/16")), str(copy))


@pytest.mark.slow
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


def key_data(key):
  return tuple(np.asarray(jax.random.key_data(key)).ravel())


@pytest.mark.slow
def test_step_keys_eval_keys_and_a_non_finite_grad_norm(tmp_path, monkeypatch):
  """Records the keys the loop hands to the jitted steps and injects grad_norm=inf at step 3.

  Each step gets fold_in(train key, step - 1) (new masks every step), evaluation gets keys from
  its own branch of the seed, and a non-finite grad_norm with a finite loss stops the run before
  step 3's state is checkpointed.
  """
  seen = {"train": [], "eval": []}
  build = steps.build_training

  def recording_build(config, mesh):
    training = build(config, mesh)

    def train_step(state, images, key):
      seen["train"].append(key_data(key))
      state, metrics = training.train_step(state, images, key)
      if len(seen["train"]) == 3:
        metrics = {**metrics, "grad_norm": metrics["grad_norm"] * np.inf}
      return state, metrics

    def eval_step(params, images, key):
      seen["eval"].append(key_data(key))
      return training.eval_step(params, images, key)
    return dataclasses.replace(training, train_step=train_step, eval_step=eval_step)

  monkeypatch.setattr(steps, "build_training", recording_build)
  config = quick_config(total_steps=6, checkpoint_every_steps=1)
  with pytest.raises(train.NonFiniteLossError, match="grad_norm is inf at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint.available_steps(tmp_path) == [1, 2]
  root = jax.random.key(config.seed)
  train_key, eval_key = jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)
  assert seen["train"][:3] == [key_data(jax.random.fold_in(train_key, s)) for s in range(3)]
  assert seen["eval"] == [key_data(jax.random.fold_in(eval_key, i))
                          for i in range(len(seen["eval"]))]
  assert seen["eval"] and not set(seen["eval"]) & set(seen["train"])
