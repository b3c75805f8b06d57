"""RSNA and SIIM end to end: DICOM images (MONOCHROME1, compressed) and SIIM masks."""

import json

import numpy as np
from PIL import Image

import data_fixtures as fx
from spcl_jax.data import decode, prepare, rle
from spcl_jax.data.prepared_folder import LabelledSource

SIZE = 32


def run_prepare(dataset, src, out):
  return prepare.main([dataset, "--src", str(src), "--out", str(out), "--image-size", str(SIZE),
                       "--workers", "1", "--encoding", "png"])


def write_rsna(root, n=10):
  rows = []
  for i in range(n):
    patient_id = f"{i:08d}-0000-4000-8000-000000000000"
    if i % 2:
      rows += [f"{patient_id},10.0,20.0,30.0,40.0,1", f"{patient_id},50.0,20.0,30.0,40.0,1"]
    else:
      rows.append(f"{patient_id},,,,,0")
    photometric = "MONOCHROME1" if i == 0 else "MONOCHROME2"
    pixels = fx.gradient(64, 64, i, np.uint16) >> 4  # 12-bit stored values.
    path = root / "stage_2_train_images" / f"{patient_id}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fx.dicom_bytes(pixels, photometric=photometric))
  fx.write_csv(root / "stage_2_train_labels.csv", "patientId,x,y,width,height,Target", rows)
  return pixels


def test_rsna_monochrome1_is_stored_inverted_and_labels_are_max_target(tmp_path):
  write_rsna(tmp_path / "raw")
  assert run_prepare("rsna_pneumonia", tmp_path / "raw", tmp_path / "out") == 0
  source = LabelledSource(tmp_path / "out", split="all")
  assert len(source) == 10
  by_name = {source[i]["name"]: source[i] for i in range(len(source))}
  for i in range(10):
    example = by_name[f"{i:08d}-0000-4000-8000-000000000000"]
    assert example["label"].tolist() == [float(i % 2)]
    pixels = (fx.gradient(64, 64, i, np.uint16) >> 4).astype(np.float32)
    unit = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    if i == 0:
      unit = 1.0 - unit  # MONOCHROME1: the smallest stored value is white.
    expected = decode.resize_to_uint8(unit, SIZE, "bilinear")
    stored = decode.decode_image(example, SIZE)
    np.testing.assert_array_equal(stored, expected)
  first = decode.decode_image(by_name["00000000-0000-4000-8000-000000000000"], SIZE)
  assert first[0, 0] > 200 and first[-1, -1] < first[0, 0]  # Inverted: top-left is bright.


def test_rsna_unreadable_and_tiny_dicoms_are_reported(tmp_path):
  write_rsna(tmp_path / "raw", n=4)
  (tmp_path / "raw/stage_2_train_images/00000002-0000-4000-8000-000000000000.dcm").write_bytes(
      b"DICM but not really" * 20)
  (tmp_path / "raw/stage_2_train_images/00000003-0000-4000-8000-000000000000.dcm").write_bytes(
      fx.dicom_bytes(fx.gradient(64, 63, 3, np.uint16) >> 4))  # 63 columns: one too few.
  assert run_prepare("rsna_pneumonia", tmp_path / "raw", tmp_path / "out") == 0
  report = json.loads((tmp_path / "out/report.json").read_text())
  assert [i["name"] for i in report["problems"]["undecodable"]["items"]] == [
      "00000002-0000-4000-8000-000000000000"]
  assert report["problems"]["too_small"]["items"] == [{
      "name": "00000003-0000-4000-8000-000000000000",
      "detail": repr(str(tmp_path / "raw/stage_2_train_images/"
                         "00000003-0000-4000-8000-000000000000.dcm"))
                + " is 63x64 px, a side below --min-side 64"}]
  assert report["counts"]["records"] == 2


def test_siim_masks_are_united_resized_nearest_and_stored_beside_the_image(tmp_path):
  from pydicom.uid import JPEG2000Lossless
  raw = tmp_path / "raw"
  rng = np.random.default_rng(0)
  rows, expected_masks = [], {}
  for i in range(6):
    image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875166.{i}"
    mask = np.zeros((64, 64), np.uint8)
    if i % 3 == 0:
      rows.append(f"{image_id}, -1")
    else:
      for _ in range(i % 3):  # One or two regions, one RLE row each.
        region = np.zeros((64, 64), np.uint8)
        top, left = rng.integers(0, 40, size=2)
        region[top:top + 16, left:left + 20] = 1
        rows.append(f"{image_id}, {rle.rle_encode(region)}")
        mask |= region
    expected_masks[image_id] = mask
    pixels = fx.gradient(64, 64, i, np.uint16) >> 4
    path = raw / "dicom-images-train" / f"1.2.{i}" / f"1.3.{i}" / f"{image_id}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fx.dicom_bytes(pixels, transfer_syntax=JPEG2000Lossless if i == 1 else None))
  fx.write_csv(raw / "train-rle.csv", "ImageId, EncodedPixels", rows)
  assert run_prepare("siim_acr", raw, tmp_path / "out") == 0
  source = LabelledSource(tmp_path / "out", split="all")
  assert len(source) == 6
  for index in range(len(source)):
    example = source[index]
    full_mask = expected_masks[example["name"]]
    resized = np.asarray(Image.fromarray(full_mask).resize((SIZE, SIZE), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(example["mask"], resized)
    assert example["label"].tolist() == [float(full_mask.any())]
    assert set(np.unique(example["mask"])) <= {0, 1}
