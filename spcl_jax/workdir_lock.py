"""WORKDIR/lock.json: one training run per workdir.

Two runs on one workdir would interleave their metrics and race on the same checkpoint steps
(orbax then fails with "Directory not empty" and leaves tmp folders). The run holds an exclusive
`flock` on lock.json, which records the holder (host, PID, start time). The kernel drops the
lock when its holder dies, even by kill -9, so a dead holder never blocks the next start: the
next run takes the lock over and says whose it was. A second run while the holder lives exits at
once naming it. The file is emptied, not removed, on release: removing it would let a third run
lock a new file while a second still waits on the old one.

On an object store (a `gs://` workdir) there is no flock: the lock is a lease. lock.json names
the holder and an expiry time, which a thread of the holder pushes forward every third of
LEASE_SECONDS; a start finding an unexpired lease exits naming its holder, one finding an
expired lease (the holder was killed) takes it over. The lease is as safe as the clocks agree
and two starts within the same second are not told apart: it guards against the usual mistake
(a second run started by hand, a restarted job while the old one still runs), not against races.

Only process 0 of a multi-process job takes the lock (it alone writes the shared files).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
import threading
import time
from typing import Any

from spcl_jax.workdir_path import as_path, is_url

FILENAME = "lock.json"
# A killed run on an object-store workdir blocks the next start for at most this long.
LEASE_SECONDS = 120.0


class WorkdirLockedError(OSError):
  """Another live run holds the workdir."""


def _describe(holder: dict[str, Any]) -> str:
  return (f"PID {holder.get('pid')} on host {holder.get('host')!r}, started "
          f"{holder.get('started')}")


def WorkdirLock(workdir: str | os.PathLike[str], **lease_options: Any
                ) -> FlockWorkdirLock | LeaseWorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock for the run; released on exit, also on errors.

  A flock on a local (or NFS) folder, a lease on an object-store URL.
  """
  if is_url(workdir):
    return LeaseWorkdirLock(workdir, **lease_options)
  return FlockWorkdirLock(workdir)


def _me() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class FlockWorkdirLock:
  """lock.json held with an exclusive flock (the kernel drops it when the holder dies)."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self.path = pathlib.Path(workdir).expanduser() / FILENAME
    self.me = _me()
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


class LeaseWorkdirLock:
  """lock.json on an object store: the holder and the time its lease expires, kept renewed."""

  def __init__(self, workdir: str | os.PathLike[str], lease_seconds: float = LEASE_SECONDS):
    self.path = as_path(workdir) / FILENAME
    self.me = _me()
    self.lease_seconds = lease_seconds
    self._renewer: threading.Thread | None = None
    self._stop = threading.Event()

  @property
  def held(self) -> bool:
    return self._renewer is not None

  def _holder(self) -> dict[str, Any]:
    try:
      text = self.path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
      return {}
    try:
      holder = json.loads(text) if text else {}
    except ValueError:
      holder = {"unreadable": text[:80]}
    return holder if isinstance(holder, dict) else {}

  def _write_lease(self) -> None:
    self.path.write_text(json.dumps(
        {**self.me, "lease_until": time.time() + self.lease_seconds}) + "\n", encoding="utf-8")

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    holder = self._holder()
    expires = holder.get("lease_until")
    if isinstance(expires, (int, float)) and expires > time.time():
      until = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
      raise WorkdirLockedError(
          f"{str(self.path)!r}: the workdir is in use by {_describe(holder)} (its lease runs "
          f"until {until.isoformat(timespec='seconds')}, renewed while it runs); wait for that "
          "run, stop it, or use another --workdir")
    if holder:
      print(f"taking over the workdir lock of a run that is gone ({_describe(holder)}; its "
            "lease expired)", flush=True)
    self._write_lease()
    self._stop.clear()
    self._renewer = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._renewer.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_seconds / 3):
      try:
        self._write_lease()
      except OSError as e:  # a network blip: the next renewal tries again
        print(f"WARNING: could not renew the workdir lease {str(self.path)!r}: {e}", flush=True)

  def release(self) -> None:
    if self._renewer is None:
      return
    self._stop.set()
    self._renewer.join()
    self._renewer = None
    self.path.write_text("", encoding="utf-8")  # empty = released cleanly

  def __enter__(self) -> LeaseWorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
