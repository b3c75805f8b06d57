"""CheXpert v1.0 (Stanford AIMI): 14 observations with uncertain labels.

Download: https://stanfordmlgroup.github.io/competitions/chexpert/ (CheXpert-v1.0-small, 11 GB,
or the full CheXpert-v1.0). Layout under --src: the folder holding train.csv and valid.csv (or
its parent), with train/patientNNNNN/studyN/viewN_*.jpg and valid/... beside the CSVs.
Quirks (docs/method.md §7):
- `Path` starts with "CheXpert-v1.0-small/" or "CheXpert-v1.0/" by download; it is stripped so
  that both downloads give the same names and split files.
- No patient column: the patient is the patientNNNNN part of the path.
- train.csv and valid.csv are pooled before the 7:2:1 split; frontal views only. The official
  scheme keeps them apart instead (`official_lists`): valid.csv is the test set, as in Medical
  MAE, and validation is carved by patient out of train.csv.
- Label cells: 1 positive, 0 negative, -1 uncertain, blank = not mentioned (-> 0 as a target).
  The uncertainty policy is a reader option (`targets`), so one preparation serves every policy.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from spcl_jax.data.datasets import manifest as mf
from spcl_jax.downstream import CHEXPERT_POLICIES

NAME = "chexpert"
LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
          "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
          "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
# The 5 competition labels in the paper's order: what fine-tuning predicts.
TASK_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
_MEDICAL_MAE_ONES = ("Atelectasis", "Edema")  # Medical MAE's U-Ones labels; the rest U-Zeros.
IMAGE_FORMAT = "file"
PATIENT_SPLIT = True  # gets the 7:2:1 patient split and label fractions
HAS_MASKS = False
CSV_FILES = ("train.csv", "valid.csv")
_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA") + LABELS
_PATH_PREFIX = re.compile(r"^CheXpert-v1\.0[^/]*/")
_PATIENT = re.compile(r"(?:^|/)(patient\d+)/")
_CODES = {"1": mf.POSITIVE, "1.0": mf.POSITIVE, "0": mf.NEGATIVE, "0.0": mf.NEGATIVE,
          "-1": mf.UNCERTAIN, "-1.0": mf.UNCERTAIN, "": mf.BLANK}


def canonical_name(path: str) -> str:
  """'CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg' -> 'train/patient1/...'."""
  return _PATH_PREFIX.sub("", path.strip().lstrip("/"))


def _view(row: dict) -> str:
  frontal_lateral = row["Frontal/Lateral"].strip().lower()
  if frontal_lateral == "frontal":
    position = row["AP/PA"].strip().upper()
    return position if position in ("AP", "PA") else "FRONTAL"
  return frontal_lateral.upper()  # "LATERAL", or "" when blank.


def _labels(row: dict) -> tuple[tuple[int, ...] | None, str]:
  codes = []
  for label in LABELS:
    code = _CODES.get(row[label])
    if code is None:
      return None, f"{label!r} has value {row[label]!r} (expected 1, 0, -1 or blank)"
    codes.append(code)
  return tuple(codes), ""


def _root(src: pathlib.Path) -> pathlib.Path:
  train_csv = mf.find_first(src, ("train.csv", "*/train.csv"), "CheXpert train.csv")
  return train_csv.parent


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  src = pathlib.Path(src)
  root = _root(src)
  prefix = root.relative_to(src).as_posix()
  problems = mf.Problems()
  exclusions = mf.Exclusions()
  entries: dict[str, mf.Entry] = {}
  valid_rows_of: dict[str, list[str]] = {}
  for csv_name in CSV_FILES:
    csv_path = root / csv_name
    if not csv_path.is_file():
      raise FileNotFoundError(f"CheXpert {csv_name} not found at {str(csv_path)!r}: the paper "
                              "pools train.csv and valid.csv, both are needed")
    for row in mf.read_csv_rows(csv_path, _COLUMNS):
      if row.cells is None:
        exclusions.add("bad_row", canonical_name(row.cell_at("Path")), row.where, row.error)
        continue
      name = canonical_name(row.cells["Path"])
      patient = _PATIENT.search(name)
      if not name or patient is None:
        exclusions.add("bad_row", name, row.where, f"no patientNNNNN in Path "
                       f"{row.cells['Path']!r}")
        continue
      labels, why = _labels(row.cells)
      if labels is None:
        exclusions.add("unknown_label", name, row.where, why)
        continue
      path = name if prefix == "." else f"{prefix}/{name}"
      entry = mf.Entry(name=name, path=path, patient=patient.group(1), view=_view(row.cells),
                       labels=labels)
      valid_rows_of.setdefault(name, []).append(row.where)
      mf.keep_first_entry(entries, entry, problems, row.where)
  exclusions.report(problems, valid_rows_of)
  kept = [entry for name, entry in entries.items() if name not in exclusions.names]
  if check_files:
    scanned = [f"{prefix}/{d}" if prefix != "." else d for d in ("train", "valid")]
    present = set()
    for directory in scanned:
      present |= {f"{directory}/{rel}" for rel in mf.files_on_disk(src / directory, (".jpg",))}
    excluded_paths = {name if prefix == "." else f"{prefix}/{name}" for name in exclusions.names}
    kept = mf.check_listed_files(src, kept, problems, present, scanned, excluded_paths)
  return mf.Manifest(NAME, kept, problems, LABELS)


def targets(codes, policy: str = "ones") -> np.ndarray:
  """Raw codes (N, 14) -> float32 (N, 5) targets for TASK_LABELS.

  Blank (not mentioned) -> 0. Uncertain -> 1 under "ones", 0 under "zeros", and under
  "medical_mae" 1 for Atelectasis and Edema, 0 for the rest.
  """
  if policy not in CHEXPERT_POLICIES:
    raise ValueError(f"CheXpert uncertainty policy {policy!r} is not one of "
                     f"{', '.join(CHEXPERT_POLICIES)}")
  codes = np.asarray(codes)[:, [LABELS.index(label) for label in TASK_LABELS]]
  uncertain_value = np.array([
      1.0 if policy == "ones" or (policy == "medical_mae" and label in _MEDICAL_MAE_ONES) else 0.0
      for label in TASK_LABELS], dtype=np.float32)
  out = (codes == mf.POSITIVE).astype(np.float32)
  return np.where(codes == mf.UNCERTAIN, uncertain_value[None, :], out).astype(np.float32)


def official_lists(entries) -> dict[str, list[str]]:
  """The lists the download defines: train.csv's images (train+val) and valid.csv's (test).

  Names keep their CSV's folder ("train/..." or "valid/...") after `canonical_name`, so the
  name tells which CSV listed the image.
  """
  return {"official_train_val": sorted(e.name for e in entries if e.name.startswith("train/")),
          "official_test": sorted(e.name for e in entries if e.name.startswith("valid/"))}
