"""SIGTERM handling shared by every training loop (pre-training, fine-tuning).

Preemption (a spot VM, SLURM's scancel, a plain kill) sends SIGTERM; a loop that checks
`StopRequest.should_stop(step)` checkpoints at that step and returns, so rerunning the same
command resumes exactly.
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopRequest:
  """SIGTERM (preemption, scancel, kill) asks the loop to checkpoint and return cleanly.

  With several processes, all must stop at the same step (the checkpoint is a collective), but
  a signal may reach only some of them: they agree with an all-gather of the flag every
  `agree_every` steps, so one signalled process stops the job within that many steps.
  """

  def __init__(self, agree_every: int = 1):
    self.requested = False
    self.agree_every = agree_every
    self._previous = None

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self.agree_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    self.requested = bool(np.any(flags))
    return self.requested

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if self.requested:  # a second signal must not cut the save short
        print(f"received signal {signum} again: still saving the checkpoint", flush=True)
        return
      self.requested = True
      print(f"received signal {signum}: saving a checkpoint and stopping", flush=True)
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a test runner's worker): no handler
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
