"""`python -m spcl_jax.bench transfer`: the synthetic set through the real prepare, S-PCL
pre-training and fine-tuning paths (--quick: one seed, the code path), and its verdicts."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest

from spcl_jax.bench import synthetic_cxr, transfer
from spcl_jax.data.datasets import nih_chestxray14 as nih


def test_synthetic_download_has_patients_every_finding_and_a_mark_per_finding(tmp_path):
  counts = synthetic_cxr.write_download(tmp_path, num_patients=60, seed=1)
  rows = list(csv.DictReader((tmp_path / "Data_Entry_2017_v2020.csv").open()))
  assert len(rows) == counts["images"] > counts["patients"] == 60
  assert len({r["Patient ID"] for r in rows}) == 60
  found = {f for r in rows for f in r["Finding Labels"].split("|")}
  assert found <= set(nih.LABELS) | {nih.NO_FINDING} and len(found) >= 10
  listed = ((tmp_path / "test_list.txt").read_text().split()
            + (tmp_path / "train_val_list.txt").read_text().split())
  assert sorted(listed) == sorted(r["Image Index"] for r in rows)
  # Each finding changes the image where its mark goes, by more than the noise of one pixel.
  patient = synthetic_cxr._patient(np.random.default_rng(0))  # pylint: disable=protected-access
  for name, mark in synthetic_cxr.MARKS.items():
    plain = synthetic_cxr.anatomy(patient)
    marked = plain.copy()
    synthetic_cxr.add_mark(marked, mark, np.random.default_rng(3))
    assert np.abs(marked - plain).max() > 9, name


def test_verdicts_need_more_than_two_std_and_cls_ahead_at_1_and_10_percent():
  scores = {("spcl", "classification", "cls", 1): (0.80, 0.01),
            ("random", "classification", "cls", 1): (0.75, 0.02),   # 0.05 > 2 x 0.02
            ("spcl", "classification", "avg", 1): (0.78, 0.05),
            ("random", "classification", "avg", 1): (0.75, 0.01),   # 0.03 < 2 x 0.05
            ("spcl", "classification", "cls", 10): (0.90, 0.0),
            ("spcl", "classification", "avg", 10): (0.91, 0.0)}
  beats, pooling = transfer.verdicts(scores)
  assert "classification/cls 1%" in beats and "avg 1%" not in beats
  assert pooling.endswith("-> undecided")  # cls ahead at 1%, behind at 10%
  scores[("spcl", "classification", "avg", 10)] = (0.85, 0.0)
  assert transfer.verdicts(scores)[1].endswith("-> cls")
  none = {k: v for k, v in scores.items() if k[3] == 10}
  assert "no cell: the grid does not count" in transfer.verdicts(none)[0]


@pytest.mark.slow
@pytest.mark.usefixtures("xla_compilation_cache")
def test_quick_transfer_runs_the_real_paths_and_prints_the_grid(tmp_path):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert transfer.main(["--quick", "--workdir", str(tmp_path)]) == 0
  printed = out.getvalue()
  assert "| S-PCL [full, pool cls] |" in printed and "| random init [full, pool cls] |" in printed
  assert "S-PCL beats random init by > 2 std in:" in printed
  assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Pre-training reads only the split fine-tuning trains on: no val or test image, unlabelled.
  pretrained = json.loads((tmp_path / "pretrain" / "config.json").read_text())
  assert pretrained["config"]["data"]["source"].endswith(",split=official_train")
  run = tmp_path / "finetune" / "spcl_classification_cls_10"
  info = json.loads((run / "config.json").read_text())
  result = json.loads((run / "results.json").read_text())
  assert info["classifier"]["pool"] == result["pool"] == "cls"
  config = result["config"]
  # The low-label rule, resolved from the train split and written down.
  assert config["batch_size"] == 16 and config["val_every_epochs"] == 2
  assert result["split_scheme"] == "official"
  assert result["test_at_best_val"]["ci95_unit"] == "patient"
  assert set(result["train_positives"]) == set(nih.LABELS)
  history = json.loads((run / "selection.json").read_text())["history"]
  assert sorted(int(e) for e in history) == [2, 3]  # every 2 epochs and after the last
