"""Helpers of the run-safety tests (test_run_safety*.py): the trainer's CLI in-process, the
one-line error check, metrics and TensorBoard readers, and ways to corrupt a checkpoint."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import sys

import pytest
from absl import flags

from spcl_jax import main as train_cli
from spcl_jax.configs import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")
# 4 steps of the demo at 64 px, checkpoints at 2 and 4, every step logged, pair retrieval at
# 0, 2, 4 (the demo's probes at the first and last step).
BASE = ["--config.model.image_size=64", "--config.total_steps=4", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2", "--config.evals.retrieval.every_steps=2"]


def quick_config(**overrides):
  """BASE's run as a config object for train.train_and_evaluate, without evaluators."""
  config = demo.get_config()
  config.model.image_size = 64
  config.total_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.evals = {}
  config.update(overrides)
  return config


def call_main(*args: str) -> int:
  """`python -m spcl_jax.main --config=configs/demo.py ARGS` in this process; the exit code."""
  argv = ["spcl_jax.main", f"--config={DEMO}", *args]
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the previous parse's override flags; defined again below
  saved, sys.argv = sys.argv, argv  # ml_collections reads the --config.x overrides there
  try:
    with pytest.raises(SystemExit) as exit_info:
      train_cli.main(train_cli.parse_flags(argv))
  finally:
    sys.argv = saved
  return exit_info.value.code or 0


def run_main(capsys, *args: str) -> tuple[int, str, str]:
  code = call_main(*args)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def assert_one_error_line(err: str, fragment: str) -> None:
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and fragment in errors[0], err[-2000:]
  assert "Traceback" not in err


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def metric_keys(records: list[dict]) -> list[tuple[int, str]]:
  """(step, kind) of each row; the kind is the row's field names (train, or the evaluators')."""
  return [(r["step"], ",".join(sorted(r))) for r in records]


def tensorboard_scalars(workdir: pathlib.Path) -> list[tuple[str, int]]:
  """(tag, step) TensorBoard shows: files in order, a purge at step T hides earlier steps >= T."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  shown: list[tuple[str, int]] = []
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = [(tag, step) for tag, step in shown if step < event.step]
      for value in event.summary.value:
        shown.append((value.tag, event.step))
  return shown


# --- corrupting a checkpoint -----------------------------------------------------------------

def _largest(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_params(step_dir):
  data = _largest(step_dir / "params")
  data.write_bytes(data.read_bytes()[:1000])


def flip_params(step_dir):
  data = _largest(step_dir / "params")
  raw = bytearray(data.read_bytes())
  for i in range(2000, len(raw), 97):
    raw[i] ^= 0xFF
  data.write_bytes(bytes(raw))


def delete_opt_state(step_dir):
  shutil.rmtree(step_dir / "opt_state")


def truncate_meta(step_dir):
  meta = step_dir / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:5])


CORRUPTIONS = {
    # name: (how, a fragment of the message naming what is wrong)
    "truncated params": (truncate_params, "is unreadable"),
    "flipped params": (flip_params, "is unreadable"),
    "deleted item": (delete_opt_state, "opt_state"),
    "truncated meta/metadata": (truncate_meta, "'meta/metadata' is not valid JSON"),
}

