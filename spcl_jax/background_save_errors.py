"""A failed checkpoint save is one line (`checkpoint.SaveFailedError`, raised by `checkpoint.wait`
in the main thread); the same failure also surfaces in orbax's, asyncio's and tensorstore's
background threads, each with a traceback (hundreds of lines for a full disk). `quieted()`
keeps those out of the output while a run saves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from spcl_jax.checkpoint import SaveFailedError


class _BackgroundSaveErrors(logging.Filter):
  """What a failed save's background writes log, a traceback each (~190 lines for a full disk):
  orbax's threads (through absl) and asyncio's futures of writes whose error nobody reads.
  `wait` raises the failure again in the main thread, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    unread_write = (record.name == "asyncio"
                    and "exception was never retrieved" in record.getMessage())
    return not (from_orbax or unread_write)


def _without_closed_loop_callbacks(hook: Callable[[Any], None]) -> Callable[[Any], None]:
  """`hook`, minus tensorstore finishing a write for an asyncio loop that orbax closed when the
  save failed: each such write prints a traceback through sys.unraisablehook."""

  def unraisable_hook(unraisable: Any) -> None:
    if not (issubclass(unraisable.exc_type, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)

  return unraisable_hook


def _ignore_late_error(error: Any) -> None:
  del error


_QUIETED_LOGGERS = ("absl", "asyncio")  # orbax logs through absl.logging


@contextlib.contextmanager
def quieted() -> Iterator[None]:
  """While a run saves: a failed save's background errors stay out of the output (`wait`
  names the save). After a SaveFailedError the quiet stays on, and errors of threads and
  unraisable ones are dropped: the failed save's other writes end later, and files flush at
  exit, each failing with a traceback, while the command ends."""
  quiet = _BackgroundSaveErrors()
  previous_hook = sys.unraisablehook
  for name in _QUIETED_LOGGERS:
    logging.getLogger(name).addFilter(quiet)
  sys.unraisablehook = _without_closed_loop_callbacks(previous_hook)
  save_failed = False
  try:
    yield
  except SaveFailedError:
    save_failed = True
    # The command ends on a full disk: what still writes after the line (TensorBoard's events
    # at exit, and its writer thread then) fails too, each failure with a traceback.
    sys.unraisablehook = threading.excepthook = _ignore_late_error
    raise
  finally:
    if not save_failed:
      for name in _QUIETED_LOGGERS:
        logging.getLogger(name).removeFilter(quiet)
      sys.unraisablehook = previous_hook
