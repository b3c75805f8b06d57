"""MIMIC-CXR-JPG as a pre-training source (`prepared:`), and the input benchmark on it."""

import json

import numpy as np
import pytest

import data_fixtures as fx
from spcl_jax.data import decode, prepare, sources
from spcl_jax.data.prepared import parse_argument

MIMIC_ROWS = [("a1", 10000032, 50414267, "PA"), ("a2", 10000032, 50414267, "LATERAL"),
              ("b1", 10000764, 57375967, "AP"), ("b2", 10000764, 57375967, ""),
              ("c1", 19999442, 58708861, "AP"), ("c2", 19999442, 58708861, "LL")]


@pytest.fixture(scope="module")
def mimic_all_views(tmp_path_factory):
  root = tmp_path_factory.mktemp("mimic")
  fx.write_mimic(root / "raw", MIMIC_ROWS)
  assert prepare.main(["mimic_cxr_jpg", "--src", str(root / "raw"), "--out", str(root / "out"),
                       "--image-size", "32", "--workers", "1", "--views", "all"]) == 0
  return root / "out"


def test_prepared_source_frontal_by_default_all_on_request(mimic_all_views):
  frontal = sources.open_source(f"prepared:{mimic_all_views}")
  assert [frontal[i]["name"].split("/")[-1] for i in range(len(frontal))] == \
      ["a1.jpg", "b1.jpg", "c1.jpg"]
  every = sources.open_source(f"prepared:{mimic_all_views},views=all")
  assert len(every) == 6
  image = decode.decode_image(every[0], 32)
  assert image.shape == (32, 32) and image.dtype == np.uint8
  report = json.loads((mimic_all_views / "report.json").read_text())
  assert sorted(report["splits"]) == ["all.txt"]  # Pre-training only: no 7:2:1 split.


def test_frontal_preparation_counts_blank_and_lateral_views(tmp_path, capsys):
  fx.write_mimic(tmp_path / "raw", MIMIC_ROWS)
  prepare.main(["mimic_cxr_jpg", "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                "--image-size", "32", "--workers", "1"])
  report = json.loads((tmp_path / "out/report.json").read_text())
  assert report["counts"]["records"] == 3
  assert [i["name"].split("/")[-1] for i in report["problems"]["blank_view"]["items"]] == ["b2.jpg"]
  assert report["problems"]["non_frontal"]["count"] == 2
  assert "blank_view: 1" in capsys.readouterr().out


@pytest.mark.parametrize("argument, message", [
    ("", "needs a folder"), ("/x,split", "not one of"), ("/x,colour=red", "not one of")])
def test_bad_prepared_arguments_name_the_problem(argument, message):
  with pytest.raises(ValueError, match=message):
    parse_argument(argument)


def test_prepared_argument_defaults():
  assert parse_argument("/data/m,split=train, fraction=10") == (
      "/data/m", {"split": "train", "views": "frontal", "fraction": "10"})


def test_unknown_split_lists_the_known_ones(mimic_all_views):
  with pytest.raises(ValueError, match="no split 'train'; it has all"):
    sources.open_source(f"prepared:{mimic_all_views},split=train")


def test_not_a_prepared_folder_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="not a prepared folder"):
    sources.open_source(f"prepared:{tmp_path}")


@pytest.mark.slow
def test_input_bench_reports_rates(mimic_all_views, capsys):
  from spcl_jax.bench import input as bench_input
  assert bench_input.main(["--data", str(mimic_all_views), "--views", "all", "--seconds",
                           "0.3", "--workers", "1", "--batch-size", "2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["data"]["images"] == 6
  assert result["one_core"]["images_per_s"] > 0 and result["pipeline"]["images_per_s"] > 0
  for rates in (result["one_core"], result["pipeline"]):
    per_core = rates.get("images_per_s_per_worker", rates["images_per_s"])
    assert rates["cores_for_target"] == bench_input.cores_for_rate(2300, per_core)


def test_cores_for_rate_rounds_up():
  from spcl_jax.bench import input as bench_input
  assert bench_input.cores_for_rate(2300, 250) == 10
  assert bench_input.cores_for_rate(2300, 230) == 10
  assert bench_input.cores_for_rate(2300, 229.9) == 11
  with pytest.raises(ValueError, match="positive"):
    bench_input.cores_for_rate(2300, 0)
