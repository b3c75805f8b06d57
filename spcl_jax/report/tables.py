"""The paper's Tables 1-4 from fine-tuning results: cells indexed by (row, task, protocol, %).

Every method row appears in every table; a (method, task, protocol, fraction) without a result
is an empty cell. Two results for one cell are an error (never a silent pick).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
from typing import Any

from spcl_jax import downstream
from spcl_jax.data.datasets import chexpert, nih_chestxray14
from spcl_jax.downstream import CLASSIFICATION_PROTOCOLS, LABEL_FRACTIONS, SELECTIONS
from spcl_jax.report.runs import Method, final_labels

CLASSIFICATION_TASKS = tuple((task, downstream.TASK_TITLES[task])
                             for task in downstream.CLASSIFICATION_TASKS)
# Table 2 in the paper's column order; Table 3 in the dataset's (and Medical MAE's) order.
CHEXPERT_CLASSES = chexpert.TASK_LABELS
NIH_CLASSES = nih_chestxray14.LABELS
PROTOCOL_TITLES = {"mgca": "MGCA-style", "upernet512": "UperNet 512"}
SEGMENTATION_PROTOCOLS = tuple((protocol, PROTOCOL_TITLES[protocol])
                               for protocol in downstream.SEGMENTATION_PROTOCOLS)
DICE_METRICS = {
    "dice_positive": "mean Dice over the test images with a pneumothorax",
    "dice_per_image": "per-image Dice over all test images, an empty truth scoring 1 if the "
                      "prediction is empty and 0 otherwise",
    "dice_global": "Dice of all test pixels pooled",
}
TRIVIAL_ROW = "all-empty prediction"
SPLIT_SCHEME_ROW = "split scheme"


@dataclasses.dataclass(frozen=True)
class Score:
  """A fraction (AUC, Dice) shown in percent; std over seeds when the run has several."""

  mean: float
  std: float | None = None

  def markdown(self) -> str:
    text = f"{100 * self.mean:.1f}"
    return text if self.std is None else f"{text} ± {100 * self.std:.1f}"

  def csv(self) -> str:
    return f"{100 * self.mean:.2f}"


@dataclasses.dataclass
class Table:
  name: str
  title: str
  columns: list[str]
  rows: list[list[Any]]       # str, float, Score or None (empty)
  notes: list[str]

  def markdown(self) -> str:
    lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
             "|" + "|".join(" --- " for _ in self.columns) + "|"]
    for row in self.rows:
      lines.append("| " + " | ".join(_markdown_cell(c) for c in row) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in self.notes]) + "\n"

  def with_columns(self, keep) -> Table:
    """The table with only the columns whose name `keep(name)` accepts (e.g. one dataset)."""
    kept = [i for i, name in enumerate(self.columns) if keep(name)]
    return Table(self.name, self.title, [self.columns[i] for i in kept],
                 [[row[i] for i in kept] for row in self.rows], self.notes)

  def csv(self) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(self.columns)
    for row in self.rows:
      writer.writerow([_csv_cell(c) for c in row])
    return out.getvalue()


def _markdown_cell(cell: Any) -> str:
  if cell is None:
    return ""
  if isinstance(cell, Score):
    return cell.markdown()
  if isinstance(cell, float):
    return f"{cell:.3g}"
  return str(cell).replace("|", "\\|")


def _csv_cell(cell: Any) -> str:
  if cell is None:
    return ""
  if isinstance(cell, Score):
    return cell.csv()
  if isinstance(cell, float):
    return f"{cell:.6g}"
  return str(cell)


def _field(result: dict[str, Any], path: pathlib.Path, *keys: str) -> Any:
  value = result
  for i, key in enumerate(keys):
    if not isinstance(value, dict) or key not in value:
      raise ValueError(f"{path}: no field {'.'.join(keys[:i + 1])!r}")
    value = value[key]
  return value


class Cells:
  """(row key, task, protocol, fraction) -> (result, path), with the selected test section."""

  def __init__(self, selection: str):
    self.section = SELECTIONS[selection]
    self._cells: dict[tuple[str, str, str, int], tuple[dict[str, Any], pathlib.Path]] = {}

  def add(self, row: str, result: dict[str, Any], path: pathlib.Path) -> None:
    # Full fine-tuning and linear evaluation fill Table 1's columns in rows of their own.
    protocol = result["protocol"]
    if protocol in CLASSIFICATION_PROTOCOLS:
      protocol = "classification"
    key = (row, result["task"], protocol, result["label_fraction"])
    if key in self._cells:
      other = self._cells[key][1]
      raise ValueError(
          f"two results for one cell ({row.split(chr(0))[0]}, {key[1]}, {key[2]}, {key[3]}%): "
          f"{other} and {path}; pass only one, or --name to give their pre-training runs "
          "different rows")
    self._cells[key] = (result, path)

  def _get(self, row, task, protocol, fraction):
    return self._cells.get((row, task, protocol, fraction))

  def auc(self, row: str, task: str, fraction: int, class_name: str | None = None) -> Score | None:
    found = self._get(row, task, "classification", fraction)
    if found is None:
      return None
    result, path = found
    section = _field(result, path, self.section)
    if class_name is None:
      return Score(_field(result, path, self.section, "macro_auc"), section.get("macro_auc_std"))
    return Score(_field(result, path, self.section, "per_class", class_name),
                 section.get("per_class_std", {}).get(class_name))

  def dice(self, row: str, protocol: str, fraction: int, metric: str,
           trivial: bool = False) -> Score | None:
    found = self._get(row, "siim", protocol, fraction)
    if found is None:
      return None
    result, path = found
    if trivial:
      return Score(_field(result, path, self.section, "trivial", metric))
    return Score(_field(result, path, self.section, metric),
                 _field(result, path, self.section).get(f"{metric}_std"))

  def trivial_dice(self, rows: list[str], protocol: str, fraction: int,
                   metric: str) -> Score | None:
    """The all-empty prediction's Dice on the test set (the same for every method)."""
    for row in rows:
      score = self.dice(row, protocol, fraction, metric, trivial=True)
      if score is not None:
        return score
    return None

  def split_schemes(self, tasks: tuple[str, ...], fraction: int | None = None,
                    protocol: str | None = None) -> list[str]:
    return sorted({r.get("split_scheme", "?") for (_, t, p, f), (r, _) in self._cells.items()
                   if t in tasks and fraction in (None, f) and protocol in (None, p)})


def split_scheme_row(cells: Cells, columns: list[tuple[str, str, int]], leading: int) -> list:
  """The table's first row: the split scheme(s) of each column's results (task, protocol, %)."""
  row: list[Any] = [SPLIT_SCHEME_ROW] + [None] * (leading - 1)
  for task, protocol, fraction in columns:
    row.append(", ".join(cells.split_schemes((task,), fraction, protocol)) or None)
  return row


def _selection_note(cells: Cells, tasks: tuple[str, ...]) -> str:
  at = "the best validation epoch" if cells.section == "test_at_best_val" else "the last epoch"
  schemes = ", ".join(cells.split_schemes(tasks)) or "none yet"
  return (f"Test split at {at}, in percent; 'a ± b' is the mean ± std over seeds. Split "
          f"scheme: {schemes} (per column: the '{SPLIT_SCHEME_ROW}' row). An empty cell has no "
          "run.")


def table1(cells: Cells, methods: dict[str, Method]) -> Table:
  labels = final_labels(methods)
  columns = ["Method", "Backbone", "train GFLOPs/image", "fwd GFLOPs/view",
             "accelerator-hours", "accelerators"]
  columns += [f"{name} {f}%" for _, name in CLASSIFICATION_TASKS for f in LABEL_FRACTIONS]
  rows = [split_scheme_row(cells, [(t, "classification", f) for t, _ in CLASSIFICATION_TASKS
                                   for f in LABEL_FRACTIONS], 6)]
  for key, method in methods.items():
    row = [labels[key], method.backbone, method.train_gflops_per_image,
           method.view_forward_gflops, method.accelerator_hours, method.accelerators or None]
    row += [cells.auc(key, task, f) for task, _ in CLASSIFICATION_TASKS for f in LABEL_FRACTIONS]
    rows.append(row)
  notes = [
      "mAUC: macro-averaged ROC-AUC. " + _selection_note(cells, downstream.CLASSIFICATION_TASKS),
      "train GFLOPs/image: forward + backward of both masked views of one image in pre-training "
      "(spcl_jax.metrics.train_flops_per_image, recorded in its config.json; matmuls only); "
      "fwd GFLOPs/view: the forward of one view (its visible patches + CLS). Not the paper's "
      "undefined GFLOPs column.",
      "accelerator-hours: pre-training only, devices x wall time summed over restarts, from the "
      "pre-training workdir's accelerator_time.json.",
  ]
  return Table("table1", "Table 1: mAUC (%) by dataset and label fraction", columns, rows, notes)


def per_class_table(cells: Cells, methods: dict[str, Method], task: str, classes, number: int,
                    dataset: str, fraction: int) -> Table:
  labels = final_labels(methods)
  columns = ["Method", "Backbone", *[c.replace("_", " ") for c in classes], "mAUC"]
  rows = [[labels[key], method.backbone,
           *[cells.auc(key, task, fraction, c) for c in classes], cells.auc(key, task, fraction)]
          for key, method in methods.items()]
  notes = [f"ROC-AUC (%) per class with {fraction}% of the training labels. "
           + _selection_note(cells, (task,))]
  return Table(f"table{number}", f"Table {number}: {dataset} per-class AUC ({fraction}% labels)",
               columns, rows, notes)


def table4(cells: Cells, methods: dict[str, Method], metric: str) -> Table:
  labels = final_labels(methods)
  columns = ["Method", "Backbone"]
  columns += [f"{name} {f}%" for _, name in SEGMENTATION_PROTOCOLS for f in LABEL_FRACTIONS]
  rows = [split_scheme_row(cells, [("siim", p, f) for p, _ in SEGMENTATION_PROTOCOLS
                                   for f in LABEL_FRACTIONS], 2)]
  rows += [[labels[key], method.backbone,
            *[cells.dice(key, protocol, f, metric)
              for protocol, _ in SEGMENTATION_PROTOCOLS for f in LABEL_FRACTIONS]]
           for key, method in methods.items()]
  keys = list(methods)
  trivial = [cells.trivial_dice(keys, protocol, f, metric)
             for protocol, _ in SEGMENTATION_PROTOCOLS for f in LABEL_FRACTIONS]
  if any(score is not None for score in trivial):
    rows.append([TRIVIAL_ROW, "", *trivial])
  notes = [
      f"Dice (%): {metric}, the {DICE_METRICS[metric]}. " + _selection_note(cells, ("siim",)),
      "Columns by segmentation protocol: 'mgca' (MGCA's setting) and 'upernet512' (MRM's "
      "UperNet setting at 512); see docs/finetuning.md, Segmentation.",
      f"'{TRIVIAL_ROW}': the score of predicting no pneumothorax anywhere on the same test set.",
  ]
  return Table("table4", "Table 4: SIIM-ACR pneumothorax segmentation", columns, rows, notes)


def all_tables(cells: Cells, methods: dict[str, Method], *, per_class_fraction: int = 100,
               dice_metric: str = "dice_per_image") -> list[Table]:
  if dice_metric not in DICE_METRICS:
    raise ValueError(f"--dice {dice_metric!r} is not one of {', '.join(DICE_METRICS)}")
  ordered = dict(sorted(methods.items(), key=lambda item: final_labels(methods)[item[0]]))
  return [table1(cells, ordered),
          per_class_table(cells, ordered, "chexpert", CHEXPERT_CLASSES, 2, "CheXpert",
                          per_class_fraction),
          per_class_table(cells, ordered, "nih14", NIH_CLASSES, 3, "ChestX-ray14",
                          per_class_fraction),
          table4(cells, ordered, dice_metric)]
