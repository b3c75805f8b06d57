"""Grain's worker processes never outlive a trainer killed with -9, whenever the kill lands:
while the workers are still importing (they are spawned: a second or more), and once they
serve batches. The pipeline runs alone in a subprocess (the trainer's `_with_workers`, without
a model), so each kill costs a Python start, not a compilation."""

import os
import signal
import subprocess
import sys
import time

import pytest

from test_run_safety_commands import alive, descendants

# Two workers serving an endless stream; prints "batch" once the first batches have arrived.
PIPELINE = """
import grain
from spcl_jax.data import pipeline
ds = grain.MapDataset.range(10**6).to_iter_dataset()
it = iter(pipeline._with_workers(ds, 2))
for _ in range({first_batches}):
  next(it)
print("batch", flush=True)
while True:
  next(it)
  time.sleep(0.01)
"""


def start_pipeline(first_batches: int = 1):
  """PIPELINE; "batch" once `first_batches` have arrived (grain takes them from its workers in
  turn, so 2 means each worker has started and served)."""
  program = "import time\n" + PIPELINE.format(first_batches=first_batches)
  return subprocess.Popen([sys.executable, "-c", program],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["workers importing", "workers serving"])
def test_a_killed_pipeline_leaves_no_process_behind(moment):
  proc = start_pipeline()
  try:
    if moment == "workers importing":
      # Kill as soon as the first worker exists: it has not run its init function yet.
      wait_for(lambda: len(descendants(proc.pid)) >= 2, "the worker processes")
    else:
      assert proc.stdout.readline().strip() == "batch", proc.stderr.read()[-2000:]
    children = descendants(proc.pid)
  finally:
    proc.kill()
    proc.communicate(timeout=30)
  assert children
  wait_for(lambda: not any(alive(pid) for pid in children), "no orphan", timeout=15)


@pytest.mark.slow
def test_workers_serving_outlive_a_sigterm_the_trainer_handles():
  """SIGTERM to the process group (scancel) reaches the workers too: they ignore it, so the
  trainer can still read batches while it checkpoints; it stops them itself afterwards."""
  proc = start_pipeline(first_batches=4)
  try:
    assert proc.stdout.readline().strip() == "batch", proc.stderr.read()[-2000:]
    workers = descendants(proc.pid)
    for pid in workers:
      os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)  # a worker that obeys SIGTERM is gone well before
    survivors = [pid for pid in workers if alive(pid)]
  finally:
    proc.kill()
    proc.communicate(timeout=30)
  assert workers and set(survivors) == workers


# A worker's init function, run in a process whose parent is (or is not) the PID it was given.
WORKER = """
import sys, time
from spcl_jax.data import worker_lifetime
worker_lifetime.exit_with_parent(parent_pid={parent_pid})
print("watching", flush=True)
time.sleep(30)
sys.exit(3)
"""


def test_the_parent_pid_is_taken_in_the_parent_and_a_worker_whose_parent_is_gone_exits():
  """The init function carries the builder's PID; a worker whose parent is not that PID (it
  died while the worker imported) exits within a poll; one whose parent lives stays, and
  ignores SIGTERM."""
  from spcl_jax.data import worker_lifetime  # pylint: disable=g-import-not-at-top
  assert worker_lifetime.worker_init_fn().keywords == {"parent_pid": os.getpid()}
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  orphan, kept = (subprocess.Popen([sys.executable, "-c", WORKER.format(parent_pid=pid)],
                                   stdout=subprocess.PIPE, text=True, env=env)
                  for pid in (1, os.getpid()))
  try:
    for proc in (orphan, kept):
      assert proc.stdout.readline().strip() == "watching"
    assert orphan.wait(timeout=10 * worker_lifetime.POLL_SECONDS) == 0
    kept.send_signal(signal.SIGTERM)
    time.sleep(3 * worker_lifetime.POLL_SECONDS)
    assert kept.poll() is None
  finally:
    for proc in (orphan, kept):
      proc.kill()
      proc.communicate(timeout=30)
