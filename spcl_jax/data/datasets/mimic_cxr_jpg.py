"""MIMIC-CXR-JPG v2 (PhysioNet, credentialed): the pre-training set. No labels are used.

Download: https://physionet.org/content/mimic-cxr-jpg/ (v2.0.0 or v2.1.0; credentialed access).
Layout under --src (the version folder, e.g. physionet.org/files/mimic-cxr-jpg/2.0.0/):
  mimic-cxr-2.0.0-metadata.csv.gz      (or the unzipped .csv)
  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
Quirks: `ViewPosition` is blank for some images (kept in the manifest with view "", excluded and
counted as blank_view when frontal views are asked); frontal means exactly PA or AP.
"""

from __future__ import annotations

import pathlib

from spcl_jax.data.datasets import manifest as mf

NAME = "mimic_cxr_jpg"
LABELS: tuple[str, ...] = ()
TASK_LABELS: tuple[str, ...] = ()
IMAGE_FORMAT = "file"
PATIENT_SPLIT = False  # Pre-training only: no 7:2:1 split, only all.txt.
HAS_MASKS = False
targets = None  # no labels to predict
official_lists = None
METADATA_PATTERNS = ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv")
IMAGE_DIR = "files"
_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")


def image_path(subject_id: str, study_id: str, dicom_id: str) -> str:
  return f"{IMAGE_DIR}/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def _dicom_id(path: str) -> str:
  return pathlib.PurePosixPath(path).stem


def _row_error(row: dict) -> str:
  if not row["dicom_id"]:
    return "empty dicom_id"
  for column in ("subject_id", "study_id"):
    if not row[column].isdigit():
      return f"{column} {row[column]!r} is not a number"
  return ""


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  src = pathlib.Path(src)
  metadata = mf.find_first(src, METADATA_PATTERNS, "MIMIC-CXR-JPG metadata")
  problems = mf.Problems()
  exclusions = mf.Exclusions()  # Keyed by dicom_id: a bad row's path may not be computable.
  entries: dict[str, mf.Entry] = {}
  valid_rows_of: dict[str, list[str]] = {}
  for row in mf.read_csv_rows(metadata, _COLUMNS):
    if row.cells is None:
      exclusions.add("bad_row", row.cell_at("dicom_id"), row.where, row.error)
      continue
    error = _row_error(row.cells)
    if error:
      exclusions.add("bad_row", row.cells["dicom_id"], row.where, error)
      continue
    cells = row.cells
    path = image_path(cells["subject_id"], cells["study_id"], cells["dicom_id"])
    entry = mf.Entry(name=path, path=path, patient=cells["subject_id"],
                     view=cells["ViewPosition"].upper())
    valid_rows_of.setdefault(cells["dicom_id"], []).append(row.where)
    mf.keep_first_entry(entries, entry, problems, row.where)
  exclusions.report(problems, valid_rows_of)
  kept = [entry for path, entry in entries.items() if _dicom_id(path) not in exclusions.names]
  if check_files:
    present = set(mf.files_on_disk(src / IMAGE_DIR, (".jpg",)))
    present = {f"{IMAGE_DIR}/{path}" for path in present}
    excluded_paths = {path for path in present if _dicom_id(path) in exclusions.names}
    kept = mf.check_listed_files(src, kept, problems, present, [IMAGE_DIR], excluded_paths)
  return mf.Manifest(NAME, kept, problems, LABELS)
