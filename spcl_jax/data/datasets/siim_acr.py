"""SIIM-ACR Pneumothorax Segmentation (Kaggle, stage 1 release): DICOM images and RLE masks.

Download: https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation (the stage 1 files:
train-rle.csv and dicom-images-train/, as mirrored by the "siim-train-test" Kaggle dataset).
Layout under --src: train-rle.csv and dicom-images-train/<study>/<series>/<ImageId>.dcm
(files are found by name at any depth under dicom-images-train/).
Quirks (METHOD §7): the header is "ImageId, EncodedPixels" (leading space); "-1" = no
pneumothorax; several rows of one image are several regions (united). The RLE is Kaggle's
relative, column-major variant (`spcl_jax.data.rle`). The stage 2 `stage_2_train.csv` uses
absolute run starts instead, so it is deliberately not read. There is no patient id in the
metadata: each ImageId is taken as its own patient (image-level split). All images are frontal.
"""

from __future__ import annotations

import pathlib

from spcl_jax.data import rle
from spcl_jax.data.datasets import manifest as mf

NAME = "siim_acr"
LABELS = ("Pneumothorax",)
TASK_LABELS = LABELS
IMAGE_FORMAT = "dicom"
PATIENT_SPLIT = True  # gets the 7:2:1 patient split and label fractions
official_lists = None
HAS_MASKS = True
RLE_CSV = "train-rle.csv"
IMAGE_DIR = "dicom-images-train"
_COLUMNS = ("ImageId", "EncodedPixels")


def _merge_rows(name: str, texts: list[str], problems: mf.Problems) -> tuple[str, ...]:
  """All RLE rows of one image -> the rows to unite ("-1" alone for an empty mask)."""
  runs = [t for t in texts if t != rle.EMPTY_MASK]
  unique_runs = list(dict.fromkeys(runs))
  if len(unique_runs) < len(runs) or (not runs and len(texts) > 1):
    problems.add("duplicate_row", name, f"{len(texts)} rows, some identical")
  if runs and len(runs) < len(texts):
    problems.add("conflicting_rows", name, f"{len(texts) - len(runs)} '-1' row(s) beside "
                 f"{len(runs)} region(s): regions kept, label 1")
  return tuple(unique_runs) or (rle.EMPTY_MASK,)


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  src = pathlib.Path(src)
  rle_csv = mf.find_first(src, (RLE_CSV, f"*/{RLE_CSV}"), "SIIM train-rle.csv")
  problems = mf.Problems()
  rows_of: dict[str, list[str]] = {}
  valid_rows_of: dict[str, list[str]] = {}
  exclusions = mf.Exclusions()  # A bad row may have been a region: the mask is unknowable.
  for row in mf.read_csv_rows(rle_csv, _COLUMNS):
    if row.cells is None:  # E.g. an ImageId without its EncodedPixels cell.
      exclusions.add("bad_row", row.cell_at("ImageId"), row.where, row.error)
      continue
    name, text = row.cells["ImageId"], row.cells["EncodedPixels"]
    if not name:
      exclusions.add("bad_row", "", row.where, "empty ImageId")
      continue
    if not text:  # Not an empty mask: that is written "-1".
      exclusions.add("bad_row", name, row.where, "blank EncodedPixels (an empty mask is '-1')")
      continue
    try:
      rle.parse_runs(text)
    except ValueError as e:
      exclusions.add("bad_mask", name, row.where, str(e))
      continue
    valid_rows_of.setdefault(name, []).append(row.where)
    rows_of.setdefault(name, []).append(text)
  exclusions.report(problems, valid_rows_of)
  on_disk = mf.files_on_disk(src / IMAGE_DIR, (".dcm",)) if check_files else {}
  rel_of_name, ambiguous = mf.index_by_file_name(
      on_disk, lambda rel: pathlib.PurePosixPath(rel).stem, problems)
  path_of_name = {name: f"{IMAGE_DIR}/{rel}" for name, rel in rel_of_name.items()}
  entries = []
  for name, texts in rows_of.items():
    if name in exclusions.names or name in ambiguous:
      continue
    mask_rles = _merge_rows(name, texts, problems)
    label = mf.POSITIVE if mask_rles != (rle.EMPTY_MASK,) else mf.NEGATIVE
    entries.append(mf.Entry(name=name, path=path_of_name.get(name, f"{IMAGE_DIR}/{name}.dcm"),
                            patient=name, view="FRONTAL", labels=(label,), mask_rles=mask_rles))
  if check_files:
    excluded_paths = {path_of_name[name] for name in exclusions.names if name in path_of_name}
    entries = mf.check_listed_files(src, entries, problems, set(path_of_name.values()),
                                    [IMAGE_DIR], excluded_paths)
  return mf.Manifest(NAME, entries, problems, LABELS)


targets = mf.positive_targets  # no uncertain labels: POSITIVE -> 1, everything else 0
