"""accelerator_time.json: devices x wall time, summed over restarts, written while training."""

import json

import pytest

from configs import demo
from spcl_jax import accelerator_time, train


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


def test_training_writes_at_every_log_step_on_top_of_earlier_sessions(tmp_path, monkeypatch):
  """The trainer's hooks: a session recorded before (a restart) plus this one's log steps."""
  earlier = accelerator_time.AcceleratorClock(tmp_path, num_devices=4, device_kind="TPU v4",
                                              clock=FakeClock(0.0))
  earlier._clock = FakeClock(50.0)  # pylint: disable=protected-access
  earlier.update()  # 4 devices x 50 s = 200 accelerator-seconds before this session
  updates = []
  original_update = accelerator_time.AcceleratorClock.update

  def counting_update(self):
    record = original_update(self)
    updates.append(record["accelerator_seconds"])
    return record

  monkeypatch.setattr(accelerator_time.AcceleratorClock, "update", counting_update)
  # Evaluation plays no part here: skip its compilation, the slowest part of this test.
  monkeypatch.setattr(train, "_evaluate", lambda *args: {"eval_loss": 0.0})
  config = demo.get_config()
  config.model.image_size = 64
  config.total_steps = 2
  config.log_every_steps = 1
  train.train_and_evaluate(config, str(tmp_path))
  # Log lines at steps 1 and 2, then the final update: each rewrote the file.
  assert len(updates) == 3 and updates == sorted(updates) and updates[0] > 200.0
  record = json.loads((tmp_path / accelerator_time.FILENAME).read_text())
  assert record["accelerator_seconds"] == updates[-1]
  assert [s["num_devices"] for s in record["sessions"]] == [4, 8]
  assert record["device_kind"] == "mixed" and record["sessions"][1]["device_kind"] == "cpu"
  assert record["accelerator_seconds"] == pytest.approx(
      200.0 + 8 * record["sessions"][1]["wall_seconds"])
