"""WORKDIR/accelerator_time.json: how much accelerator time a run has used, across restarts.

accelerator-seconds = devices x wall-clock seconds, summed over every session (start or resume)
of the run in that workdir. Wall time runs from the start of `train_and_evaluate` (compilation,
data start-up and checkpointing included: the devices are held all along) to the last update.
The file is rewritten at every log step and at the end, so a run killed without warning loses
at most one log interval. Only process 0 writes; it counts the devices of every process.

  {"accelerator_seconds": float, "wall_seconds": float, "device_kind": str, "num_devices": int,
   "sessions": [{"started": ISO time, "wall_seconds": float, "num_devices": int,
                 "device_kind": str, "process_count": int}, ...]}

Top-level `device_kind` and `num_devices` are the latest session's; `device_kind` is "mixed"
when sessions ran on different kinds (each session keeps its own).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

from spcl_jax.workdir_path import as_path, rewrite_text

FILENAME = "accelerator_time.json"


def read_accelerator_time(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """The run's record, or None when the workdir has none (a run from before this file)."""
  path = as_path(workdir) / FILENAME
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
    float(record["accelerator_seconds"])
    list(record["sessions"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{str(path)!r} is not an accelerator-time record: {e}") from e
  return record


class AcceleratorClock:
  """Counts this session's devices x wall time on top of what earlier sessions recorded."""

  def __init__(self, workdir: str | pathlib.Path, *, num_devices: int, device_kind: str,
               process_count: int = 1, enabled: bool = True,
               clock: Callable[[], float] = time.monotonic):
    self.path = as_path(workdir) / FILENAME
    self.enabled = enabled
    self._clock = clock
    self._start = clock()
    previous = read_accelerator_time(self.path.parent) if enabled else None
    self._earlier_sessions = list(previous["sessions"]) if previous else []
    self._session = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": 0.0, "num_devices": int(num_devices), "device_kind": str(device_kind),
        "process_count": int(process_count)}

  @classmethod
  def for_this_job(cls, workdir: str | pathlib.Path) -> "AcceleratorClock":
    """The clock of the running JAX job: global device count and kind, written by process 0."""
    import jax  # pylint: disable=g-import-not-at-top
    return cls(workdir, num_devices=jax.device_count(), device_kind=jax.devices()[0].device_kind,
               process_count=jax.process_count(), enabled=jax.process_index() == 0)

  def record(self) -> dict[str, Any]:
    sessions = [*self._earlier_sessions, self._session]
    kinds = {s["device_kind"] for s in sessions}
    return {
        "accelerator_seconds": sum(s["wall_seconds"] * s["num_devices"] for s in sessions),
        "wall_seconds": sum(s["wall_seconds"] for s in sessions),
        "device_kind": self._session["device_kind"] if len(kinds) == 1 else "mixed",
        "num_devices": self._session["num_devices"],
        "sessions": sessions,
    }

  def update(self) -> dict[str, Any]:
    """Brings this session's wall time up to now and rewrites the file (atomically)."""
    self._session["wall_seconds"] = max(0.0, self._clock() - self._start)
    record = self.record()
    if self.enabled:
      rewrite_text(self.path, json.dumps(record, indent=2) + "\n")
    return record
