"""The pieces of predictions, predict and the report page that need no trained model."""

import base64
import pathlib

import numpy as np
import pytest

import data_fixtures as fx
from spcl_jax import predict
from spcl_jax.finetune import predictions
from spcl_jax.inference import images
from spcl_jax.report import html_page, tables


def test_sigmoid_is_float64_and_stable_at_large_logits():
  logits = np.array([-800.0, -40.0, -1.5, 0.0, 2.0, 40.0, 800.0], np.float32)
  expected = [0.0, np.exp(-40.0) / (1 + np.exp(-40.0)), 1 / (1 + np.exp(1.5)), 0.5,
              1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-40.0)), 1.0]
  with np.errstate(over="raise"):
    got = predictions.sigmoid(logits)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
  assert got[1] > 0  # far-negative logits keep their order (no underflow to a tie at 0)


def test_rows_that_do_not_align_are_an_error_not_a_shifted_file():
  with pytest.raises(ValueError, match="do not align"):
    predictions.classification_rows(["a", "b"], ["1", "2"], np.zeros((2, 1)), np.zeros((3, 1)),
                                    ["x"])
  with pytest.raises(ValueError, match="do not align"):
    predictions.segmentation_rows(["a"], ["1", "2"], np.zeros((1, 3)), 8)
  header, rows = predictions.segmentation_rows(["a"], ["p"], np.array([[3, 4, 16]]), 8)
  assert header[2:] == ["intersection", "true_pixels", "predicted_pixels", "predicted_area"]
  assert rows == [["a", "p", "3", "4", "16", "0.25"]]


def test_a_classification_csv_reads_back_exactly(tmp_path):
  logits = np.array([[0.1, -3.0], [1e-7, 2.5]], np.float32)
  header, rows = predictions.classification_rows(["a.png", "b.png"], ["1", "2"],
                                                 np.array([[1, 0], [0, 1]]), logits, ["A", "B"])
  (tmp_path / "p.csv").write_text(predictions.csv_text(header, rows))
  table = predictions.read_classification_csv(tmp_path / "p.csv")
  assert table["classes"] == ["A", "B"] and table["names"] == ["a.png", "b.png"]
  np.testing.assert_array_equal(table["probs"], predictions.sigmoid(logits))


def test_images_from_a_folder_a_list_and_a_csv(tmp_path):
  for name in ("b/2.png", "a.jpg", "c.dcm", "notes.txt"):
    (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "in" / name).write_bytes(b"x")
  assert images.list_images(str(tmp_path / "in")) == [
      tmp_path / "in" / n for n in ("a.jpg", "b/2.png", "c.dcm")]
  (tmp_path / "in/l.txt").write_text("# mine\na.jpg\n\nb/2.png\n")
  assert images.list_images(str(tmp_path / "in/l.txt")) == [tmp_path / "in/a.jpg",
                                                             tmp_path / "in/b/2.png"]
  (tmp_path / "in/l.csv").write_text("id,path\n1,c.dcm\n")
  assert images.list_images(str(tmp_path / "in/l.csv")) == [tmp_path / "in/c.dcm"]
  with pytest.raises(ValueError, match="a folder, a .txt list or a .csv"):
    images.list_images(str(tmp_path / "in/a.jpg"))


def test_a_dicom_is_found_by_its_marker_without_a_suffix(tmp_path):
  (tmp_path / "scan").write_bytes(fx.dicom_bytes(np.zeros((64, 64), np.uint16)))
  fx.write_png(tmp_path / "x.png", np.zeros((64, 64), np.uint8))
  assert images.image_format(tmp_path / "scan") == "dicom"
  assert images.image_format(tmp_path / "x.png") == "file"
  assert images.image_format(tmp_path / "absent") == "file"


def test_mask_names_are_unique():
  paths = [pathlib.Path(p) for p in ("a/x.dcm", "b/x.dcm", "c/y.png")]
  assert predict._mask_names(paths) == ["x_0.png", "x_1.png", "y.png"]


def test_report_page_embeds_every_figure(tmp_path):
  fx.write_png(tmp_path / "f.png", np.full((8, 8), 7, np.uint8))
  table = tables.Table("t", "T <1>", ["Method", "x"], [["m", tables.Score(0.5)]], ["n & b"])
  page = html_page.render([table], [{"title": "run", "results": "r.json",
                                     "figures": {"roc": tmp_path / "f.png"}}], ["skipped x"])
  assert base64.b64encode((tmp_path / "f.png").read_bytes()).decode() in page
  assert "T &lt;1&gt;" in page and "<td>50.0</td>" in page and "n &amp; b" in page
