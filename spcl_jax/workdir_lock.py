"""WORKDIR/lock.json: one training run per workdir.

Two runs on one workdir would interleave their metrics and race on the same checkpoint steps
(orbax then fails with "Directory not empty" and leaves tmp folders). The run holds an exclusive
`flock` on lock.json, which records the holder (host, PID, start time). The kernel drops the
lock when its holder dies, even by kill -9, so a dead holder never blocks the next start: the
next run takes the lock over and says whose it was. A second run while the holder lives exits at
once naming it. The file is emptied, not removed, on release: removing it would let a third run
lock a new file while a second still waits on the old one.

Only process 0 of a multi-process job takes the lock (it alone writes the shared files).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
from typing import Any

FILENAME = "lock.json"


class WorkdirLockedError(OSError):
  """Another live run holds the workdir."""


def _describe(holder: dict[str, Any]) -> str:
  return (f"PID {holder.get('pid')} on host {holder.get('host')!r}, started "
          f"{holder.get('started')}")


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock for the run; released on exit, also on errors."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self.path = pathlib.Path(workdir) / FILENAME
    self.me = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds")}
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _holder(self, fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
      holder = json.loads(text) if text else {}
    except ValueError:
      holder = {"unreadable": text[:80]}
    return holder if isinstance(holder, dict) else {}

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._holder(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f"{str(self.path)!r}: the workdir is in use by {_describe(holder)}; wait for that "
          "run, stop it, or use another --workdir") from None
    previous = self._holder(fd)
    if previous:  # a holder that ended without releasing: killed, or its machine went down
      print(f"taking over the workdir lock of a run that is gone ({_describe(previous)})",
            flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(self.me) + "\n").encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    os.ftruncate(fd, 0)  # empty = released cleanly (no takeover message next time)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
