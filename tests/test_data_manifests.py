"""read_manifest of each dataset on small fixtures in the official metadata formats."""

import pathlib

import numpy as np
import pytest

import data_fixtures as fx
from spcl_jax import downstream
from spcl_jax.data import rle
from spcl_jax.data.datasets import chexpert, mimic_cxr_jpg, nih_chestxray14, rsna_pneumonia
from spcl_jax.data.datasets import siim_acr
from spcl_jax.data.datasets import manifest as mf


def test_mimic_views_paths_and_file_checks(tmp_path):
  rows = [("aa-1", 10000032, 50414267, "PA"), ("aa-2", 10000032, 50414267, "LATERAL"),
          ("bb-1", 11000011, 51000001, "AP"), ("bb-2", 11000011, 51000001, "")]
  fx.write_mimic(tmp_path, rows)
  (tmp_path / "files/p10/p10000032/s50414267/aa-1.jpg").unlink()
  fx.write_jpeg(tmp_path / "files/p12/p12000000/s52000000/extra.jpg", fx.gradient(8, 8, 0))
  metadata_only = mimic_cxr_jpg.read_manifest(tmp_path, check_files=False)
  assert [(e.name, e.patient, e.view) for e in metadata_only.entries] == [
      ("files/p10/p10000032/s50414267/aa-1.jpg", "10000032", "PA"),
      ("files/p10/p10000032/s50414267/aa-2.jpg", "10000032", "LATERAL"),
      ("files/p11/p11000011/s51000001/bb-1.jpg", "11000011", "AP"),
      ("files/p11/p11000011/s51000001/bb-2.jpg", "11000011", "")]
  assert [e.is_frontal for e in metadata_only.entries] == [True, False, True, False]
  checked = mimic_cxr_jpg.read_manifest(tmp_path)
  assert len(checked.entries) == 3
  assert checked.problems.names("missing_file") == ["files/p10/p10000032/s50414267/aa-1.jpg"]
  assert checked.problems.names("unlisted_file") == ["files/p12/p12000000/s52000000/extra.jpg"]


def test_mimic_bad_and_duplicate_rows(tmp_path):
  fx.write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", fx.MIMIC_HEADER, [
      fx.mimic_row("x1", 10000001, 50000001, "PA"), fx.mimic_row("x1", 10000001, 50000001, "PA"),
      fx.mimic_row("x2", "abc", 50000001, "PA")])
  manifest = mimic_cxr_jpg.read_manifest(tmp_path, check_files=False)
  assert len(manifest.entries) == 1
  assert manifest.problems.count("duplicate_row") == 1
  assert "subject_id 'abc'" in manifest.problems.items["bad_row"][0]["detail"]


def test_mimic_missing_metadata_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv.gz"):
    mimic_cxr_jpg.read_manifest(tmp_path)


def test_nih_multi_label_no_finding_and_official_lists(tmp_path):
  fx.write_csv(tmp_path / "Data_Entry_2017_v2020.csv", fx.NIH_HEADER, [
      fx.nih_row("00000001_000.png", "Cardiomegaly|Effusion", 1),
      fx.nih_row("00000001_001.png", "No Finding", 1, "AP"),
      fx.nih_row("00000002_000.png", "Hernia", 2),
      fx.nih_row("00000003_000.png", "Covid", 3),
      fx.nih_row("00000004_000.png", "No Finding|Mass", 4),
      fx.nih_row("00000002_000.png", "Hernia", 2)])
  (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
  (tmp_path / "test_list.txt").write_text("00000002_000.png\n99999999_000.png\n")
  manifest = nih_chestxray14.read_manifest(tmp_path, check_files=False)
  by_name = manifest.by_name()
  assert set(by_name) == {"00000001_000.png", "00000001_001.png", "00000002_000.png"}
  labels = dict(zip(nih_chestxray14.LABELS, by_name["00000001_000.png"].labels))
  assert labels["Cardiomegaly"] == labels["Effusion"] == 1
  assert sum(by_name["00000001_000.png"].labels) == 2
  assert by_name["00000001_001.png"].labels == (0,) * 14
  assert by_name["00000002_000.png"].labels[-1] == 1  # Hernia is the last of the 14.
  assert manifest.problems.names("unknown_label") == ["00000003_000.png"]
  assert manifest.problems.names("conflicting_rows") == ["00000004_000.png"]
  assert manifest.problems.names("duplicate_row") == ["00000002_000.png"]
  assert manifest.official_splits == {"official_train_val": ["00000001_000.png",
                                                             "00000001_001.png"],
                                      "official_test": ["00000002_000.png"]}
  assert manifest.problems.names("not_in_metadata") == ["99999999_000.png"]
  targets = nih_chestxray14.targets(np.array([by_name["00000001_000.png"].labels]))
  assert targets.dtype == np.float32 and targets.sum() == 2


def test_nih_patient_ids_with_and_without_leading_zeros_are_one_patient(tmp_path):
  # The split is by patient: "00042" and "42" must not land in different splits.
  rows = [fx.nih_row("00000042_000.png", "Mass", 42), fx.nih_row("00000042_001.png", "Mass", 42)]
  rows[1] = rows[1].replace(",42,", ",00042,")
  fx.write_csv(tmp_path / "Data_Entry_2017_v2020.csv", fx.NIH_HEADER, rows)
  manifest = nih_chestxray14.read_manifest(tmp_path, check_files=False)
  assert [e.patient for e in manifest.entries] == ["42", "42"]


def test_nih_finds_images_in_kaggle_subfolders(tmp_path):
  fx.write_csv(tmp_path / "Data_Entry_2017.csv", fx.NIH_HEADER,
               [fx.nih_row("00000001_000.png", "Mass", 1)])
  fx.write_png(tmp_path / "images_001/images/00000001_000.png", fx.gradient(8, 8, 0))
  fx.write_png(tmp_path / "images_001/images/00000009_000.png", fx.gradient(8, 8, 1))
  manifest = nih_chestxray14.read_manifest(tmp_path)
  assert manifest.entries[0].path == "images_001/images/00000001_000.png"
  assert manifest.problems.names("unlisted_file") == ["images_001/images/00000009_000.png"]


CELLS = {"pos": "1.0", "neg": "0.0", "unc": "-1.0", "blank": ""}


def _chexpert_labels(**observations) -> list[str]:
  return [CELLS[observations.get(label.replace(" ", "_"), "blank")]
          for label in chexpert.LABELS]


def test_chexpert_prefixes_patients_views_and_label_cells(tmp_path):
  root = tmp_path / "CheXpert-v1.0-small"
  prefix = "CheXpert-v1.0-small"
  fx.write_csv(root / "train.csv", fx.CHEXPERT_HEADER, [
      fx.chexpert_row(prefix, "train", 1, 1, 1, True, _chexpert_labels(
          Atelectasis="unc", Edema="unc", Cardiomegaly="unc", Pleural_Effusion="pos")),
      fx.chexpert_row(prefix, "train", 1, 1, 2, False, _chexpert_labels(Edema="neg")),
      fx.chexpert_row(prefix, "train", 2, 1, 1, True,
                      _chexpert_labels(Consolidation="neg", Edema="pos"))])
  fx.write_csv(root / "valid.csv", fx.CHEXPERT_HEADER, [
      fx.chexpert_row(prefix, "valid", 64541, 1, 1, True, _chexpert_labels()),
      fx.chexpert_row(prefix, "valid", 64542, 1, 1, True,
                      [*_chexpert_labels()[:-1], "2.0"])])
  manifest = chexpert.read_manifest(tmp_path, check_files=False)
  names = [e.name for e in manifest.entries]
  assert names == ["train/patient00001/study1/view1_frontal.jpg",
                   "train/patient00001/study1/view2_lateral.jpg",
                   "train/patient00002/study1/view1_frontal.jpg",
                   "valid/patient64541/study1/view1_frontal.jpg"]
  assert manifest.entries[0].path == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
  assert [e.patient for e in manifest.entries] == ["patient00001", "patient00001",
                                                   "patient00002", "patient64541"]
  assert [e.view for e in manifest.entries] == ["AP", "LATERAL", "AP", "AP"]
  assert manifest.problems.names("unknown_label") == ["valid/patient64542/study1/view1_frontal.jpg"]
  assert "'Support Devices' has value '2.0'" in manifest.problems.items["unknown_label"][0]["detail"]
  frontal = [e for e in manifest.entries if e.is_frontal]
  codes = np.array([e.labels for e in frontal])
  # TASK_LABELS order: Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion.
  np.testing.assert_array_equal(chexpert.targets(codes, "ones")[0], [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(chexpert.targets(codes, "zeros")[0], [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(chexpert.targets(codes, "medical_mae")[0], [1, 0, 0, 1, 1])
  # Blank and explicit 0 are both negative; 1 is positive under every policy.
  for policy in downstream.CHEXPERT_POLICIES:
    np.testing.assert_array_equal(chexpert.targets(codes, policy)[1:], [[0, 0, 0, 1, 0],
                                                                        [0, 0, 0, 0, 0]])
  with pytest.raises(ValueError, match="policy 'maybe'"):
    chexpert.targets(codes, "maybe")


def test_chexpert_full_and_small_downloads_give_the_same_names(tmp_path):
  for prefix in ("CheXpert-v1.0-small", "CheXpert-v1.0"):
    for csv_name, split in (("train.csv", "train"), ("valid.csv", "valid")):
      fx.write_csv(tmp_path / prefix / csv_name, fx.CHEXPERT_HEADER,
                   [fx.chexpert_row(prefix, split, 7, 1, 1, True, _chexpert_labels())])
  small = chexpert.read_manifest(tmp_path / "CheXpert-v1.0-small", check_files=False)
  full = chexpert.read_manifest(tmp_path / "CheXpert-v1.0", check_files=False)
  assert [e.name for e in small.entries] == [e.name for e in full.entries]
  assert small.entries[0].path == "train/patient00007/study1/view1_frontal.jpg"


RSNA_HEADER = "patientId,x,y,width,height,Target"


def test_rsna_several_boxes_make_one_positive_image(tmp_path):
  fx.write_csv(tmp_path / "stage_2_train_labels.csv", RSNA_HEADER, [
      "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0",
      "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1",
      "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1",
      "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1",
      "0100515c-5204-4f31-98e0-f35e4b00004a,,,,,0",
      "0100515c-5204-4f31-98e0-f35e4b00004a,10.0,10.0,20.0,20.0,1",
      "02000000-0000-0000-0000-000000000000,,,,,maybe",
      "03000000-0000-0000-0000-000000000000,,,,,1"])
  manifest = rsna_pneumonia.read_manifest(tmp_path, check_files=False)
  by_name = manifest.by_name()
  assert set(by_name) == {"0004cfab-14fd-4e49-80ba-63a80b6bddd6",
                          "00436515-870c-4b36-a041-de91049b9ab4",
                          "0100515c-5204-4f31-98e0-f35e4b00004a"}
  two_boxes = by_name["00436515-870c-4b36-a041-de91049b9ab4"]
  assert two_boxes.labels == (1,)
  assert two_boxes.boxes == ((264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0))
  assert two_boxes.path == "stage_2_train_images/00436515-870c-4b36-a041-de91049b9ab4.dcm"
  assert two_boxes.patient == two_boxes.name  # One image per patientId.
  assert by_name["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].labels == (0,)
  assert by_name["0100515c-5204-4f31-98e0-f35e4b00004a"].labels == (1,)  # max Target
  assert manifest.problems.names("duplicate_row") == ["00436515-870c-4b36-a041-de91049b9ab4"]
  assert manifest.problems.names("conflicting_rows") == ["0100515c-5204-4f31-98e0-f35e4b00004a"]
  assert manifest.problems.names("unknown_label") == ["02000000-0000-0000-0000-000000000000"]
  assert manifest.problems.names("bad_row") == ["03000000-0000-0000-0000-000000000000"]


def test_siim_rows_united_and_minus_one(tmp_path):
  a = np.zeros((16, 16), np.uint8)
  a[2:5, 3:6] = 1
  b = np.zeros((16, 16), np.uint8)
  b[9:12, 10:14] = 1
  fx.write_csv(tmp_path / "train-rle.csv", "ImageId, EncodedPixels", [
      f"1.2.276.0.7230010.3.1.4.1, {rle.rle_encode(a)}",
      f"1.2.276.0.7230010.3.1.4.1, {rle.rle_encode(b)}",
      "1.2.276.0.7230010.3.1.4.2, -1",
      "1.2.276.0.7230010.3.1.4.3, -1",
      f"1.2.276.0.7230010.3.1.4.3, {rle.rle_encode(b)}",
      "1.2.276.0.7230010.3.1.4.4, 5 x"])
  manifest = siim_acr.read_manifest(tmp_path, check_files=False)
  by_name = manifest.by_name()
  assert set(by_name) == {f"1.2.276.0.7230010.3.1.4.{i}" for i in (1, 2, 3)}
  two_regions = by_name["1.2.276.0.7230010.3.1.4.1"]
  assert two_regions.labels == (1,)
  np.testing.assert_array_equal(rle.rle_union(two_regions.mask_rles, 16, 16), a | b)
  assert by_name["1.2.276.0.7230010.3.1.4.2"].labels == (0,)
  assert by_name["1.2.276.0.7230010.3.1.4.2"].mask_rles == ("-1",)
  assert by_name["1.2.276.0.7230010.3.1.4.3"].labels == (1,)
  assert manifest.problems.names("conflicting_rows") == ["1.2.276.0.7230010.3.1.4.3"]
  assert manifest.problems.names("bad_mask") == ["1.2.276.0.7230010.3.1.4.4"]


def test_csv_without_expected_column_names_it(tmp_path):
  fx.write_csv(tmp_path / "train-rle.csv", "ImageId,Pixels", ["1.2.3,-1"])
  with pytest.raises(ValueError, match=r"missing column\(s\) \['EncodedPixels'\]"):
    siim_acr.read_manifest(tmp_path, check_files=False)


def test_problem_kinds_are_documented():
  problems = mf.Problems()
  with pytest.raises(KeyError):
    problems.add("oops", "x")
  page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
  report_section = page.split("## Reading the report")[1].split("\n## ")[0]
  for kind in mf.PROBLEM_KINDS:
    assert f"`{kind}`" in report_section, kind


# --- NIH's 14 findings, pinned literally --------------------------------------------------------

def test_nih_findings_are_the_official_fourteen_in_data_entry_order():
  assert nih_chestxray14.LABELS == (
      "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
      "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
      "Hernia")
  codes, _, _ = nih_chestxray14.parse_findings("Cardiomegaly|Effusion")
  target = nih_chestxray14.targets(np.array([codes]))
  assert target.dtype == np.float32
  np.testing.assert_array_equal(target, [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])


def test_every_dataset_module_keeps_the_contract_and_a_broken_one_is_named():
  import types

  from spcl_jax.data import datasets
  for name in datasets.DATASET_NAMES:
    module = datasets.dataset_module(name)
    assert isinstance(module, datasets.DatasetModule)
  assert datasets.dataset_module("siim_acr").HAS_MASKS
  assert not datasets.dataset_module("chexpert").HAS_MASKS
  broken = types.ModuleType("my_dataset")
  broken.__dict__.update(NAME="x", LABELS=("a",), TASK_LABELS=("a",), IMAGE_FORMAT="file",
                         PATIENT_SPLIT=True, read_manifest=lambda src: None, targets=None,
                         official_lists=None)
  with pytest.raises(TypeError, match="my_dataset.HAS_MASKS must be a bool"):
    datasets.check_contract(broken)
  broken.HAS_MASKS = False
  with pytest.raises(TypeError, match="need a targets"):
    datasets.check_contract(broken)
