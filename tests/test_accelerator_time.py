"""accelerator_time.json: devices x wall time, summed over restarts (the trainer's hooks are
tested in test_train.py on its restarted run)."""

import pytest

from spcl_jax import accelerator_time


class FakeClock:
  def __init__(self, now: float):
    self.now = now

  def __call__(self) -> float:
    return self.now


def test_sessions_add_up_with_their_own_device_counts(tmp_path):
  clock = FakeClock(100.0)
  first = accelerator_time.AcceleratorClock(tmp_path, num_devices=8, device_kind="TPU v4",
                                            clock=clock)
  clock.now = 110.0
  assert first.update()["accelerator_seconds"] == pytest.approx(80.0)
  clock.now = 130.0  # killed here without a final update: the last 20 s are lost
  # A restart on 4 devices of another kind.
  clock.now = 1000.0
  second = accelerator_time.AcceleratorClock(tmp_path, num_devices=4, device_kind="NVIDIA H200",
                                             process_count=2, clock=clock)
  clock.now = 1010.5
  second.update()
  record = accelerator_time.read_accelerator_time(tmp_path)
  assert record["accelerator_seconds"] == pytest.approx(8 * 10.0 + 4 * 10.5)
  assert record["wall_seconds"] == pytest.approx(20.5)
  assert record["device_kind"] == "mixed" and record["num_devices"] == 4
  assert [s["device_kind"] for s in record["sessions"]] == ["TPU v4", "NVIDIA H200"]
  assert record["sessions"][1]["process_count"] == 2


def test_other_processes_do_not_write(tmp_path):
  clock = accelerator_time.AcceleratorClock(tmp_path, num_devices=8, device_kind="cpu",
                                            enabled=False)
  clock.update()
  assert accelerator_time.read_accelerator_time(tmp_path) is None


def test_a_broken_file_is_named(tmp_path):
  (tmp_path / accelerator_time.FILENAME).write_text('{"sessions": []}')
  with pytest.raises(ValueError, match="accelerator_time.json.*accelerator_seconds"):
    accelerator_time.read_accelerator_time(tmp_path)
