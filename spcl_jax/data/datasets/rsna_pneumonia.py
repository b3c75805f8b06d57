"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2): DICOM images, pneumonia yes/no.

Download: https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data
Layout under --src: stage_2_train_labels.csv and stage_2_train_images/<patientId>.dcm
(stage_2_test_images/ is ignored: it has no labels).
Quirks (METHOD §7): one CSV row per box (`patientId,x,y,width,height,Target`), so several rows
name one image; the image label is the max Target and every box is kept. A `patientId` names
one image, so the patient-level split is an image-level split. All images are frontal.
"""

from __future__ import annotations

import pathlib

from spcl_jax.data.datasets import manifest as mf

NAME = "rsna_pneumonia"
LABELS = ("Pneumonia",)
TASK_LABELS = LABELS
IMAGE_FORMAT = "dicom"
PATIENT_SPLIT = True  # gets the 7:2:1 patient split and label fractions
HAS_MASKS = False
official_lists = None
LABELS_CSV = "stage_2_train_labels.csv"
IMAGE_DIR = "stage_2_train_images"
_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
_BOX = ("x", "y", "width", "height")


def _parse_row(row: dict) -> tuple[int | None, tuple | None, str, str]:
  """-> (target, box or None, problem kind, why)."""
  if row["Target"] not in ("0", "1"):
    return None, None, "unknown_label", f"Target {row['Target']!r} (expected 0 or 1)"
  target = int(row["Target"])
  if target == 0:
    return 0, None, "", ""
  try:
    box = tuple(float(row[column]) for column in _BOX)
  except ValueError:
    return None, None, "bad_row", f"Target 1 without a numeric box {[row[c] for c in _BOX]}"
  if box[2] <= 0 or box[3] <= 0:
    return None, None, "bad_row", f"box {box} has no area"
  return 1, box, "", ""


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  src = pathlib.Path(src)
  labels_csv = mf.find_first(src, (LABELS_CSV, f"*/{LABELS_CSV}"), "RSNA labels CSV")
  problems = mf.Problems()
  targets_of: dict[str, list[int]] = {}
  boxes_of: dict[str, list[tuple]] = {}
  valid_rows_of: dict[str, list[str]] = {}
  exclusions = mf.Exclusions()  # One bad row may have been the positive one: drop the image.
  for row in mf.read_csv_rows(labels_csv, _COLUMNS):
    if row.cells is None:
      exclusions.add("bad_row", row.cell_at("patientId"), row.where, row.error)
      continue
    name = row.cells["patientId"]
    if not name:
      exclusions.add("bad_row", "", row.where, "empty patientId")
      continue
    target, box, kind, why = _parse_row(row.cells)
    if target is None:
      exclusions.add(kind, name, row.where, why)
      continue
    valid_rows_of.setdefault(name, []).append(row.where)
    if box is not None and box in boxes_of.get(name, ()):
      problems.add("duplicate_row", name, f"{row.where}: repeats box {box}")
      continue
    targets_of.setdefault(name, []).append(target)
    if box is not None:
      boxes_of.setdefault(name, []).append(box)
  exclusions.report(problems, valid_rows_of)
  entries = []
  for name, targets_seen in targets_of.items():
    if name in exclusions.names:
      continue
    if len(set(targets_seen)) > 1:
      problems.add("conflicting_rows", name, f"Targets {targets_seen}: label = max = 1")
    elif targets_seen.count(0) > 1:
      problems.add("duplicate_row", name, f"{targets_seen.count(0)} rows with Target 0")
    entries.append(mf.Entry(name=name, path=f"{IMAGE_DIR}/{name}.dcm", patient=name,
                            view="FRONTAL", labels=(max(targets_seen),),
                            boxes=tuple(boxes_of.get(name, ()))))
  if check_files:
    present = {f"{IMAGE_DIR}/{rel}" for rel in mf.files_on_disk(src / IMAGE_DIR, (".dcm",))}
    entries = mf.check_listed_files(src, entries, problems, present, [IMAGE_DIR],
                                    {f"{IMAGE_DIR}/{name}.dcm" for name in exclusions.names})
  return mf.Manifest(NAME, entries, problems, LABELS)


targets = mf.positive_targets  # no uncertain labels: POSITIVE -> 1, everything else 0
