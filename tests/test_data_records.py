import io
import json

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from spcl_jax.data import decode, prepare
from spcl_jax.data.datasets import records
from spcl_jax.data.prepared_folder import PreparedSource


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode="L").save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


def test_scaled_jpeg_decoding_matches_full_decode_and_resize():
  data = _jpeg(fx.gradient(400, 320, 3))
  settings = records.EncodeSettings(image_size=64)
  fast = records.decode_file(data, "big.jpg", settings).astype(int)
  full = decode.decode_image({"name": "big.jpg", "encoded": data}, 64).astype(int)
  assert fast.shape == (64, 64)
  assert np.abs(fast - full).mean() < 1.0 and np.abs(fast - full).max() <= 8


def test_truncated_jpeg_error_names_the_file():
  data = _jpeg(fx.gradient(400, 320, 3))
  with pytest.raises(ValueError, match="cut.jpg"):
    records.decode_file(data[: len(data) // 3], "cut.jpg", records.EncodeSettings(64))


def test_settings_are_validated():
  with pytest.raises(ValueError, match="--encoding 'webp'"):
    records.EncodeSettings(encoding="webp")
  with pytest.raises(ValueError, match="--image-size 4"):
    records.EncodeSettings(image_size=4)
  with pytest.raises(ValueError, match="--min-side 0"):
    records.EncodeSettings(min_side=0)


def test_images_below_the_minimum_side_are_too_small_and_the_minimum_is_a_setting(tmp_path):
  fx.write_png(tmp_path / "wide.png", fx.gradient(20, 300, 1))
  task = (0, "wide.png", "wide", ())
  records.init_worker(str(tmp_path), "file", records.EncodeSettings(image_size=32))
  assert records.process_entry(task) == (
      0, None, "too_small", f"{str(tmp_path / 'wide.png')!r} is 300x20 px, a side below "
      "--min-side 64")
  records.init_worker(str(tmp_path), "file", records.EncodeSettings(image_size=32, min_side=20))
  key, payload, kind, _ = records.process_entry(task)
  assert (key, kind) == (0, "") and set(payload) == {"image"}


def test_interrupted_preparation_is_redone_from_scratch(tmp_path):
  raw = tmp_path / "raw"
  fx.write_csv(raw / "Data_Entry_2017.csv", fx.NIH_HEADER,
               [fx.nih_row(f"0000000{i}_000.png", "Mass", i) for i in range(1, 5)])
  for i in range(1, 5):
    fx.write_png(raw / f"images/0000000{i}_000.png", fx.gradient(64, 64, i))
  argv = ["nih_chestxray14", "--src", str(raw), "--out", str(tmp_path / "out"),
          "--image-size", "16", "--workers", "1"]
  prepare.main(argv)
  # Simulate a crash after TFDS finished but before report.json: the leftovers are not trusted.
  report = json.loads((tmp_path / "out/report.json").read_text())
  (tmp_path / "out/report.json").unlink()
  (tmp_path / "out/records.csv").write_text("index,name,patient,view,labels\n")
  stale = tmp_path / "out/tfds/spcl_nih_chestxray14/1.0.0.incomplete123"
  stale.mkdir()
  prepare.main(argv)
  assert not stale.exists()
  again = json.loads((tmp_path / "out/report.json").read_text())
  assert again["counts"] == report["counts"] == {"metadata_images": 4, "selected": 4,
                                                 "records": 4}
  assert len(PreparedSource(tmp_path / "out")) == 4
