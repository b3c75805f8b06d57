"""`python -m spcl_jax.main` and `python -m spcl_jax.bench` as a user runs them, in a subprocess
(the slow tier), and the bench dispatcher's usage in-process."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from spcl_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "spcl_jax.main", "--config=configs/demo.py", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_users_own_config_in_another_folder_runs_from_any_directory(tmp_path):
  # The user's config lives outside the repository, builds on the shipped demo through the
  # installed package, and main runs from a directory that is not the repository root.
  own = tmp_path / "my_configs" / "tiny_demo.py"
  own.parent.mkdir()
  own.write_text("from spcl_jax.configs import demo\n\n\ndef get_config():\n"
                 "  config = demo.get_config()\n  config.model.image_size = 64\n"
                 "  return config\n")
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "spcl_jax.main", f"--config={own}", f"--workdir={workdir}",
       "--config.total_steps=3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 3]
  assert checkpoint.available_steps(workdir) == [3]
  assert json.loads((workdir / "config.json").read_text())["model"]["image_size"] == 64
  assert "step 3/3" in result.stdout and "done:" in result.stdout


@pytest.mark.slow
def test_bad_override_exits_non_zero_with_one_line(tmp_path):
  for override, words in (("--config.spcl.mask_ratio=1.5", "config.spcl.mask_ratio=1.5"),
                          ("--config.no_such_field=1", "no_such_field"),
                          ("--config.batch_size=many", "batch_size")):
    result = run_main(f"--workdir={tmp_path}", override)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  args = [sys.executable, "-m", "spcl_jax.main", "--config=configs/demo.py",
          f"--workdir={tmp_path}", "--config.model.image_size=64",
          "--config.total_steps=100000", "--config.log_every_steps=1"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.is_file() and sum("loss" in line for line in metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "saving a checkpoint and stopping" in stdout
  steps = checkpoint.available_steps(tmp_path)
  assert len(steps) == 1 and steps[0] >= 3
  result = run_main(f"--workdir={tmp_path}", "--config.model.image_size=64",
                    f"--config.total_steps={steps[0] + 2}", "--config.log_every_steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from {checkpoint.checkpoint_dir(tmp_path)} at step {steps[0]}" in result.stdout
  assert checkpoint.available_steps(tmp_path)[-1] == steps[0] + 2


@pytest.mark.slow
def test_two_processes_of_four_devices_log_the_losses_of_one_process_of_eight(tmp_path):
  """The multi-host path (jax.distributed, per-process data blocks, per-process iterator
  state) gives the single-process run's losses: masks and batches do not depend on layout."""
  common = ["--config=configs/demo.py", "--config.model.image_size=64",
            "--config.total_steps=4", "--config.log_every_steps=1"]
  env = {**os.environ, "PORT": str(23000 + os.getpid() % 1000), "DEVICES_PER_PROCESS": "4",
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
         "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  multi = subprocess.run(["bash", "launch/local_multiprocess.sh", "2",
                          f"--workdir={tmp_path / 'multi'}", *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert multi.returncode == 0, multi.stderr[-3000:]
  single = run_main(f"--workdir={tmp_path / 'single'}", *common[1:])
  assert single.returncode == 0, single.stderr[-3000:]

  def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

  got, want = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert [s for s, _ in got] == [1, 2, 3, 4]
  for (_, a), (_, b) in zip(got, want):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
  data_state = checkpoint.checkpoint_dir(tmp_path / "multi") / "4" / "data"
  assert sorted(p.name for p in data_state.glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  """Preemption may signal one host only: the processes agree (every log step) and all save."""
  workdir = tmp_path / "multi"
  env = {**os.environ, "PORT": str(24000 + os.getpid() % 1000), "DEVICES_PER_PROCESS": "4",
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
         "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  launcher = subprocess.Popen(
      ["bash", "launch/local_multiprocess.sh", "2", f"--workdir={workdir}",
       "--config=configs/demo.py", "--config.model.image_size=64",
       "--config.total_steps=100000", "--config.log_every_steps=2"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and launcher.poll() is None:
    if metrics.is_file() and sum("loss" in line for line in metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert launcher.poll() is None, launcher.stderr.read()[-3000:]
  second = subprocess.run(["pgrep", "-f", f"process_id=1 --workdir={workdir}"],
                          capture_output=True, text=True).stdout.split()
  assert len(second) == 1
  os.kill(int(second[0]), signal.SIGTERM)
  stdout, stderr = launcher.communicate(timeout=180)
  assert launcher.returncode == 0, stderr[-3000:]
  assert stdout.count("checkpoint saved, rerun the same command to resume") == 2
  (step,) = checkpoint.available_steps(workdir)
  assert step % 2 == 0
  data_state = checkpoint.checkpoint_dir(workdir) / str(step) / "data"
  assert len(list(data_state.glob("process_*-of-2.json"))) == 2


def test_bench_without_a_benchmark_lists_them_all(monkeypatch, capsys):
  from spcl_jax.bench import __main__ as bench_main  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "argv", ["bench"])
  assert bench_main.main() == 2
  usage = capsys.readouterr().err
  assert all(f"\n  {name} " in usage for name in bench_main.BENCHMARKS)


@pytest.mark.slow
def test_bench_command_line_dispatches_to_each_benchmark(tmp_path):
  bench = [sys.executable, "-m", "spcl_jax.bench"]
  usage = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert usage.returncode == 2 and all(b in usage.stderr for b in ("train", "input", "scaling"))
  train = subprocess.run([*bench, "train", "--config=configs/demo.py",
                          "--config.model.image_size=64", "--steps=2", "--warmup_steps=0",
                          "--memory_k=2", "--memory_gb=0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "images/s" in train.stdout and "compile + first step" in train.stdout
  assert "memory, k=2 (1 per micro-batch, 2 per device): peak" in train.stdout  # 8 devices
  assert "(XLA:CPU estimate)" in train.stdout
  scaling = subprocess.run([*bench, "scaling", "--devices=8,64", "--fabric=h100"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert scaling.returncode == 0, scaling.stderr[-3000:]
  assert "| 64 | 76800 |" in scaling.stdout  # vitb512: 1200 per device
  formats = subprocess.run([*bench, "input", "--formats", "--image-size", "64", "--seconds",
                            "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert formats.returncode == 0, formats.stderr[-3000:]
  assert json.loads(formats.stdout.strip().splitlines()[-1])["formats"]
