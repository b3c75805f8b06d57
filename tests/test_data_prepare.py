"""End to end: raw download fixture -> prepare CLI -> report, splits, records -> readers."""

import json
import random
import tempfile

import numpy as np
import pytest

import data_fixtures as fx
from spcl_jax.data import decode, prepare, sources, splits
from spcl_jax.data.prepared_folder import LabelledSource, PreparedSource

SIZE = 32


def run_prepare(dataset, src, out, *extra):
  return prepare.main([dataset, "--src", str(src), "--out", str(out), "--image-size", str(SIZE),
                       "--workers", "1", *extra])


def _decoded(record) -> np.ndarray:
  return decode.decode_image(record, SIZE)


# --- NIH: 16-bit PNGs, lossless storage, exact read-back through grain -----------------------

def write_nih(root, row_order_seed=None):
  rows = []
  for patient in range(1, 21):
    for k in range(2):
      name = f"{patient:08d}_{k:03d}.png"
      findings = ["No Finding", "Effusion|Mass", "Hernia"][(patient + k) % 3]
      rows.append(fx.nih_row(name, findings, patient, "PA" if k == 0 else "AP"))
      if not (root / "images" / name).exists():
        fx.write_png(root / "images" / name, fx.gradient(72, 64, patient * 2 + k, np.uint16))
  if row_order_seed is not None:
    random.Random(row_order_seed).shuffle(rows)
  fx.write_csv(root / "Data_Entry_2017_v2020.csv", fx.NIH_HEADER, rows)


def test_nih_png_records_read_back_through_grain_equal_the_decoded_sources(tmp_path, capsys):
  import grain
  write_nih(tmp_path / "raw")
  assert run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out",
                     "--encoding", "png") == 0
  assert "40 images written" in capsys.readouterr().out
  source = sources.open_source(f"prepared:{tmp_path / 'out'}")
  assert len(source) == 40
  dataset = grain.MapDataset.source(source).map(_decoded)
  for index in range(len(source)):
    name = source[index]["name"]
    raw = (tmp_path / "raw/images" / name).read_bytes()
    expected = decode.decode_image({"name": name, "encoded": raw}, SIZE)
    np.testing.assert_array_equal(dataset[index], expected, err_msg=name)


def test_rerun_does_no_work_and_other_settings_are_refused(tmp_path, monkeypatch, capsys):
  write_nih(tmp_path / "raw")
  run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out")
  before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}

  def no_work(*args, **kwargs):
    raise AssertionError("a finished dataset must not be read or written again")
  monkeypatch.setattr(prepare, "build_records", no_work)
  monkeypatch.setattr(prepare.splits_lib, "write_split_files", no_work)
  assert run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out") == 0
  assert "already prepared" in capsys.readouterr().out
  after = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
  assert after == before
  with pytest.raises(SystemExit, match="image_size=32, not 64"):
    prepare.main(["nih_chestxray14", "--src", str(tmp_path / "raw"), "--out",
                  str(tmp_path / "out"), "--image-size", "64"])


def test_split_files_identical_for_any_row_order_and_worker_count(tmp_path):
  write_nih(tmp_path / "raw_a")
  write_nih(tmp_path / "raw_b", row_order_seed=3)
  run_prepare("nih_chestxray14", tmp_path / "raw_a", tmp_path / "out_a")
  prepare.main(["nih_chestxray14", "--src", str(tmp_path / "raw_b"), "--out",
                str(tmp_path / "out_b"), "--image-size", str(SIZE), "--workers", "2"])
  sums_a = (tmp_path / "out_a/splits/SHA256SUMS").read_text()
  assert sums_a == (tmp_path / "out_b/splits/SHA256SUMS").read_text()
  assert (tmp_path / "out_a/records.csv").read_bytes() != b""
  report = json.loads((tmp_path / "out_a/report.json").read_text())
  for name, split in report["splits"].items():
    assert f"{split['sha256']}  {name}" in sums_a
  # The pooled (2 worker) run stored the same images as the in-process run.
  a = PreparedSource(tmp_path / "out_a")
  b = PreparedSource(tmp_path / "out_b")
  assert [a[i]["name"] for i in range(len(a))] == [b[i]["name"] for i in range(len(b))]
  assert all(a[i]["encoded"] == b[i]["encoded"] for i in range(len(a)))


def test_splits_are_patient_disjoint_and_fractions_nested(tmp_path):
  write_nih(tmp_path / "raw")
  run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out")
  split_dir = tmp_path / "out/splits"
  read = {s: splits.read_split_file(split_dir / f"{s}.txt")
          for s in ("train", "val", "test", "train_10pct", "train_1pct")}
  patients = {s: {name.split("_")[0] for name in read[s]} for s in ("train", "val", "test")}
  assert [len(patients[s]) for s in ("train", "val", "test")] == [14, 4, 2]
  assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
              or patients["val"] & patients["test"])
  assert set(read["train_1pct"]) <= set(read["train_10pct"]) <= set(read["train"])
  labelled = LabelledSource(tmp_path / "out", split="train", fraction=10)
  assert sorted(labelled[i]["name"] for i in range(len(labelled))) == read["train_10pct"]
  with pytest.raises(ValueError, match="needs split=train"):
    PreparedSource(tmp_path / "out", split="val", fraction=10)


def test_shards_partition_the_split(tmp_path):
  write_nih(tmp_path / "raw")
  run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out")
  full = LabelledSource(tmp_path / "out", split="train")
  shards = [full.shard(i, 3) for i in range(3)]
  names = [s[i]["name"] for s in shards for i in range(len(s))]
  assert names == [full[i]["name"] for i in range(len(full))]
  assert [len(s) for s in shards] == [9, 9, 10]
  np.testing.assert_array_equal(shards[2][0]["label"], full[18]["label"])


# --- CheXpert: JPEG sources, a truncated JPEG, a missing file, laterals -------------------------

CHEX_PREFIX = "CheXpert-v1.0-small"


def _cells(uncertain_atelectasis: bool) -> list[str]:
  cells = [""] * 14
  cells[8] = "-1.0" if uncertain_atelectasis else "1.0"  # Atelectasis
  cells[2] = "0.0"  # Cardiomegaly
  return cells


def write_chexpert(root):
  rows = {"train": [], "valid": []}
  for patient in range(1, 13):
    split = "valid" if patient > 10 else "train"
    for view, frontal in ((1, True), (2, False)):
      rows[split].append(fx.chexpert_row(CHEX_PREFIX, split, patient, 1, view, frontal,
                                         _cells(patient % 2 == 0)))
      path = (root / CHEX_PREFIX / split / f"patient{patient:05d}/study1/"
              f"view{view}_{'frontal' if frontal else 'lateral'}.jpg")
      fx.write_jpeg(path, fx.gradient(64, 72, patient * 3 + view))
  fx.write_csv(root / CHEX_PREFIX / "train.csv", fx.CHEXPERT_HEADER, rows["train"])
  fx.write_csv(root / CHEX_PREFIX / "valid.csv", fx.CHEXPERT_HEADER, rows["valid"])
  truncated = root / CHEX_PREFIX / "train/patient00003/study1/view1_frontal.jpg"
  truncated.write_bytes(truncated.read_bytes()[:200])
  (root / CHEX_PREFIX / "train/patient00004/study1/view1_frontal.jpg").unlink()
  fx.write_jpeg(root / CHEX_PREFIX / "train/patient00099/study1/view1_frontal.jpg",
                fx.gradient(8, 8, 0))


def test_chexpert_bad_files_are_reported_and_the_run_completes(tmp_path, capsys):
  write_chexpert(tmp_path / "raw")
  assert run_prepare("chexpert", tmp_path / "raw", tmp_path / "out") == 0
  stdout = capsys.readouterr().out
  report = json.loads((tmp_path / "out/report.json").read_text())
  problems = report["problems"]
  assert problems["undecodable"]["items"][0]["name"] == \
      "train/patient00003/study1/view1_frontal.jpg"
  assert "truncated" in problems["undecodable"]["items"][0]["detail"].lower()
  assert [i["name"] for i in problems["missing_file"]["items"]] == [
      "train/patient00004/study1/view1_frontal.jpg"]
  assert [i["name"] for i in problems["unlisted_file"]["items"]] == [
      f"{CHEX_PREFIX}/train/patient00099/study1/view1_frontal.jpg"]
  assert problems["non_frontal"]["count"] == 12  # One lateral per patient.
  assert report["counts"] == {"metadata_images": 24, "selected": 11, "records": 10}
  assert "undecodable: 1" in stdout and "missing_file: 1" in stdout
  # Split files come from the metadata alone: the two bad images are listed, without record.
  assert report["splits"]["all.txt"] == {**report["splits"]["all.txt"], "images": 12,
                                         "without_record": 2}
  train = LabelledSource(tmp_path / "out", split="train", policy="zeros")
  for index in range(len(train)):
    example = train[index]
    patient = int(example["name"].split("/")[1].removeprefix("patient"))
    assert patient not in (3, 4)
    # Atelectasis is uncertain for even patients: 0 under "zeros"; Cardiomegaly is 0 always.
    np.testing.assert_array_equal(example["label"], [patient % 2, 0, 0, 0, 0])
    raw = (tmp_path / "raw" / CHEX_PREFIX / example["name"]).read_bytes()
    expected = decode.decode_image({"name": "x", "encoded": raw}, SIZE).astype(int)
    assert np.abs(_decoded(example).astype(int) - expected).max() <= 6  # JPEG q95 storage.


# --- The report agrees with records.csv and the splits, whatever is wrong with the input --------

def _read_records_index(out) -> list[str]:
  lines = (out / "records.csv").read_text().splitlines()[1:]
  return [line.split(",")[1] for line in lines]


def test_report_agrees_with_records_and_splits_on_malformed_input(tmp_path, monkeypatch):
  raw = tmp_path / "raw"
  write_nih(raw)
  rows = (raw / "Data_Entry_2017_v2020.csv").read_text().splitlines()
  assert rows[7].startswith("00000004_000.png,Effusion|Mass,")  # Line 8.
  rows[7] = rows[7].replace("Effusion|Mass", "Effusion,Mass")  # One cell more.
  assert rows[3].startswith("00000002_000.png,Hernia,")  # Line 4.
  rows.append(fx.nih_row("00000002_000.png", "Hernai", 2))  # A typo beside the valid row.
  (raw / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
  fx.write_png(raw / "images/00000005_000.png", np.zeros((1, 1), np.uint8))
  fx.write_png(raw / "images_002/images/00000006_001.png", fx.gradient(72, 64, 99, np.uint16))
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  run_prepare("nih_chestxray14", raw, tmp_path / "out")
  assert list(scratch.iterdir()) == []  # No tmp*tfds folder is left behind.
  report = json.loads((tmp_path / "out/report.json").read_text())
  problems = {kind: [(item["name"], item["detail"]) for item in problem["items"]]
              for kind, problem in report["problems"].items()}
  assert sorted(problems) == ["bad_row", "duplicate_file", "too_small", "unknown_label"]
  assert problems["bad_row"] == [("00000004_000.png", "Data_Entry_2017_v2020.csv line 8: "
                                  "13 cells where the header has 12: '" + rows[7]
                                  + "'; image excluded")]
  assert problems["unknown_label"] == [(
      "00000002_000.png", "Data_Entry_2017_v2020.csv line 42: unknown finding(s) ['Hernai']; "
      "image excluded; valid row(s) Data_Entry_2017_v2020.csv line 4 ignored")]
  assert problems["too_small"] == [("00000005_000.png", repr(str(raw / "images/00000005_000.png"))
                                    + " is 1x1 px, a side below --min-side 64")]
  assert [name for name, _ in problems["duplicate_file"]] == ["00000006_001.png"]
  recorded = _read_records_index(tmp_path / "out")
  split_dir = tmp_path / "out/splits"
  listed = splits.read_split_file(split_dir / "all.txt")
  excluded = {"00000002_000.png", "00000004_000.png"}
  assert not excluded & (set(recorded) | set(listed))
  for path in split_dir.glob("*.txt"):
    assert not excluded & set(splits.read_split_file(path)), path.name
  without_record = sorted(set(listed) - set(recorded))
  assert without_record == ["00000005_000.png", "00000006_001.png"]  # too small, ambiguous file
  assert set(recorded) <= set(listed)
  assert report["counts"] == {"metadata_images": 38, "selected": 37, "records": 36}
  assert report["splits"]["all.txt"]["without_record"] == 2
