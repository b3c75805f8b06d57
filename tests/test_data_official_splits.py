"""Official split scheme, `prepare --splits-only`, and a user's own split lists."""

import hashlib
import json
import random

import numpy as np
import pytest

import data_fixtures as fx
from spcl_jax.data import prepare, splits
from spcl_jax.data.prepared_folder import LabelledSource, PreparedFolder

SIZE = 32
OFFICIAL = ("official_train", "official_val", "official_test")
NIH_PATIENTS = range(1, 41)
NIH_TEST_PATIENTS = set(range(33, 41))  # The official test list: the last 8 patients.


def run_prepare(dataset, src, out, *extra):
  return prepare.main([dataset, "--src", str(src), "--out", str(out), "--image-size", str(SIZE),
                       "--workers", "1", *extra])


def nih_name(patient, k):
  return f"{patient:08d}_{k:03d}.png"


def write_nih(root, *, lists=True, row_order_seed=None):
  """40 patients with 1-3 images each; the official lists put patients 33-40 in test."""
  rows, train_val, test = [], [], []
  for patient in NIH_PATIENTS:
    for k in range(1 + patient % 3):
      name = nih_name(patient, k)
      findings = ["No Finding", "Effusion|Mass", "Hernia"][(patient + k) % 3]
      rows.append(fx.nih_row(name, findings, patient))
      (test if patient in NIH_TEST_PATIENTS else train_val).append(name)
      if not (root / "images" / name).exists():
        fx.write_png(root / "images" / name, fx.gradient(64, 64, patient * 3 + k))
  if row_order_seed is not None:
    random.Random(row_order_seed).shuffle(rows)
  fx.write_csv(root / "Data_Entry_2017_v2020.csv", fx.NIH_HEADER, rows)
  if lists:
    write_nih_lists(root, train_val, test)


def write_nih_lists(root, train_val, test):
  (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
  (root / "test_list.txt").write_text("".join(f"{n}\n" for n in test))


def _patient(name):
  return name.split("_")[0]


def _read(out, stem):
  return splits.read_split_file(out / "splits" / f"{stem}.txt")


def _tree_digest(folder):
  """sha256 of every file under folder (relative path + bytes)."""
  digest = hashlib.sha256()
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
  """NIH prepared without the official lists, then given them through --splits-only."""
  root = tmp_path_factory.mktemp("nih")
  write_nih(root / "raw", lists=False)
  run_prepare("nih_chestxray14", root / "raw", root / "out")
  records = sorted((root / "out/tfds").rglob("*array_record*"))
  assert records  # The test below must hash real record files.
  before = {"records": _tree_digest(root / "out/tfds"),
            "index": (root / "out/records.csv").read_bytes(),
            "stems": sorted(p.stem for p in (root / "out/splits").glob("*.txt"))}
  with pytest.raises(ValueError) as no_official:
    LabelledSource(root / "out", split="test", scheme="official")
  before["error"] = str(no_official.value)
  write_nih(root / "raw", lists=True)
  # A split file an older version defined: not in the new SHA256SUMS, so it must go.
  (root / "out/splits/obsolete.txt").write_text("00000001_000.png\n")
  assert prepare.main(["nih_chestxray14", "--out", str(root / "out"), "--splits-only"]) == 0
  return root, before


def test_splits_only_adds_official_splits_and_leaves_records_untouched(nih, capsys):
  root, before = nih
  out = root / "out"
  assert "official_train" not in before["stems"]
  assert "has no split 'official_test'" in before["error"]
  assert "train_val_list.txt" in before["error"] and "--splits-only" in before["error"]
  assert _tree_digest(out / "tfds") == before["records"]
  assert (out / "records.csv").read_bytes() == before["index"]
  stems = sorted(p.stem for p in (out / "splits").glob("*.txt"))
  assert "obsolete" not in stems
  assert set(stems) == set(before["stems"]) | {
      *OFFICIAL, "official_train_10pct", "official_train_1pct", "official_train_val",
      "official_test"}
  report = json.loads((out / "report.json").read_text())
  assert report["complete"] and report["counts"]["records"] == 80
  sums = (out / "splits/SHA256SUMS").read_text()
  for stem in stems:  # Every file is in SHA256SUMS and the report, with its hash.
    digest = splits.file_sha256(out / f"splits/{stem}.txt")
    assert f"{digest}  {stem}.txt" in sums
    assert report["splits"][f"{stem}.txt"]["sha256"] == digest
  assert report["splits"]["official_test.txt"]["patients"] == 8
  splits.verify_split_files(out / "splits")


def test_official_splits_are_patient_disjoint_nested_and_follow_the_lists(nih):
  out = nih[0] / "out"
  read = {stem: _read(out, stem) for stem in (*OFFICIAL, "official_train_10pct",
                                              "official_train_1pct")}
  patients = {stem: {_patient(n) for n in read[stem]} for stem in OFFICIAL}
  assert not patients["official_train"] & patients["official_val"]
  assert not patients["official_train"] & patients["official_test"]
  assert not patients["official_val"] & patients["official_test"]
  assert {int(p) for p in patients["official_test"]} == NIH_TEST_PATIENTS
  train_val = set(read["official_train"]) | set(read["official_val"])
  assert train_val == set((nih[0] / "raw/train_val_list.txt").read_text().split())
  assert len(patients["official_val"]) == 4  # round(32 / 8) of the 32 train_val patients
  assert set(read["official_train_1pct"]) <= set(read["official_train_10pct"]) \
      <= set(read["official_train"])
  assert len(read["official_train_10pct"]) == round(0.1 * len(read["official_train"]))


def test_labelled_source_reads_the_official_scheme(nih):
  out = nih[0] / "out"
  for split in ("train", "val", "test"):
    source = LabelledSource(out, split=split, scheme="official")
    assert sorted(source[i]["name"] for i in range(len(source))) == _read(out, f"official_{split}")
    assert source.split_info == {"scheme": "official", "split": split, "fraction": "100",
                                 "file": f"splits/official_{split}.txt",
                                 "sha256": splits.file_sha256(
                                     out / f"splits/official_{split}.txt")}
  ten = LabelledSource(out, split="train", fraction=10, scheme="official")
  assert sorted(ten[i]["name"] for i in range(len(ten))) == _read(out, "official_train_10pct")
  paper = LabelledSource(out, split="test")  # The default scheme is still the paper's.
  assert sorted(paper[i]["name"] for i in range(len(paper))) == _read(out, "test")
  with pytest.raises(ValueError, match="split scheme 'medical' is not one of paper, official"):
    LabelledSource(out, split="test", scheme="medical")


def test_official_files_do_not_depend_on_row_order_or_on_the_way_they_were_made(nih, tmp_path):
  # A full preparation from shuffled rows writes byte-identical files to --splits-only's.
  write_nih(tmp_path / "raw", row_order_seed=5)
  run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out")
  assert (tmp_path / "out/splits/SHA256SUMS").read_text() == \
      (nih[0] / "out/splits/SHA256SUMS").read_text()
  # Pinned: the carving is sha256-ranked, the same on every machine and in every version.
  assert splits.validation_patients([f"p{i}" for i in range(16)]) == {"p7", "p13"}


def test_splits_only_refuses_an_unfinished_or_other_folder(nih, tmp_path):
  with pytest.raises(SystemExit, match="needs a finished preparation"):
    prepare.main(["nih_chestxray14", "--out", str(tmp_path / "nothing"), "--splits-only"])
  with pytest.raises(SystemExit, match="holds nih_chestxray14, not chexpert"):
    prepare.main(["chexpert", "--out", str(nih[0] / "out"), "--splits-only"])
  with pytest.raises(SystemExit):  # --src is only optional with --splits-only.
    prepare.main(["nih_chestxray14", "--out", str(tmp_path / "x")])


def test_lists_sharing_a_patient_are_an_error_naming_it(tmp_path):
  patient_of = {"a": "p1", "b": "p1", "c": "p2"}
  with pytest.raises(ValueError, match="patient 'p1' is in both split 'official train_val list'"):
    splits.official_splits(["a", "c"], ["b"], patient_of)
  write_nih(tmp_path / "raw")
  with open(tmp_path / "raw/test_list.txt", "a") as f:  # one image of a train_val patient
    f.write(f"{nih_name(2, 0)}\n")
  with pytest.raises(SystemExit, match="error: .*raw.*patient '2' is in both"):
    run_prepare("nih_chestxray14", tmp_path / "raw", tmp_path / "out")


# --- CheXpert: valid.csv (frontal) is the test set ----------------------------------------------

def test_chexpert_official_test_is_valid_csv_frontal(tmp_path):
  prefix = "CheXpert-v1.0-small"
  rows = {"train": [], "valid": []}
  for patient in range(1, 21):
    split = "valid" if patient > 16 else "train"
    for study in (1, 2):
      for view, frontal in ((1, True), (2, False)):
        cells = [""] * 14
        cells[8] = "1.0" if (patient + study) % 2 else "0.0"  # Atelectasis
        rows[split].append(fx.chexpert_row(prefix, split, patient, study, view, frontal, cells))
        kind = "frontal" if frontal else "lateral"
        fx.write_jpeg(tmp_path / f"raw/{prefix}/{split}/patient{patient:05d}/study{study}/"
                      f"view{view}_{kind}.jpg", fx.gradient(64, 72, patient * 5 + study))
  for split in rows:
    fx.write_csv(tmp_path / f"raw/{prefix}/{split}.csv", fx.CHEXPERT_HEADER, rows[split])
  run_prepare("chexpert", tmp_path / "raw", tmp_path / "out")
  out = tmp_path / "out"
  test = _read(out, "official_test")
  assert test == sorted(f"valid/patient{p:05d}/study{s}/view1_frontal.jpg"
                        for p in range(17, 21) for s in (1, 2))
  train, val = _read(out, "official_train"), _read(out, "official_val")
  patient = lambda name: name.split("/")[1]  # noqa: E731
  assert {patient(n) for n in train} | {patient(n) for n in val} == {
      f"patient{p:05d}" for p in range(1, 17)}
  assert not {patient(n) for n in train} & {patient(n) for n in val}
  assert len({patient(n) for n in val}) == 2  # round(16 / 8)
  assert all(n.endswith("frontal.jpg") for n in train + val + test)
  source = LabelledSource(out, split="test", scheme="official", policy="medical_mae")
  assert len(source) == 8 and source[0]["label"].shape == (5,)


# --- a user's own lists (config.split_files) ----------------------------------------------------

def _write_list(path, names, labels=True):
  # Medical MAE's format: the image name, then its 14 labels (ignored here).
  path.write_text("".join(f"{n}{' 0 1 0 0 0 0 0 0 0 0 0 0 0 0' if labels else ''}\n"
                          for n in names))
  return str(path)


def test_user_split_lists_select_their_images(nih, tmp_path):
  out = nih[0] / "out"
  names = PreparedFolder(out).names
  by_patient = {}
  for name in names:
    by_patient.setdefault(_patient(name), []).append(name)
  groups = list(by_patient.values())
  lists = {"train": sum(groups[:30], []), "val": sum(groups[30:35], []),
           "test": sum(groups[35:], [])}
  files = {split: _write_list(tmp_path / f"{split}.txt", images)
           for split, images in lists.items()}
  for split in lists:
    source = LabelledSource(out, split=split, split_files=files)
    assert sorted(source[i]["name"] for i in range(len(source))) == sorted(lists[split])
    assert source.split_info["sha256"] == splits.file_sha256(files[split])
    assert source.split_info["scheme"] == "split_files"
  one = LabelledSource(out, split="train", fraction=1, split_files=files)
  ten = LabelledSource(out, split="train", fraction=10, split_files=files)
  one_names = {one[i]["name"] for i in range(len(one))}
  ten_names = {ten[i]["name"] for i in range(len(ten))}
  assert len(one_names) == 1 and one_names <= ten_names <= set(lists["train"])
  assert len(ten_names) == round(0.1 * len(lists["train"]))


def test_user_split_list_errors_name_the_file_and_line(nih, tmp_path):
  out = nih[0] / "out"
  names = sorted(PreparedFolder(out).names)
  first, second = names[0], next(n for n in names if _patient(n) != _patient(names[0]))
  sibling = next(n for n in names[1:] if _patient(n) == _patient(first))
  good_val = _write_list(tmp_path / "val.txt", [second])
  unknown = _write_list(tmp_path / "unknown.txt", [first, "99999999_000.png"])
  with pytest.raises(ValueError, match=r"unknown.txt' line 2: image '99999999_000.png' is not "
                     r"in the prepared folder"):
    LabelledSource(out, split="train", split_files={"train": unknown, "val": good_val})
  twice = _write_list(tmp_path / "twice.txt", [first, first], labels=False)
  with pytest.raises(ValueError, match=r"twice.txt' line 2: image .* already listed in "
                     r".*twice.txt' line 1"):
    LabelledSource(out, split="train", split_files={"train": twice})
  leaky = _write_list(tmp_path / "leaky.txt", [sibling])
  with pytest.raises(ValueError, match=r"leaky.txt' line 1: patient .* also has image .* in "
                     r"the 'train' list"):
    LabelledSource(out, split="train", split_files={"train": _write_list(
        tmp_path / "train.txt", [first]), "test": leaky})
  with pytest.raises(ValueError, match="config.split_files has no 'test' list"):
    LabelledSource(out, split="test", split_files={"train": good_val})
  with pytest.raises(ValueError, match=r"unknown split\(s\) \['training'\]"):
    LabelledSource(out, split="val", split_files={"training": good_val, "val": good_val})
  with pytest.raises(FileNotFoundError, match="config.split_files: .*absent.txt"):
    LabelledSource(out, split="val", split_files={"val": str(tmp_path / "absent.txt")})
