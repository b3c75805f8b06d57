"""NIH ChestX-ray14: 112,120 frontal PNGs, 14 findings mined from reports (multi-label).

Download: https://nihcc.app.box.com/v/ChestXray-NIHCC (images_001.tar.gz ... images_012.tar.gz,
Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt); the Kaggle mirror
"nih-chest-xrays/data" has the same files with images in images_001/images/ ... folders.
Layout under --src: Data_Entry_2017*.csv, the PNGs anywhere below (found by file name), and
optionally train_val_list.txt / test_list.txt, which become splits/official_*.txt.
Quirks: `Finding Labels` joins findings with "|"; "No Finding" means all 14 are negative and may
not appear with a finding (such a row is reported and excluded). Image names are unique ids; one
name in two images_* folders is a duplicate_file (identical copies: the first path in sorted order).
"""

from __future__ import annotations

import pathlib

from spcl_jax.data.datasets import manifest as mf

NAME = "nih_chestxray14"
LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
          "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
          "Pleural_Thickening", "Hernia")
TASK_LABELS = LABELS
IMAGE_FORMAT = "file"
PATIENT_SPLIT = True  # gets the 7:2:1 patient split and label fractions
HAS_MASKS = False
official_lists = None  # read_manifest reads the official lists into Manifest.official_splits
NO_FINDING = "No Finding"
METADATA_PATTERNS = ("Data_Entry_2017*.csv", "*/Data_Entry_2017*.csv")
OFFICIAL_LISTS = {"official_train_val": "train_val_list.txt", "official_test": "test_list.txt"}
_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def parse_findings(text: str) -> tuple[tuple[int, ...] | None, str, str]:
  """'A|B' -> (codes in LABELS order, "", ""), or (None, problem kind, why)."""
  findings = [finding.strip() for finding in text.split("|") if finding.strip()]
  if not findings:
    return None, "bad_row", "empty Finding Labels"
  unknown = [f for f in findings if f not in LABELS and f != NO_FINDING]
  if unknown:
    return None, "unknown_label", f"unknown finding(s) {unknown}"
  if NO_FINDING in findings and len(findings) > 1:
    return None, "conflicting_rows", f"{NO_FINDING!r} together with findings {findings}"
  return tuple(mf.POSITIVE if label in findings else mf.NEGATIVE for label in LABELS), "", ""


def _patient(text: str) -> str | None:
  return str(int(text)) if text.isdigit() else None  # "00042" and "42" are one patient.


def _read_official_lists(src: pathlib.Path, names: set[str], problems: mf.Problems
                         ) -> dict[str, list[str]]:
  lists = {}
  for stem, file_name in OFFICIAL_LISTS.items():
    found = sorted(src.glob(file_name)) or sorted(src.glob(f"*/{file_name}"))
    if not found:
      continue
    listed = [line.strip() for line in found[0].read_text().splitlines() if line.strip()]
    for name in listed:
      if name not in names:
        problems.add("not_in_metadata", name, f"listed in {file_name}")
    lists[stem] = sorted(set(listed) & names)
  return lists


def _file_name(rel: str) -> str:
  return pathlib.PurePosixPath(rel).name


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  src = pathlib.Path(src)
  metadata = mf.find_first(src, METADATA_PATTERNS, "ChestX-ray14 Data_Entry_2017 CSV")
  problems = mf.Problems()
  exclusions = mf.Exclusions()
  on_disk = mf.files_on_disk(src, (".png",)) if check_files else {}
  path_of_name, ambiguous = mf.index_by_file_name(on_disk, _file_name, problems)
  entries: dict[str, mf.Entry] = {}
  valid_rows_of: dict[str, list[str]] = {}
  for row in mf.read_csv_rows(metadata, _COLUMNS):
    if row.cells is None:  # E.g. an unquoted comma in Finding Labels.
      exclusions.add("bad_row", row.cell_at("Image Index"), row.where, row.error)
      continue
    name, patient = row.cells["Image Index"], _patient(row.cells["Patient ID"])
    if not name or patient is None:
      exclusions.add("bad_row", name, row.where, f"bad Image Index or Patient ID "
                     f"{row.cells['Patient ID']!r}")
      continue
    labels, kind, why = parse_findings(row.cells["Finding Labels"])
    if labels is None:
      exclusions.add(kind, name, row.where, why)
      continue
    entry = mf.Entry(name=name, path=path_of_name.get(name, f"images/{name}"), patient=patient,
                     view=row.cells["View Position"].upper(), labels=labels)
    valid_rows_of.setdefault(name, []).append(row.where)
    mf.keep_first_entry(entries, entry, problems, row.where)
  exclusions.report(problems, valid_rows_of)
  named = set(entries) | exclusions.names  # Files of excluded images are reported, not unlisted.
  kept = [entry for name, entry in entries.items()
          if name not in exclusions.names and name not in ambiguous]
  if check_files:
    for rel in sorted(on_disk):
      if _file_name(rel) not in named:
        problems.add("unlisted_file", rel, "no metadata row names this file")
    kept = mf.check_listed_files(src, kept, problems, set(on_disk), scanned_dirs=[])
  official = _read_official_lists(src, named, problems)
  return mf.Manifest(NAME, kept, problems, LABELS, official)


targets = mf.positive_targets  # no uncertain labels: POSITIVE -> 1, everything else 0
