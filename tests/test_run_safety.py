"""Run safety of training: every fault of issue 11 injected on purpose, and what must hold after.

One table per kind of fault, a row per fault: the command (in-process through the CLI's
`main()`), the expected exit code and message, and the state afterwards (checkpoint intact or
absent, resumed losses equal to the uninterrupted run's, logs holding each (step, kind) once,
nothing written on a failed start). Export, extract, prepare, signals and kill -9 are in
test_run_safety_commands.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest

from run_safety_fixtures import (BASE, CORRUPTIONS, assert_one_error_line, call_main,
                                 metric_keys, read_metrics, run_main, tensorboard_scalars,
                                 truncate_params)
from spcl_jax import checkpoint, run_info, sharding, steps, workdir_lock
from spcl_jax.data import pipeline


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """The uninterrupted run every resume is compared with."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  assert call_main(f"--workdir={workdir}", *BASE) == 0
  assert checkpoint.available_steps(workdir) == [2, 4]
  return workdir


def copy_of(base: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  copy = tmp_path / "run"
  shutil.copytree(base, copy)
  return copy


@pytest.mark.slow
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(base_run, tmp_path, capsys,
                                                                    name):
  workdir = copy_of(base_run, tmp_path)
  corrupt, fragment = CORRUPTIONS[name]
  corrupt(checkpoint.checkpoint_dir(workdir) / "4")
  config = train_config(workdir)
  training = steps.build_training(config, sharding.make_mesh(config))
  manager = checkpoint.make_manager(workdir)
  data_iter = iter(pipeline.train_dataset(config))
  _, _, step = checkpoint.restore_intact(workdir, manager, training.abstract_state.params,
                                         training.abstract_state.opt_state, data_iter)
  manager.close()
  err = capsys.readouterr().err
  assert step == 2
  assert "WARNING" in err and fragment in err and "falling back to step 2" in err, err
  assert checkpoint.available_steps(workdir) == [2]
  assert [p.name.split("-")[0] for p in (workdir / checkpoint.CORRUPT_DIR).iterdir()] == ["4"]


def train_config(workdir: pathlib.Path):
  """The config the base run recorded (what a rerun of its command resolves to)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(run_info.read_run_info(workdir)["config"])


@pytest.mark.slow
def test_a_chosen_restore_step_moves_the_later_checkpoints_aside(base_run, tmp_path):
  workdir = copy_of(base_run, tmp_path)
  config = train_config(workdir)
  training = steps.build_training(config, sharding.make_mesh(config))
  manager = checkpoint.make_manager(workdir)
  _, _, step = checkpoint.restore_intact(
      workdir, manager, training.abstract_state.params, training.abstract_state.opt_state,
      iter(pipeline.train_dataset(config)), chosen_step=2)
  manager.close()
  assert step == 2 and checkpoint.available_steps(workdir) == [2]
  assert len(list((workdir / checkpoint.SUPERSEDED_DIR).iterdir())) == 1


@pytest.mark.slow
def test_resume_after_faults_is_exact_and_logs_each_step_once(base_run, tmp_path, capsys):
  """A killed run's leftovers all at once: a truncated latest checkpoint, an orbax tmp folder,
  a lock from a dead PID, metrics rows past the last good checkpoint and a line cut short."""
  workdir = copy_of(base_run, tmp_path)
  truncate_params(checkpoint.checkpoint_dir(workdir) / "4")
  stale_tmp = checkpoint.checkpoint_dir(workdir) / f"6{checkpoint.TMP_MARKER}-1700000000"
  (stale_tmp / "params").mkdir(parents=True)
  (workdir / workdir_lock.FILENAME).write_text(json.dumps(
      {"host": "h", "pid": 2 ** 22 + 1, "started": "2026-01-01T00:00:00+00:00"}))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n" + '{"step": 4, "lo')
  original_config_json = (workdir / "config.json").read_bytes()

  code, out, err = run_main(capsys, f"--workdir={workdir}", *BASE)
  assert code == 0, err[-3000:]
  assert "taking over the workdir lock of a run that is gone (PID 4194305" in out
  assert f"removed {stale_tmp}" in out and not stale_tmp.exists()
  assert "is unreadable" in err and "falling back to step 2" in err
  assert f"resumed from {checkpoint.checkpoint_dir(workdir)} at step 2" in out

  base_losses = {r["step"]: r["loss"] for r in read_metrics(base_run) if "loss" in r}
  records = read_metrics(workdir)
  for r in records:
    if "loss" in r:
      assert r["loss"] == pytest.approx(base_losses[r["step"]], abs=1e-6), r["step"]
  assert sorted(metric_keys(records)) == sorted(metric_keys(read_metrics(base_run)))
  assert len(set(metric_keys(records))) == len(records)
  shown = tensorboard_scalars(workdir)
  assert len(shown) == len(set(shown)) and ("loss", 4) in shown and ("eval_loss", 0) in shown
  assert checkpoint.available_steps(workdir) == [2, 4]
  assert (workdir / "config.json").read_bytes() == original_config_json
  assert [h["start_step"] for h in run_info.read_history(workdir)] == [0, 2]
  assert (workdir / workdir_lock.FILENAME).read_text() == ""  # released


@pytest.mark.parametrize("first_new_step,kept", [(3, [0, 1, 2]), (0, []), (None, [0, 1, 2, 3, 4])])
def test_metrics_rows_a_restart_redoes_are_dropped(tmp_path, first_new_step, kept):
  from spcl_jax import metrics  # pylint: disable=g-import-not-at-top
  rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(5)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n" + '{"step": 5, "lo')
  metrics.MetricsWriter(tmp_path, total_steps=9, first_new_step=first_new_step).close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  if first_new_step is None:  # a reader appending (e.g. evaluations) keeps everything
    assert lines == rows + ['{"step": 5, "lo']
  else:
    assert [json.loads(line)["step"] for line in lines] == kept


# --- one-line errors of the trainer; nothing written on a failed start ------------------------

TRAIN_ERRORS = [
    # (name, overrides, exit code, message fragment)
    ("missing image folder", ["--config.data.source=folder:/no/such/folder"], 2,
     "'/no/such/folder' does not exist"),
    ("empty image folder", ["--config.data.source=folder:{empty}"], 2, "no .png/.jpg/.jpeg"),
    ("fsdp not dividing the devices", ["--config.sharding.fsdp=3"], 2,
     "config.sharding.fsdp=3 does not divide the 8 devices"),
    ("batch larger than the data", ["--config.batch_size=32"], 2,
     "config.batch_size=32 is larger than the 16 images"),
    ("negative learning rate", ["--config.optim.learning_rate=-1"], 2,
     "config.optim.learning_rate=-1"),
]


@pytest.mark.parametrize("name,overrides,code,fragment", TRAIN_ERRORS,
                         ids=[row[0] for row in TRAIN_ERRORS])
def test_a_bad_start_is_one_line_and_writes_nothing(tmp_path, capsys, name, overrides, code,
                                                    fragment):
  del name
  (tmp_path / "empty").mkdir()
  workdir = tmp_path / "run"
  overrides = [o.format(empty=tmp_path / "empty") for o in overrides]
  got, _, err = run_main(capsys, f"--workdir={workdir}", *BASE, *overrides)
  assert got == code
  assert_one_error_line(err, fragment)
  assert not workdir.exists()


@pytest.mark.slow
def test_a_non_finite_state_is_never_checkpointed(tmp_path, capsys):
  """lr 1e39: step 1's loss and gradient are finite, the parameters after it are not."""
  workdir = tmp_path / "run"
  code, _, err = run_main(capsys, f"--workdir={workdir}", *BASE,
                          "--config.optim.learning_rate=1e39",
                          "--config.optim.warmup_fraction=0", "--config.checkpoint_every_steps=1")
  assert code == 1
  assert_one_error_line(err, "after step 1 hold NaN/Inf: not saved (no checkpoint was written)")
  assert checkpoint.available_steps(workdir) == []


@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_exits_naming_the_holder(base_run, tmp_path, capsys):
  workdir = copy_of(base_run, tmp_path)
  before = (workdir / "metrics.jsonl").read_bytes()
  with workdir_lock.WorkdirLock(workdir):
    code, _, err = run_main(capsys, f"--workdir={workdir}", *BASE)
  assert code == 1
  assert_one_error_line(err, f"the workdir is in use by PID {os.getpid()}")
  assert (workdir / "metrics.jsonl").read_bytes() == before


RESUME_CHANGES = [
    # (name, extra flags, exit code, message fragment, recorded change)
    ("locked field", ["--config.seed=1"], 2, "--allow_config_change=seed", None),
    ("locked field, overridden", ["--config.seed=1", "--allow_config_change=seed"], 0, None,
     {"field": "seed", "old": 0, "new": 1, "overridden": True}),
    ("free field, warned", ["--config.total_steps=2"], 0,
     "the learning-rate schedule", {"field": "total_steps", "old": 4, "new": 2}),
    # config.json (what export reads) keeps the first normalisation: no override changes it
    ("normalisation, overridden", ["--config.data.mean=0.4", "--allow_config_change=data.mean"],
     2, "cannot be overridden", None),
    ("override of an unknown field", ["--allow_config_change=sede"], 2, "no such config field",
     None),
]


@pytest.mark.parametrize("name,extra,code,fragment,change", RESUME_CHANGES,
                         ids=[row[0] for row in RESUME_CHANGES])
@pytest.mark.slow
def test_a_resume_keeps_the_locked_fields_and_records_every_change(base_run, tmp_path, capsys,
                                                                   name, extra, code, fragment,
                                                                   change):
  del name
  workdir = copy_of(base_run, tmp_path)
  config_json = (workdir / "config.json").read_bytes()
  got, out, err = run_main(capsys, f"--workdir={workdir}", *BASE, *extra)
  assert got == code, err[-2000:]
  history = run_info.read_history(workdir)
  if code:
    assert_one_error_line(err, fragment)
    assert len(history) == 1
  else:
    assert fragment is None or fragment in out
    assert len(history) == 2 and change in history[-1]["changes"]
  assert (workdir / "config.json").read_bytes() == config_json


def test_every_config_field_is_classified_for_resume():
  """A new config field must be put in run_info.LOCKED or FREE on purpose (unlisted: locked)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  fields = run_info.flatten(json.loads(default.get_config().to_json_best_effort()))
  unclassified = [f for f in fields if not run_info.is_free(f)
                  and not any(run_info._matches(f, e) for e in run_info.LOCKED)]  # pylint: disable=protected-access
  assert not unclassified
  assert run_info.is_free("model.remat") and not run_info.is_free("model.dtype")
  assert not run_info.is_free("optim.learning_rate") and run_info.is_free("total_steps")
