"""The demo from a prepared folder: the bundled CXRs laid out as a MIMIC-CXR-JPG download,
prepared into array_record, pre-trained from `prepared:`, then features extracted with --data."""

import io
import json

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from spcl_jax.configs import demo
from spcl_jax import train
from spcl_jax.data import decode, prepare, sources
from spcl_jax.extract import main as extract_main


@pytest.fixture(scope="module")
def prepared_sample(tmp_path_factory):
  root = tmp_path_factory.mktemp("mimic")
  sample = sources.open_source("sample")
  rows = [(f"img{i:02d}", 10000000 + i, 50000000 + i, "PA") for i in range(len(sample))]
  fx.write_mimic(root / "raw", rows, files=False)
  for i, (dicom_id, subject, study, _) in enumerate(rows):
    path = root / f"raw/files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(sample[i]["encoded"])) as im:
      im.save(path, quality=95)
  assert prepare.main(["mimic_cxr_jpg", "--src", str(root / "raw"), "--out", str(root / "out"),
                       "--image-size", "128", "--workers", "1"]) == 0
  return root / "out"


def test_the_prepared_sample_reads_back_as_sixteen_radiographs(prepared_sample):
  source = sources.open_source(f"prepared:{prepared_sample}")
  assert len(source) == 16
  first = decode.decode_image(source[0], 64)
  assert first.shape == (64, 64) and 20 < first.mean() < 235  # a real radiograph, not blank


@pytest.mark.slow
def test_demo_trains_from_the_prepared_folder(prepared_sample, tmp_path):
  source = sources.open_source(f"prepared:{prepared_sample}")
  config = demo.get_config()
  config.data.source = f"prepared:{prepared_sample}"
  config.model.image_size = 64
  config.total_steps = 3
  config.log_every_steps = 1
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["step"] == 3 and np.isfinite(summary["loss"])
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
  info = json.loads((tmp_path / "config.json").read_text())
  assert info["config"]["data"]["source"] == f"prepared:{prepared_sample}"
  # Features of the same images, read through --data: one row per prepared image.
  out = tmp_path / "feats.npz"
  assert extract_main(["--workdir", str(tmp_path), "--data", str(prepared_sample), "--split",
                       "all", "--out", str(out), "--no-progress"]) == 0
  with np.load(out) as feats:
    assert feats["cls"].shape == (16, 64)
    assert sorted(feats["names"]) == sorted(source[i]["name"] for i in range(16))
