"""Sources, decoding and the grain pipeline."""

import io
import sys

import numpy as np
import pytest
from PIL import Image

from spcl_jax.configs import demo
from spcl_jax.data import decode, pipeline, sources


def write_png(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode=mode).save(path)


def test_bundled_sample_has_the_16_real_cxrs_and_their_attribution():
  src = sources.open_source("sample")
  assert len(src) == 16
  names = [src[i]["name"] for i in range(16)]
  assert sum(n.startswith("NORMAL") for n in names) == 8
  assert "CC BY 4.0" in (sources.SAMPLE_DIR / "ATTRIBUTION.md").read_text()
  image = decode.decode_image(src[0], 512)
  assert image.shape == (512, 512) and image.dtype == np.uint8 and 20 < image.mean() < 235


def test_folder_source_finds_images_recursively_in_sorted_order(tmp_path):
  rng = np.random.default_rng(0)
  write_png(tmp_path / "b" / "x.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
  write_png(tmp_path / "a.png", rng.integers(0, 255, (8, 8), dtype=np.uint8))
  Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "c.JPEG")
  (tmp_path / "notes.txt").write_text("not an image")
  src = sources.open_source(f"folder:{tmp_path},min_side=8")
  assert [src[i]["name"] for i in range(len(src))] == ["a.png", "b/x.png", "c.JPEG"]


def test_folder_image_below_the_minimum_side_is_an_error_naming_it(tmp_path):
  write_png(tmp_path / "a_ok.png", np.zeros((64, 80), np.uint8))
  write_png(tmp_path / "b_dot.png", np.zeros((1, 1), np.uint8))
  write_png(tmp_path / "c_thin.png", np.zeros((200, 63), np.uint8))
  src = sources.open_source(f"folder:{tmp_path}")  # Default minimum: 64 px.
  assert src[0]["name"] == "a_ok.png"
  with pytest.raises(ValueError, match=r"b_dot.png' is 1x1 px, a side below the minimum 64"):
    src[1]
  with pytest.raises(ValueError, match=r"c_thin.png' is 63x200 px"):
    src[2]
  lowered = sources.open_source(f"folder:{tmp_path},min_side=63")
  assert lowered[2]["name"] == "c_thin.png"
  with pytest.raises(ValueError, match="b_dot.png"):
    lowered[1]
  with pytest.raises(ValueError, match="min_side='x'"):
    sources.open_source(f"folder:{tmp_path},min_side=x")


def test_prepared_is_a_built_in_source_whose_import_errors_surface(monkeypatch):
  assert sources.source_kinds() == ["folder", "prepared", "sample"]
  import spcl_jax.data  # pylint: disable=g-import-not-at-top
  monkeypatch.delattr(spcl_jax.data, "prepared", raising=False)
  monkeypatch.setitem(sys.modules, "spcl_jax.data.prepared", None)  # its import now fails
  with pytest.raises(ImportError):
    sources.open_source("prepared:/data/prepared/nih")


def test_sixteen_bit_png_is_scaled_by_its_full_code_range(tmp_path):
  values = np.array([[0, 65535], [32768, 16384]], dtype=np.uint16)
  path = tmp_path / "deep.png"
  Image.fromarray(values).save(path)  # PIL writes a 16-bit grayscale PNG from uint16
  out = decode.decode_image({"name": "deep.png", "encoded": path.read_bytes()}, 2)
  np.testing.assert_array_equal(out, np.rint(values / 65535 * 255).astype(np.uint8))


def test_eight_bit_and_colour_images_decode_to_grayscale(tmp_path):
  gray = np.full((4, 4), 100, np.uint8)
  buf = io.BytesIO()
  Image.fromarray(np.stack([gray] * 3, -1)).save(buf, format="PNG")
  out = decode.decode_image({"name": "rgb.png", "encoded": buf.getvalue()}, 4)
  np.testing.assert_array_equal(out, gray)
  out = decode.decode_image({"name": "arr", "image": np.full((4, 4), 0.5, np.float32)}, 4)
  np.testing.assert_array_equal(out, np.full((4, 4), 128, np.uint8))


def test_bad_input_names_the_file_or_field(tmp_path):
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  src = sources.open_source(f"folder:{tmp_path}")
  with pytest.raises(ValueError, match="broken.png"):
    decode.decode_image(src[0], 64)
  with pytest.raises(ValueError, match="config.data.source.*does not exist"):
    sources.open_source(f"folder:{tmp_path / 'missing'}")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .* files found"):
    sources.open_source(f"folder:{tmp_path / 'empty'}")
  with pytest.raises(ValueError, match="unknown source kind 'ftp'"):
    sources.open_source("ftp:somewhere")


def small_config(**data):
  config = demo.get_config()
  config.batch_size = 4
  config.model.image_size = 32
  config.data.update(data)
  return config


def test_pipeline_resumes_exactly_from_its_saved_state():
  config = small_config()
  it = iter(pipeline.train_dataset(config))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  resumed = iter(pipeline.train_dataset(config))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)


def test_every_epoch_is_a_new_permutation_of_all_images():
  config = small_config()
  config.model.image_size = 16
  it = iter(pipeline.train_dataset(config))
  epochs = [np.concatenate([next(it) for _ in range(4)]) for _ in range(2)]
  reference = np.stack([decode.decode_image(sources.open_source("sample")[i], 16)
                        for i in range(16)])
  orders = []
  for epoch in epochs:
    order = [int(np.flatnonzero((reference == img).all(axis=(1, 2)))[0]) for img in epoch]
    assert sorted(order) == list(range(16))   # each image exactly once per epoch
    orders.append(order)
  assert orders[0] != orders[1] and orders[0] != list(range(16))


def test_processes_take_contiguous_blocks_of_the_same_global_batch():
  config = small_config()
  whole = iter(pipeline.train_dataset(config))
  parts = [iter(pipeline.train_dataset(config, process_index=p, process_count=2))
           for p in range(2)]
  for _ in range(5):
    global_batch = next(whole)
    assembled = np.concatenate([next(part) for part in parts])
    np.testing.assert_array_equal(assembled, global_batch)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream():
  config = small_config(num_workers=2)
  with_workers = iter(pipeline.train_dataset(config))
  in_process = iter(pipeline.train_dataset(small_config()))
  try:
    for _ in range(5):
      np.testing.assert_array_equal(next(with_workers), next(in_process))
  finally:
    with_workers.close()  # stop the worker processes now, not at garbage collection


def test_eval_set_needs_one_batch_of_distinct_images():
  config = small_config()
  assert pipeline.eval_num_batches(config, 16, max_batches=10) == 4
  assert pipeline.eval_num_batches(config, 16, max_batches=2) == 2
  config.batch_size = 32
  with pytest.raises(ValueError, match="config.batch_size=32"):
    pipeline.eval_num_batches(config, 16, max_batches=10)
