"""`python -m spcl_jax.main` as a user runs it, in a subprocess."""

import json
import pathlib
import signal
import subprocess
import sys
import time

from spcl_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "spcl_jax.main", "--config=configs/demo.py", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_three_demo_steps_write_metrics_and_a_checkpoint(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--config.total_steps=3",
                    "--config.model.image_size=64")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 3]
  assert checkpoint.available_steps(tmp_path) == [3]
  assert (tmp_path / "config.json").is_file()
  assert "step 3/3" in result.stdout and "done:" in result.stdout


def test_bad_override_exits_non_zero_with_one_line(tmp_path):
  for override, words in (("--config.spcl.mask_ratio=1.5", "config.spcl.mask_ratio=1.5"),
                          ("--config.no_such_field=1", "no_such_field"),
                          ("--config.batch_size=many", "batch_size")):
    result = run_main(f"--workdir={tmp_path}", override)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


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
