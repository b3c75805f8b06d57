"""Figures of one fine-tuning run, as PNGs (matplotlib, no display needed).

  roc      ROC curve per class on test at the best-val epoch, from the run's
           predictions/test_best_val.csv (scikit-learn's roc_curve); each class's AUC in the
           legend is computed from the same file, so it is results.json's per-class AUC
  curves   training loss per step (metrics.jsonl; a step redone after a resume counts once,
           its last value) and the selection metric on val per epoch (selection.json), the best
           epoch marked
A run without the file a figure needs (a segmentation run has no ROC; an older run has no
predictions) gets no such figure; `figures_for_run` says which were skipped and why.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from spcl_jax.downstream import CLASSIFICATION_PROTOCOLS
from spcl_jax.finetune import predictions

DPI = 120


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: never needs (or opens) a display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def roc_curves(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Class -> {"fpr", "tpr", "auc"} from a classification predictions table."""
  from sklearn.metrics import roc_auc_score, roc_curve  # pylint: disable=g-import-not-at-top
  curves = {}
  for k, name in enumerate(table["classes"]):
    labels, scores = table["labels"][:, k], table["probs"][:, k]
    fpr, tpr, _ = roc_curve(labels, scores)
    curves[name] = {"fpr": fpr, "tpr": tpr, "auc": float(roc_auc_score(labels, scores))}
  return curves


def plot_roc(curves: dict[str, dict[str, Any]], title: str, out: pathlib.Path) -> pathlib.Path:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 6.0))
  colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
  for i, (name, curve) in enumerate(curves.items()):
    ax.plot(curve["fpr"], curve["tpr"], color=colours(i % colours.N), lw=1.5,
            label=f"{name} (AUC {curve['auc']:.3f})")
  ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 - specificity)",
         ylabel="true positive rate (sensitivity)", title=title)
  ax.set_aspect("equal")
  ax.legend(loc="lower right", fontsize=7 if len(curves) > 6 else 9)
  fig.tight_layout()
  fig.savefig(out, dpi=DPI)
  plt.close(fig)
  return out


def step_losses(metrics_path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(steps, losses) from metrics.jsonl, one value per step (the last written)."""
  last: dict[int, float] = {}
  for line in metrics_path.read_text().splitlines():
    row = json.loads(line)
    if "loss" in row and row["loss"] is not None:
      last[int(row["step"])] = float(row["loss"])
  steps = np.asarray(sorted(last), np.int64)
  return steps, np.asarray([last[s] for s in steps], np.float64)


def val_history(selection_path: pathlib.Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
  history = json.loads(selection_path.read_text())["history"]
  epochs = sorted(int(e) for e in history)
  return (np.asarray(epochs, np.int64),
          np.asarray([history[str(e)][metric] for e in epochs], np.float64))


def plot_training_curves(steps: np.ndarray, losses: np.ndarray, epochs: np.ndarray,
                         values: np.ndarray, metric: str, best_epoch: int | None, title: str,
                         out: pathlib.Path) -> pathlib.Path:
  plt = pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  left.plot(steps, losses, lw=1, color="tab:blue")
  left.set(xlabel="step", ylabel="training loss", title="loss per logged step")
  right.plot(epochs, values, marker="o", color="tab:orange")
  if best_epoch is not None:
    right.axvline(best_epoch, color="0.5", ls="--", lw=1, label=f"best epoch {best_epoch}")
    right.legend(loc="best", fontsize=8)
  right.set(xlabel="epoch", ylabel=f"val {metric}", title=f"val {metric} per epoch")
  right.xaxis.get_major_locator().set_params(integer=True)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=DPI)
  plt.close(fig)
  return out


def figures_for_run(run_dir: pathlib.Path, result: dict[str, Any], title: str, out: pathlib.Path,
                    stem: str) -> tuple[dict[str, pathlib.Path], list[str]]:
  """Writes OUT/STEM_roc.png and OUT/STEM_curves.png where the run has what they need."""
  written, skipped = {}, []
  listed = result.get("predictions", {}).get("test_best_val")
  if result.get("protocol") not in CLASSIFICATION_PROTOCOLS:
    skipped.append(f"{run_dir}: no ROC (segmentation)")
  elif listed is None or not (run_dir / listed["file"]).is_file():
    skipped.append(f"{run_dir}: no ROC (no predictions/test_best_val.csv; runs before "
                   "predictions were kept have none)")
  else:
    table = predictions.read_classification_csv(run_dir / listed["file"])
    written["roc"] = plot_roc(roc_curves(table), f"{title}\ntest at the best val epoch "
                              f"({len(table['names'])} images)", out / f"{stem}_roc.png")
  metrics_path, selection_path = run_dir / "metrics.jsonl", run_dir / "selection.json"
  if metrics_path.is_file() and selection_path.is_file():
    steps, losses = step_losses(metrics_path)
    epochs, values = val_history(selection_path, result["metric"])
    best = result.get("val_best", {}).get("epoch")
    written["curves"] = plot_training_curves(steps, losses, epochs, values, result["metric"],
                                             None if best is None else int(best), title,
                                             out / f"{stem}_curves.png")
  else:
    skipped.append(f"{run_dir}: no training curves (no metrics.jsonl or selection.json)")
  return written, skipped
