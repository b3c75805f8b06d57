"""Run safety: every fault of issue 11 injected on purpose, and what must hold afterwards.

One table per kind of fault, a row per fault: the command (in-process through the CLI's
`main()` or `train_and_evaluate`; a subprocess only for signals and kill -9), the expected exit
code and message, and the state afterwards (checkpoint intact or absent, resumed losses equal to
the uninterrupted run's, logs holding each (step, kind) once, nothing written on a failed start).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time

import flax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from export_fixtures import make_config, random_encoder_params
from spcl_jax import checkpoint, run_info, sharding, steps, workdir_lock
from spcl_jax import main as train_cli
from spcl_jax.data import pipeline
from spcl_jax.export.__main__ import main as export_main
from spcl_jax.extract import main as extract_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
# 4 steps of the demo at 64 px, checkpoints at 2 and 4, every step logged, eval at 0, 2, 4.
BASE = ["--config.model.image_size=64", "--config.total_steps=4", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2", "--config.eval_every_steps=2"]


def call_main(*args: str) -> int:
  """`python -m spcl_jax.main --config=configs/demo.py ARGS` in this process; the exit code."""
  argv = ["spcl_jax.main", f"--config={DEMO}", *args]
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the previous parse's override flags; defined again below
  saved, sys.argv = sys.argv, argv  # ml_collections reads the --config.x overrides there
  try:
    with pytest.raises(SystemExit) as exit_info:
      train_cli.main(train_cli.parse_flags(argv))
  finally:
    sys.argv = saved
  return exit_info.value.code or 0


def run_main(capsys, *args: str) -> tuple[int, str, str]:
  code = call_main(*args)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def assert_one_error_line(err: str, fragment: str) -> None:
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and fragment in errors[0], err[-2000:]
  assert "Traceback" not in err


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def metric_keys(records: list[dict]) -> list[tuple[int, str]]:
  """(step, kind) of each row; kind is 'train' or 'eval'."""
  return [(r["step"], "eval" if "eval_loss" in r else "train") for r in records]


def tensorboard_scalars(workdir: pathlib.Path) -> list[tuple[str, int]]:
  """(tag, step) TensorBoard shows: files in order, a purge at step T hides earlier steps >= T."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  shown: list[tuple[str, int]] = []
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = [(tag, step) for tag, step in shown if step < event.step]
      for value in event.summary.value:
        shown.append((value.tag, event.step))
  return shown


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


# --- corrupting a checkpoint -----------------------------------------------------------------

def _largest(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_params(step_dir):
  data = _largest(step_dir / "params")
  data.write_bytes(data.read_bytes()[:1000])


def flip_params(step_dir):
  data = _largest(step_dir / "params")
  raw = bytearray(data.read_bytes())
  for i in range(2000, len(raw), 97):
    raw[i] ^= 0xFF
  data.write_bytes(bytes(raw))


def delete_opt_state(step_dir):
  shutil.rmtree(step_dir / "opt_state")


def truncate_meta(step_dir):
  meta = step_dir / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:5])


CORRUPTIONS = {
    # name: (how, a fragment of the message naming what is wrong)
    "truncated params": (truncate_params, "is unreadable"),
    "flipped params": (flip_params, "is unreadable"),
    "deleted item": (delete_opt_state, "opt_state"),
    "truncated meta/metadata": (truncate_meta, "'meta/metadata' is not valid JSON"),
}


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


def test_a_non_finite_state_is_never_checkpointed(tmp_path, capsys):
  """lr 1e39: step 1's loss and gradient are finite, the parameters after it are not."""
  workdir = tmp_path / "run"
  code, _, err = run_main(capsys, f"--workdir={workdir}", *BASE,
                          "--config.optim.learning_rate=1e39",
                          "--config.optim.warmup_fraction=0", "--config.checkpoint_every_steps=1")
  assert code == 1
  assert_one_error_line(err, "after step 1 hold NaN/Inf: not saved (no checkpoint was written)")
  assert checkpoint.available_steps(workdir) == []


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
    ("override of an unknown field", ["--allow_config_change=sede"], 2, "no such config field",
     None),
]


@pytest.mark.parametrize("name,extra,code,fragment,change", RESUME_CHANGES,
                         ids=[row[0] for row in RESUME_CHANGES])
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


PREPARE_ERRORS = [
    # (name, argv, exit code, message fragment)
    ("no workers", ["nih_chestxray14", "--src", "{tmp}", "--out", "{tmp}/out", "--workers", "0"],
     2, "--workers must be >= 1"),
    ("unknown dataset", ["nih", "--src", "{tmp}", "--out", "{tmp}/out"], 2, "invalid choice"),
    ("source not a folder", ["nih_chestxray14", "--src", "{tmp}/none", "--out", "{tmp}/out"], 1,
     "is not a folder"),
]


@pytest.mark.parametrize("name,argv,code,fragment", PREPARE_ERRORS,
                         ids=[r[0] for r in PREPARE_ERRORS])
def test_prepare_errors_are_one_line(tmp_path, capsys, name, argv, code, fragment):
  del name
  from spcl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  try:
    got = prepare.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
  except SystemExit as e:  # prepare's own checks exit with their message
    got, err = (e.code, capsys.readouterr().err) if isinstance(e.code, int) else (1, str(e.code))
  assert got == code
  assert_one_error_line(err, fragment)
  assert not (tmp_path / "out").exists()


# --- export and extract --------------------------------------------------------------------

def write_workdir(path: pathlib.Path, encoder_params) -> pathlib.Path:
  """config.json and a params-only checkpoint at step 7, bypassing checkpoint.save's check."""
  run_info.write_run_info(path, make_config("mu/16", 64))
  manager = checkpoint.make_manager(path)
  manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(
      {"encoder": encoder_params, "log_scale": jnp.float32(2.0)})))
  manager.wait_until_finished()
  manager.close()
  return path


@pytest.fixture(scope="module")
def exportable(tmp_path_factory):
  return write_workdir(tmp_path_factory.mktemp("ok") / "run",
                       random_encoder_params(make_config("mu/16", 64)))


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
  params = random_encoder_params(make_config("mu/16", 64))
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  flat["Transformer/encoder_norm/scale"][3] = np.inf
  return write_workdir(tmp_path_factory.mktemp("nan") / "run",
                       flax.traverse_util.unflatten_dict(flat, sep="/"))


def export(capsys, workdir, out, *extra):
  code = export_main(["--workdir", str(workdir), "--format", "timm", "--out", str(out), *extra])
  captured = capsys.readouterr()
  return code, captured.err


def test_export_and_extract_refuse_non_finite_parameters(poisoned, tmp_path, capsys):
  code, err = export(capsys, poisoned, tmp_path / "x.safetensors")
  assert code == 1
  assert_one_error_line(err, "holds NaN/Inf parameters (first at ['encoder']['Transformer']")
  code = extract_main(["--workdir", str(poisoned), "--images", str(ROOT / "spcl_jax/data/sample"),
                       "--out", str(tmp_path / "f.npz"), "--no-progress"])
  assert code == 1
  assert_one_error_line(capsys.readouterr().err, "NaN/Inf")
  assert sorted(os.listdir(tmp_path)) == []


def _unwritable(tmp_path):
  return pathlib.Path("/proc/spcl_vit.safetensors")  # no file can be created there, even by root


def _directory(tmp_path):
  (tmp_path / "dir.safetensors").mkdir()
  return tmp_path / "dir.safetensors"


EXPORT_OUTS = [
    ("a directory", _directory, 2, "is a directory"),
    ("an unwritable folder", _unwritable, 2, "cannot write in folder '/proc'"),
]


@pytest.mark.parametrize("name,out,code,fragment", EXPORT_OUTS, ids=[r[0] for r in EXPORT_OUTS])
def test_export_to_a_path_it_cannot_write_is_one_line_and_leaves_nothing(
    exportable, tmp_path, capsys, name, out, code, fragment):
  del name
  target = out(tmp_path)
  got, err = export(capsys, exportable, target)
  assert got == code
  assert_one_error_line(err, fragment)
  assert not list(target.parent.glob("*.tmp"))


def test_export_of_a_corrupt_checkpoint_is_one_line(exportable, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(exportable, workdir)
  truncate_params(checkpoint.checkpoint_dir(workdir) / "7")
  code, err = export(capsys, workdir, tmp_path / "x.safetensors")
  assert code == 1
  assert_one_error_line(err, "checkpoint")
  assert "is unreadable" in err and "pick another with --step" in err
  code, err = export(capsys, workdir, tmp_path / "x.safetensors", "--debug")
  assert code == 1 and "Traceback" in err  # --debug shows where


def test_exported_files_get_the_umask_mode(exportable, tmp_path, capsys):
  code, _ = export(capsys, exportable, tmp_path / "x.safetensors")
  assert code == 0
  umask = os.umask(0)
  os.umask(umask)
  for name in ("x.safetensors", "x.json"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# --- signals and kill -9 (subprocesses) ------------------------------------------------------

def start_trainer(workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "spcl_jax.main", f"--config={DEMO}", f"--workdir={workdir}",
       "--config.model.image_size=64", "--config.total_steps=100000",
       "--config.log_every_steps=1", *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


def wait_for_train_rows(proc: subprocess.Popen, workdir: pathlib.Path, rows: int) -> None:
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.is_file() and sum('"loss"' in l for l in metrics.read_text().splitlines()) >= rows:
      return
    time.sleep(0.2)
  raise AssertionError(f"no {rows} train rows: {proc.poll()} {proc.stderr.read()[-3000:]}")


def descendants(pid: int) -> set[int]:
  children: dict[int, list[int]] = {}
  for entry in pathlib.Path("/proc").iterdir():
    try:
      stat = (entry / "stat").read_text()
    except (OSError, ValueError):
      continue
    if entry.name.isdigit():
      ppid = int(stat.rsplit(")", 1)[1].split()[1])
      children.setdefault(ppid, []).append(int(entry.name))
  found, todo = set(), [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


def alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"


def test_repeated_sigterms_do_not_cut_the_save_short(tmp_path):
  """SIGTERM every 50 ms until the trainer exits: the ones that land while the checkpoint is
  written are ignored, so it completes; "checkpoint saved" is printed once it has. (One landing
  after the trainer let go of the handler, with the save done, may still end it: -SIGTERM.)"""
  workdir = tmp_path / "run"
  proc = start_trainer(workdir, "--config.checkpoint_every_steps=1000")
  wait_for_train_rows(proc, workdir, 3)
  deadline = time.time() + 120
  while proc.poll() is None and time.time() < deadline:
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
  stdout, stderr = proc.communicate(timeout=10)
  assert proc.returncode in (0, -signal.SIGTERM), stderr[-3000:]
  assert "still saving the checkpoint" in stdout
  (step,) = checkpoint.available_steps(workdir)
  assert f"stopped at step {step}; checkpoint saved" in stdout
  assert not list(checkpoint.checkpoint_dir(workdir).glob(f"*{checkpoint.TMP_MARKER}*"))
  params, _ = checkpoint.restore_params(workdir, step)  # intact
  assert np.isfinite(params["log_scale"])


def test_kill_9_leaves_no_worker_behind(tmp_path):
  """The resume after such a kill (lock of a dead PID, tmp folder, extra rows) is the
  `test_resume_after_faults...` row above, in-process."""
  workdir = tmp_path / "run"
  proc = start_trainer(workdir, "--config.data.num_workers=1")
  wait_for_train_rows(proc, workdir, 2)
  workers = descendants(proc.pid)
  assert workers, "grain started no worker process"
  proc.kill()
  proc.communicate(timeout=60)
  deadline = time.time() + 20
  while time.time() < deadline and any(alive(pid) for pid in workers):
    time.sleep(0.2)
  assert not [pid for pid in workers if alive(pid)], "orphaned worker processes"
