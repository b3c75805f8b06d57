"""Malformed metadata, one table over every dataset: each case is reported with its file and line,
and every intact row comes out exactly as it does from the clean fixture (nothing relabelled)."""

import re

import pytest

import data_fixtures as fx
from spcl_jax.data.datasets import chexpert, dataset_module, mimic_cxr_jpg

RSNA_HEADER = "patientId,x,y,width,height,Target"
CELLS = {"pos": "1.0", "neg": "0.0", "unc": "-1.0", "blank": ""}


def _chexpert_labels(**observations) -> list[str]:
  return [CELLS[observations.get(label.replace(" ", "_"), "blank")]
          for label in chexpert.LABELS]


# Each case edits one clean fixture (rows and files) and names the one problem expected: its kind,
# the image, a pattern its detail must match (file and line first), and the images it excludes.
# Every other image must come out exactly as in the clean fixture: nothing is relabelled.

NIH_CSV = "Data_Entry_2017_v2020.csv"
NIH_ROWS = [fx.nih_row("00000001_000.png", "Cardiomegaly|Effusion", 1),  # line 2
            fx.nih_row("00000002_000.png", "No Finding", 2),  # line 3
            fx.nih_row("00000003_000.png", "Hernia", 3),  # line 4
            fx.nih_row("00000004_000.png", "Mass|Nodule", 4)]  # line 5


def _nih(root, rows):
  fx.write_csv(root / NIH_CSV, fx.NIH_HEADER, rows)
  for row in NIH_ROWS:
    name = row.split(",")[0]
    (root / "images_001/images").mkdir(parents=True, exist_ok=True)
    (root / "images_001/images" / name).write_bytes(name.encode())  # Never decoded here.


CHEX_ROWS = [fx.chexpert_row("CheXpert-v1.0-small", "train", p, 1, 1, True,
                             _chexpert_labels(Cardiomegaly="pos", Edema=cell))
             for p, cell in ((1, "neg"), (2, "unc"), (3, "pos"))]  # lines 2-4


def _chexpert(root, rows):
  fx.write_csv(root / "train.csv", fx.CHEXPERT_HEADER, rows)
  fx.write_csv(root / "valid.csv", fx.CHEXPERT_HEADER, [fx.chexpert_row(
      "CheXpert-v1.0-small", "valid", 9, 1, 1, True, _chexpert_labels(Atelectasis="pos"))])
  for row in [*CHEX_ROWS, "CheXpert-v1.0-small/valid/patient00009/study1/view1_frontal.jpg"]:
    path = root / chexpert.canonical_name(row.split(",")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpeg")


MIMIC_CSV = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_IDS = [("m1", 10000001, 50000001), ("m2", 10000002, 50000002), ("m3", 10000003, 50000003)]
MIMIC_ROWS = [fx.mimic_row(*ids, "PA") for ids in MIMIC_IDS]  # lines 2-4


def _mimic(root, rows):
  fx.write_csv(root / MIMIC_CSV, fx.MIMIC_HEADER, rows)
  for dicom_id, subject, study in MIMIC_IDS:
    path = root / mimic_cxr_jpg.image_path(str(subject), str(study), dicom_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"jpeg")


RSNA_IDS = ["r0", "r1", "r2"]
RSNA_ROWS = ["r0,,,,,0", "r1,10.0,20.0,30.0,40.0,1", "r1,50.0,20.0,30.0,40.0,1",  # lines 2-4
             "r2,,,,,0"]  # line 5


def _rsna(root, rows):
  fx.write_csv(root / "stage_2_train_labels.csv", RSNA_HEADER, rows)
  for name in RSNA_IDS:
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    (root / f"stage_2_train_images/{name}.dcm").write_bytes(name.encode())


SIIM_IDS = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
SIIM_ROWS = ["1.2.3.1, 5 3 10 2", "1.2.3.1, 40 4", "1.2.3.2, -1", "1.2.3.3, -1"]  # lines 2-5


def _siim(root, rows):
  fx.write_csv(root / "train-rle.csv", "ImageId, EncodedPixels", rows)
  for name in SIIM_IDS:
    path = root / f"dicom-images-train/{name}.7/{name}.8/{name}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(name.encode())


DOWNLOADS = {"nih_chestxray14": (_nih, NIH_ROWS), "chexpert": (_chexpert, CHEX_ROWS),
             "mimic_cxr_jpg": (_mimic, MIMIC_ROWS), "rsna_pneumonia": (_rsna, RSNA_ROWS),
             "siim_acr": (_siim, SIIM_ROWS)}


def _replace(index, row):
  return lambda rows: [*rows[:index], row, *rows[index + 1:]]


def _append(row):
  return lambda rows: [*rows, row]


def _latin1_byte(rel, old, new):
  """Rewrites `old` as `new` encoded in Latin-1: bytes that are not UTF-8 in a UTF-8 file."""
  def edit(root):
    path = root / rel
    path.write_bytes(path.read_bytes().replace(old.encode(), new.encode("latin-1")))
  return edit


def _copy_file(rel, to, content=None):
  def edit(root):
    (root / to).parent.mkdir(parents=True, exist_ok=True)
    (root / to).write_bytes((root / rel).read_bytes() if content is None else content)
  return edit


NIH_4 = "Data_Entry_2017_v2020.csv line 4"
MALFORMED = [
    # (case, dataset, row edit, file edit, {kind: [(name, detail pattern)]}, excluded images)
    ("nih short row", "nih_chestxray14", _replace(2, "00000003_000.png,Hernia,0"), None,
     {"bad_row": [("00000003_000.png", rf"^{NIH_4}: 3 cells where the header has 12: "
                   r"'00000003_000.png,Hernia,0'; image excluded$")]}, {"00000003_000.png"}),
    ("nih long row", "nih_chestxray14", _replace(2, NIH_ROWS[2] + ",x"), None,
     {"bad_row": [("00000003_000.png", rf"^{NIH_4}: 13 cells where the header has 12")]},
     {"00000003_000.png"}),
    ("nih unquoted comma in findings", "nih_chestxray14",
     _replace(2, fx.nih_row("00000003_000.png", "Hernia,Mass", 3)), None,
     {"bad_row": [("00000003_000.png", rf"^{NIH_4}: 13 cells")]}, {"00000003_000.png"}),
    ("nih quoted comma in findings", "nih_chestxray14",
     _replace(2, fx.nih_row("00000003_000.png", '"Hernia,Mass"', 3)), None,
     {"unknown_label": [("00000003_000.png", rf"^{NIH_4}: unknown finding\(s\) \['Hernia,Mass'\]"
                         "; image excluded$")]}, {"00000003_000.png"}),
    ("nih quote left open swallows the next line", "nih_chestxray14",
     _replace(2, fx.nih_row("00000003_000.png", '"Hernia', 3)), None,
     {"bad_row": [("00000003_000.png", r"^Data_Entry_2017_v2020.csv lines 4-5: 2 cells")],
      "unlisted_file": [("images_001/images/00000004_000.png", "no metadata row")]},
     {"00000003_000.png", "00000004_000.png"}),
    ("nih quote left open past the CSV field limit", "nih_chestxray14",
     lambda rows: [*rows[:2], fx.nih_row("00000003_000.png", '"Hernia', 3), "x" * 140_000,
                   *rows[3:]], None,
     {"bad_row": [("Data_Entry_2017_v2020.csv lines 4-5", r"^Data_Entry_2017_v2020.csv lines "
                   r"4-5: unreadable CSV record \(field larger than field limit \(131072\)\); "
                   "no image name to exclude$")],
      "unlisted_file": [("images_001/images/00000003_000.png", "no metadata row")]},
     {"00000003_000.png"}),
    ("nih typo beside a valid row", "nih_chestxray14",
     _append(fx.nih_row("00000002_000.png", "Efusion", 2)), None,
     {"unknown_label": [("00000002_000.png", r"^Data_Entry_2017_v2020.csv line 6: unknown "
                         r"finding\(s\) \['Efusion'\]; image excluded; valid row\(s\) "
                         r"Data_Entry_2017_v2020.csv line 3 ignored$")]}, {"00000002_000.png"}),
    ("nih one name in two folders, different files", "nih_chestxray14", None,
     _copy_file("images_001/images/00000001_000.png", "images_002/images/00000001_000.png",
                b"another image"),
     {"duplicate_file": [("00000001_000.png", r"different files \['images_001/images/0000000"
                          r"1_000.png', 'images_002/images/00000001_000.png'\] share the name; "
                          "image excluded")]}, {"00000001_000.png"}),
    ("nih one name in two folders, identical files", "nih_chestxray14", None,
     _copy_file("images_001/images/00000001_000.png", "images_002/images/00000001_000.png"),
     {"duplicate_file": [("00000001_000.png", r"identical copies .*: "
                          r"'images_001/images/00000001_000.png' used$")]}, set()),
    ("nih non-UTF-8 byte in a row", "nih_chestxray14", None,
     _latin1_byte(NIH_CSV, "00000003_000.png,Hernia", "00000003_000.png,Hernia\xe9"),
     {"bad_row": [("00000003_000.png", rf"^{NIH_4}: byte 0xe9 at column 24 is not UTF-8; "
                   "image excluded$")]}, {"00000003_000.png"}),
    ("chexpert row cut after Cardiomegaly", "chexpert",
     _replace(2, ",".join(CHEX_ROWS[2].split(",")[:8])), None,
     {"bad_row": [("train/patient00003/study1/view1_frontal.jpg",
                   r"^train.csv line 4: 8 cells where the header has 19")]},
     {"train/patient00003/study1/view1_frontal.jpg"}),
    ("chexpert one extra cell", "chexpert", _replace(0, CHEX_ROWS[0].replace(",68,", ",68,,")),
     None, {"bad_row": [("train/patient00001/study1/view1_frontal.jpg",
                         r"^train.csv line 2: 20 cells")]},
     {"train/patient00001/study1/view1_frontal.jpg"}),
    ("chexpert bad label beside a valid row", "chexpert",
     _append(CHEX_ROWS[1].replace("-1.0", "2.0")), None,
     {"unknown_label": [("train/patient00002/study1/view1_frontal.jpg",
                         r"^train.csv line 5: 'Edema' has value '2.0'.*; image excluded; "
                         r"valid row\(s\) train.csv line 3 ignored$")]},
     {"train/patient00002/study1/view1_frontal.jpg"}),
    ("mimic quoted comma in a text cell is read as one cell", "mimic_cxr_jpg",
     _replace(1, MIMIC_ROWS[1].replace("CHEST (PA AND LAT)", '"CHEST (PA, LAT)"', 1)), None,
     {}, set()),
    ("mimic unquoted comma in a text cell", "mimic_cxr_jpg",
     _replace(1, MIMIC_ROWS[1].replace("CHEST (PA AND LAT)", "CHEST (PA, LAT)", 1)), None,
     {"bad_row": [("m2", r"^mimic-cxr-2.0.0-metadata.csv line 3: 13 cells where the header "
                   "has 12")]}, {"files/p10/p10000002/s50000002/m2.jpg"}),
    ("mimic short row", "mimic_cxr_jpg", _replace(2, "m3,10000003,50000003"), None,
     {"bad_row": [("m3", r"^mimic-cxr-2.0.0-metadata.csv line 4: 3 cells")]},
     {"files/p10/p10000003/s50000003/m3.jpg"}),
    ("rsna box row without Target", "rsna_pneumonia", _replace(2, "r1,50.0,20.0,30.0,40.0"), None,
     {"bad_row": [("r1", r"^stage_2_train_labels.csv line 4: 5 cells.*; image excluded; "
                   r"valid row\(s\) stage_2_train_labels.csv line 3 ignored$")]}, {"r1"}),
    ("rsna long row", "rsna_pneumonia", _replace(3, "r2,,,,,0,0"), None,
     {"bad_row": [("r2", r"^stage_2_train_labels.csv line 5: 7 cells")]}, {"r2"}),
    ("siim blank RLE", "siim_acr", _replace(2, "1.2.3.2, "), None,
     {"bad_row": [("1.2.3.2", r"^train-rle.csv line 4: blank EncodedPixels")]}, {"1.2.3.2"}),
    ("siim missing RLE cell", "siim_acr", _replace(3, "1.2.3.3"), None,
     {"bad_row": [("1.2.3.3", r"^train-rle.csv line 5: 1 cells where the header has 2: "
                   "'1.2.3.3'; image excluded$")]}, {"1.2.3.3"}),
    ("siim blank RLE beside two regions", "siim_acr", _append("1.2.3.1,"), None,
     {"bad_row": [("1.2.3.1", r"^train-rle.csv line 6: blank.*; valid row\(s\) train-rle.csv "
                   "line 2, train-rle.csv line 3 ignored$")]}, {"1.2.3.1"}),
    ("siim one name in two folders", "siim_acr", None,
     _copy_file("dicom-images-train/1.2.3.2.7/1.2.3.2.8/1.2.3.2.dcm",
                "dicom-images-train/other/1.2.3.2.dcm", b"another image"),
     {"duplicate_file": [("1.2.3.2", "different files")]}, {"1.2.3.2"}),
]


@pytest.mark.parametrize("case, dataset, edit_rows, edit_files, expected, excluded", MALFORMED,
                         ids=[case[0] for case in MALFORMED])
def test_malformed_metadata_is_reported_and_intact_rows_are_unchanged(
    tmp_path, case, dataset, edit_rows, edit_files, expected, excluded):
  del case
  module = dataset_module(dataset)
  write, rows = DOWNLOADS[dataset]
  write(tmp_path / "clean", rows)
  write(tmp_path / "bad", edit_rows(rows) if edit_rows else rows)
  if edit_files:
    edit_files(tmp_path / "bad")
  for check_files in (False, True):  # The splits use the metadata alone, the records both.
    clean = module.read_manifest(tmp_path / "clean", check_files=check_files)
    assert not clean.problems.items, "the clean fixture itself has problems"
    assert excluded <= {entry.name for entry in clean.entries}
    bad = module.read_manifest(tmp_path / "bad", check_files=check_files)
    wanted = {kind: items for kind, items in expected.items()
              if check_files or kind not in ("duplicate_file", "unlisted_file")}
    assert sorted(bad.problems.items) == sorted(wanted)
    for kind, items in wanted.items():
      found = bad.problems.items[kind]
      assert [item["name"] for item in found] == [name for name, _ in items]
      for item, (_, pattern) in zip(found, items):
        assert re.search(pattern, item["detail"]), (kind, item["detail"])
    # A duplicate file is only seen with check_files: the split files keep the image (it is
    # then counted there as without record).
    gone = excluded if check_files or "duplicate_file" not in expected else set()
    assert bad.entries == [entry for entry in clean.entries if entry.name not in gone]
