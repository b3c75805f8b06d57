"""Run safety of the other commands and of the process: one-line errors of prepare, export and
extract, refusal of non-finite weights, whole output files with the umask's mode; SIGTERM during
the save and kill -9 with decoding workers (subprocesses, the only way to send them); a disk
that fills up mid-run, read on the whole stderr of the process."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import finetune_fixtures as ff
from export_fixtures import make_config, random_encoder_params
from run_safety_fixtures import DEMO, ROOT, assert_one_error_line, truncate_params
from spcl_jax import checkpoint, run_info
from spcl_jax.export.__main__ import main as export_main
from spcl_jax.extract import main as extract_main


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
  run_info.write_run_info(path, make_config("pico/16", 64))
  manager = checkpoint.make_manager(path)
  manager.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(
      {"encoder": encoder_params, "log_scale": jnp.float32(2.0)})))
  manager.wait_until_finished()
  manager.close()
  return path


@pytest.fixture(scope="module")
def exportable(tmp_path_factory):
  return write_workdir(tmp_path_factory.mktemp("ok") / "run",
                       random_encoder_params(make_config("pico/16", 64)))


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
  params = random_encoder_params(make_config("pico/16", 64))
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

def start_trainer(workdir: pathlib.Path, *extra: str, **popen: Any) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "spcl_jax.main", f"--config={DEMO}", f"--workdir={workdir}",
       "--config.model.image_size=64", "--config.total_steps=100000",
       "--config.log_every_steps=1", *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, **popen)


def start_finetuning(workdir: pathlib.Path, prepared: pathlib.Path, *extra: str,
                     **popen: Any) -> subprocess.Popen:
  """finetune_fixtures.finetune_config's run through the CLI, many epochs long."""
  return subprocess.Popen(
      [sys.executable, "-m", "spcl_jax.finetune", f"--workdir={workdir}",
       *ff.cli_args("nih14", prepared, epochs=1000), *extra],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, **popen)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["pretraining", "finetuning"])
def test_sigterm_to_the_process_group_checkpoints_and_stops(tmp_path, trainer):
  """What scancel and most preemptions do: SIGTERM to the trainer and its grain workers."""
  workdir = tmp_path / "run"
  if trainer == "pretraining":
    proc = start_trainer(workdir, "--config.data.num_workers=1",
                         "--config.checkpoint_every_steps=1000", start_new_session=True)
  else:
    prepared = ff.prepared_nih(tmp_path / "nih")
    proc = start_finetuning(workdir, prepared, "--config.data.num_workers=1",
                            start_new_session=True)
  wait_for_train_rows(proc, workdir, 3)
  workers = descendants(proc.pid)
  assert workers, "grain started no worker process"
  os.killpg(proc.pid, signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "terminated unexpectedly" not in stderr
  step = checkpoint.available_steps(workdir)[-1]  # fine-tuning also saved at epoch ends
  assert f"stopped at step {step}; checkpoint saved" in stdout
  assert not [pid for pid in workers if alive(pid)]


# The trainer's CLI on a disk that fills up once the step-2 checkpoint is whole: from step 3 on
# no file may grow past 400 bytes (RLIMIT_FSIZE, no root needed; with SIGXFSZ ignored a write
# past it fails with EFBIG, as one on a full disk fails with ENOSPC). The step-4 save starts (its
# small metadata files fit) and its arrays fail in the background; the metrics and TensorBoard
# files fail to grow too.
_FULL_DISK_AFTER_STEP_2 = """
import pathlib, resource, signal, sys, time
from absl import app
from spcl_jax import engine, main
first_checkpoint = pathlib.Path(sys.argv[1]) / "checkpoints" / "2"
def fill_the_disk(moment, step):
  if moment == "train_step" and step == 3:
    while not first_checkpoint.is_dir():  # orbax renames its tmp folder once the save is whole
      time.sleep(0.05)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400, resource.RLIM_INFINITY))
engine.moment_listeners.append(fill_the_disk)
sys.argv = ["spcl_jax.main", *sys.argv[2:]]
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [
    100,  # the step-6 save is where the run learns that step 4's failed
    5,  # the step-5 metrics row fails to be written first, while step 4's save is failing
])
def test_a_failed_save_is_one_line_naming_its_step(tmp_path, log_every):
  """The whole stderr of the process: orbax's threads and tensorstore's unfinished writes print
  tracebacks of a failed save outside any handler of the run; none may reach the user."""
  workdir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-c", _FULL_DISK_AFTER_STEP_2, str(workdir), f"--config={DEMO}",
       f"--workdir={workdir}", "--config.model.image_size=64", "--config.total_steps=8",
       f"--config.log_every_steps={log_every}", "--config.checkpoint_every_steps=2",
       "--config.evals={}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 1, done.stderr[-3000:]
  assert_one_error_line(done.stderr, "saving checkpoint step 4 in")
  assert "File too large; the checkpoints before it are intact" in done.stderr
  assert "Event loop is closed" not in done.stderr, done.stderr[-3000:]
  assert checkpoint.available_steps(workdir) == [2]
  params, _ = checkpoint.restore_params(workdir, 2)
  assert np.isfinite(params["log_scale"])
