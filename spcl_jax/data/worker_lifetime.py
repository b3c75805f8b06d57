"""Grain's decoding worker processes end with the trainer, also when it is killed with -9, and
leave SIGTERM to it.

grain stops its workers when the iterator is closed, but a trainer killed with SIGKILL closes
nothing: its workers (and multiprocessing's resource tracker, which lives as long as they hold
its pipe) were re-parented to PID 1 and kept ~230 MB each, forever. Each worker therefore runs a
watchdog thread that exits the worker as soon as its parent is gone (its parent PID changes).

The parent's PID is taken in the parent, when the pipeline is built (`worker_init_fn`), and
handed to the worker: a worker still importing when its parent dies would otherwise read PID 1
as its parent and watch PID 1 forever. grain starts workers with multiprocessing's "spawn", so a
worker's parent is the process that built the pipeline.

SIGTERM sent to the whole process group (SLURM's scancel, most preemptions) reaches the workers
too; a worker it killed made the trainer fail with "Worker process was terminated unexpectedly"
instead of saving a checkpoint. Workers ignore it: the trainer checkpoints, then closes the
pipeline, which stops them (grain stops workers with an event, then SIGKILL, never SIGTERM).

Why not prctl(PR_SET_PDEATHSIG): Linux sends that signal when the *thread* that started the
worker exits, and grain starts workers from a pool thread, so a healthy worker could be killed
mid-run. Polling the parent PID has no such trap and works on every POSIX system.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable

POLL_SECONDS = 0.5


def _watch_parent(parent_pid: int) -> None:
  while True:
    time.sleep(POLL_SECONDS)
    if os.getppid() != parent_pid:
      os._exit(0)  # pylint: disable=protected-access  # no cleanup: the parent is gone


def exit_with_parent(worker_index: int = 0, worker_count: int = 1, *, parent_pid: int) -> None:
  """grain `worker_init_fn` (bind `parent_pid` with `worker_init_fn()`): starts the watchdog,
  which ends a worker whose parent died before it got here within POLL_SECONDS; the worker
  ignores SIGTERM from now on."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                   name="exit-with-parent").start()


def worker_init_fn() -> Callable[[int, int], None]:
  """`exit_with_parent` bound to this (the parent) process's PID; picklable for grain."""
  return functools.partial(exit_with_parent, parent_pid=os.getpid())
