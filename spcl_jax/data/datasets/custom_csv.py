"""Your own labelled radiographs: one CSV row per image (dataset name `csv`).

  python -m spcl_jax.data.prepare csv --src labels.csv --image-root DIR --out OUT \
      --label-columns A,B,C --uncertain zeros|ones|exclude \
      [--image-column path] [--patient-column P] [--view-column V --views frontal|all]
The image column holds each file's path relative to --image-root (PNG, JPEG, or DICOM when
every listed path ends in .dcm/.dicom); it is also the image's name in the split files. Label
cells: 1/1.0/true/yes/positive, 0/0.0/false/no/negative, -1/-1.0/uncertain, or blank. Uncertain
and blank cells follow --uncertain, which has no default (a silent choice would change the
labels): `ones` or `zeros` sets them (each such image is listed under uncertain_label), `exclude`
drops the image. Any other value is an unknown_label and excludes the image, as a row with the
wrong number of cells is a bad_row; both are listed in OUT/report.json, never fatal.
Patients: --patient-column keeps each patient's images in one split (7:2:1 by patient, nested
1% / 10% of train, as the built-in datasets); without it every image is its own patient, so
two images of one person may land in train and test. Views: with --view-column, PA, AP and
FRONTAL (any case) are frontal and `--views frontal` (the default) keeps only those; without it
every image is taken as frontal. The settings, classes included, are kept in report.json, so
fine-tuning (`configs/finetune/custom.py`, config.task='custom') reads the classes from there.
"""

from __future__ import annotations

import pathlib
import types
from typing import Any

from spcl_jax.data.datasets import manifest as mf

NAME = "csv"
LABELS: tuple[str, ...] = ()       # set per prepared folder, from --label-columns (`configured`)
TASK_LABELS: tuple[str, ...] = ()
IMAGE_FORMAT = "file"
PATIENT_SPLIT = True
HAS_MASKS = False
official_lists = None
targets = mf.positive_targets  # the --uncertain policy is applied when the manifest is read
UNCERTAIN_POLICIES = ("zeros", "ones", "exclude")
SETTINGS = ("image_root", "label_columns", "image_column", "patient_column", "view_column",
            "uncertain")
_VALUES = {**dict.fromkeys(("1", "1.0", "true", "yes", "positive"), mf.POSITIVE),
           **dict.fromkeys(("0", "0.0", "false", "no", "negative"), mf.NEGATIVE),
           **dict.fromkeys(("-1", "-1.0", "uncertain"), mf.UNCERTAIN), "": mf.BLANK}
_DICOM_SUFFIXES = (".dcm", ".dicom")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *_DICOM_SUFFIXES)


def read_manifest(src, *, check_files: bool = True) -> mf.Manifest:
  raise ValueError("the csv dataset needs its settings (--image-root, --label-columns, "
                   "--uncertain): read it through dataset_module('csv', settings)")


def label_codes(row: dict[str, str], columns: tuple[str, ...], policy: str
                ) -> tuple[tuple[int, ...] | None, str, str]:
  """Cells -> (codes after the policy, "", note on uncertain cells) or (None, kind, why)."""
  codes, uncertain = [], []
  for column in columns:
    code = _VALUES.get(row[column].strip().lower())
    if code is None:
      return None, "unknown_label", (f"{column!r} has value {row[column]!r} (expected 1, 0, -1, "
                                     "uncertain or blank)")
    if code in (mf.UNCERTAIN, mf.BLANK):
      uncertain.append(column)
      code = mf.POSITIVE if policy == "ones" else mf.NEGATIVE
    codes.append(code)
  if uncertain and policy == "exclude":
    return None, "uncertain_label", f"uncertain or blank {uncertain}; image excluded (--uncertain exclude)"
  note = f"uncertain or blank {uncertain} set to {int(policy == 'ones')} (--uncertain {policy})"
  return tuple(codes), "", note if uncertain else ""


def _view(row: dict[str, str], view_column: str | None) -> str:
  if not view_column:
    return "FRONTAL"
  return row[view_column].strip().upper()


def read_manifest_with(src: pathlib.Path, settings: dict[str, Any], *,
                       check_files: bool = True) -> mf.Manifest:
  columns = tuple(settings["label_columns"])
  image_column, patient_column = settings["image_column"], settings.get("patient_column")
  view_column, policy = settings.get("view_column"), settings["uncertain"]
  required = [image_column, *columns, *(c for c in (patient_column, view_column) if c)]
  problems, exclusions = mf.Problems(), mf.Exclusions()
  entries: dict[str, mf.Entry] = {}
  valid_rows_of: dict[str, list[str]] = {}
  uncertain: list[tuple[str, str]] = []
  for row in mf.read_csv_rows(pathlib.Path(src), required):
    if row.cells is None:
      exclusions.add("bad_row", row.cell_at(image_column).lstrip("/"), row.where, row.error)
      continue
    name = row.cells[image_column].lstrip("/")
    patient = row.cells[patient_column] if patient_column else name
    if not name or not patient:
      exclusions.add("bad_row", name, row.where, f"blank {image_column!r} or "
                     f"{patient_column!r} cell")
      continue
    codes, kind, why = label_codes(row.cells, columns, policy)
    if codes is None:
      exclusions.add(kind, name, row.where, why)
      continue
    if why:
      uncertain.append((name, f"{row.where}: {why}"))
    entry = mf.Entry(name=name, path=name, patient=patient, view=_view(row.cells, view_column),
                     labels=codes)
    valid_rows_of.setdefault(name, []).append(row.where)
    mf.keep_first_entry(entries, entry, problems, row.where)
  exclusions.report(problems, valid_rows_of)
  for name, detail in uncertain:
    if name not in exclusions.names:
      problems.add("uncertain_label", name, detail)
  kept = [entry for name, entry in entries.items() if name not in exclusions.names]
  if check_files:
    root = pathlib.Path(settings["image_root"])
    present = set(mf.files_on_disk(root, _IMAGE_SUFFIXES))
    kept = mf.check_listed_files(root, kept, problems, present, scanned_dirs=[])
  return mf.Manifest(NAME, kept, problems, columns)


def configured(settings: dict[str, Any]) -> types.SimpleNamespace:
  """This dataset with one prepared folder's settings: its classes, image root and reader."""
  missing = [key for key in ("image_root", "label_columns", "image_column", "uncertain")
             if not settings.get(key)]
  if missing:
    raise ValueError(f"the csv dataset needs --{missing[0].replace('_', '-')}")
  if settings["uncertain"] not in UNCERTAIN_POLICIES:
    raise ValueError(f"--uncertain {settings['uncertain']!r} is not one of "
                     f"{', '.join(UNCERTAIN_POLICIES)}")
  columns = tuple(settings["label_columns"])
  if len(set(columns)) != len(columns):
    raise ValueError(f"--label-columns {','.join(columns)} names a column twice")

  def read(src, *, check_files: bool = True) -> mf.Manifest:
    return read_manifest_with(src, settings, check_files=check_files)
  return types.SimpleNamespace(
      __name__=__name__, __doc__=__doc__, NAME=NAME, LABELS=columns, TASK_LABELS=columns,
      IMAGE_FORMAT=settings.get("image_format", IMAGE_FORMAT), PATIENT_SPLIT=PATIENT_SPLIT,
      HAS_MASKS=HAS_MASKS, targets=targets, official_lists=official_lists,
      read_manifest=read, IMAGE_ROOT=pathlib.Path(settings["image_root"]))


def image_format_of(src: pathlib.Path, image_column: str) -> str:
  """'dicom' when every listed path ends in .dcm/.dicom, else 'file' (PNG/JPEG)."""
  names = [row.cell_at(image_column).lower() for row in mf.read_csv_rows(src, [image_column])]
  names = [n for n in names if n]
  return "dicom" if names and all(n.endswith(_DICOM_SUFFIXES) for n in names) else "file"
