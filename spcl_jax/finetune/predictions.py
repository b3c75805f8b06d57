"""Per-image predictions of a fine-tuning run: WORKDIR/predictions/<split>_<which>.csv.

  val_best_val.csv        val, at the best-on-val parameters (the ones test is scored with)
  test_best_val.csv       test, at the best-on-val parameters (results.json test_at_best_val)
  test_last_epoch.csv     test, at the last parameters (results.json test_at_last_epoch)
One row per image in split (record) order: `name`, `patient`, then
  classification  label_<class> (the target the run scored against, after the uncertainty
                  policy) and prob_<class> = sigmoid(logit), per class in results.json order
  segmentation    intersection, true_pixels, predicted_pixels (|T&P|, |T|, |P| at threshold 0.5,
                  at the model's input size) and predicted_area (|P| / pixels of the input)
Probabilities are computed in float64 from the float32 logits and written with 17 significant
digits, so that two images whose logits differ never tie in the file: an AUC recomputed from the
CSV (scikit-learn, R's pROC, a DeLong test) is the one results.json reports. results.json names
each file with its sha256 (`predictions`), so a copy can be checked against the run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from spcl_jax.downstream import CLASSIFICATION_PROTOCOLS
from spcl_jax.workdir_path import is_url, rewrite_text

FOLDER = "predictions"
SEGMENTATION_COLUMNS = ("intersection", "true_pixels", "predicted_pixels", "predicted_area")


def sigmoid(logits: np.ndarray) -> np.ndarray:
  """float64 sigmoid, stable for large |logit| (no overflow in exp)."""
  x = np.asarray(logits, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def format_number(value: float) -> str:
  return format(float(value), ".17g")


def classification_rows(names: Sequence[str], patients: Sequence[str], targets: np.ndarray,
                        logits: np.ndarray, classes: Sequence[str]
                        ) -> tuple[list[str], list[list[str]]]:
  if not len(names) == len(patients) == len(targets) == len(logits):
    raise ValueError(f"predictions: {len(names)} names, {len(patients)} patients, "
                     f"{len(targets)} targets and {len(logits)} outputs do not align")
  header = (["name", "patient"] + [f"label_{c}" for c in classes]
            + [f"prob_{c}" for c in classes])
  probabilities = sigmoid(logits)
  rows = [[name, patient, *(format_number(y) for y in target), *(format_number(p) for p in prob)]
          for name, patient, target, prob in zip(names, patients, targets, probabilities)]
  return header, rows


def segmentation_rows(names: Sequence[str], patients: Sequence[str], counts: np.ndarray,
                      image_size: int) -> tuple[list[str], list[list[str]]]:
  if not len(names) == len(patients) == len(counts):
    raise ValueError(f"predictions: {len(names)} names, {len(patients)} patients and "
                     f"{len(counts)} outputs do not align")
  header = ["name", "patient", *SEGMENTATION_COLUMNS]
  rows = [[name, patient, *(str(int(c)) for c in count),
           format_number(count[2] / (image_size * image_size))]
          for name, patient, count in zip(names, patients, counts)]
  return header, rows


def csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buffer.getvalue()


def source_names_and_patients(source) -> tuple[list[str], list[str]]:
  """Image names and patient ids of a LabelledSource, in its (record) order."""
  folder = source.folder
  return ([folder.names[i] for i in source.indices],
          [folder.patients[i] for i in source.indices])


class PredictionWriter:
  """Writes the CSVs of one run (on the main process) and lists them for results.json.

  Every process builds the same text, so every process returns the same listing.
  """

  def __init__(self, workdir: pathlib.Path, protocol: str, classes: Sequence[str],
               image_size: int, enabled: bool = True):
    self.folder = workdir / FOLDER
    self.protocol, self.classes = protocol, list(classes)
    self.image_size, self.enabled = image_size, enabled
    self.files: dict[str, dict[str, str]] = {}

  def write(self, split: str, which: str, source, outputs: np.ndarray) -> dict[str, str]:
    names, patients = source_names_and_patients(source)
    if self.protocol in CLASSIFICATION_PROTOCOLS:
      header, rows = classification_rows(names, patients, source.targets, outputs, self.classes)
    else:
      header, rows = segmentation_rows(names, patients, outputs, self.image_size)
    text = csv_text(header, rows)
    file_name = f"{split}_{which}.csv"
    if self.enabled:
      if not is_url(self.folder):  # a bucket has no folders to make
        self.folder.mkdir(parents=True, exist_ok=True)
      rewrite_text(self.folder / file_name, text)
    entry = {"file": f"{FOLDER}/{file_name}",
             "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    self.files[f"{split}_{which}"] = entry
    return entry

  def listing(self) -> dict[str, Any]:
    return dict(self.files)


def read_classification_csv(path: str | pathlib.Path) -> dict[str, Any]:
  """A classification predictions CSV -> {names, patients, classes, labels (N, K), probs (N, K)}."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  header, body = rows[0], rows[1:]
  classes = [c.removeprefix("label_") for c in header if c.startswith("label_")]
  k = len(classes)
  values = np.asarray([[float(v) for v in row[2:]] for row in body], np.float64).reshape(-1, 2 * k)
  return {"names": [row[0] for row in body], "patients": [row[1] for row in body],
          "classes": classes, "labels": values[:, :k], "probs": values[:, k:]}
