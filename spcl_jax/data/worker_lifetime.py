"""Grain's decoding worker processes end with the trainer, also when it is killed with -9.

grain stops its workers when the iterator is closed, but a trainer killed with SIGKILL closes
nothing: its workers (and multiprocessing's resource tracker, which lives as long as they hold
its pipe) were re-parented to PID 1 and kept ~230 MB each, forever. Each worker therefore runs a
watchdog thread that exits the worker as soon as its parent is gone (its parent PID changes).

Why not prctl(PR_SET_PDEATHSIG): Linux sends that signal when the *thread* that started the
worker exits, and grain starts workers from a pool thread, so a healthy worker could be killed
mid-run. Polling the parent PID has no such trap and works on every POSIX system.
"""

from __future__ import annotations

import os
import threading
import time

POLL_SECONDS = 0.5


def _watch_parent(parent_pid: int) -> None:
  while True:
    time.sleep(POLL_SECONDS)
    if os.getppid() != parent_pid:
      os._exit(0)  # pylint: disable=protected-access  # no cleanup: the parent is gone


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
  """grain `worker_init_fn`: starts the watchdog in the worker process."""
  del worker_index, worker_count
  threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True,
                   name="exit-with-parent").start()
