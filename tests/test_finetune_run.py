"""Fine-tuning end to end on prepared fixtures of ChestX-ray14, CheXpert and RSNA (pico/16, 32 px).

A run selects its checkpoint on val, scores test only after training (once with the best-on-val
parameters, once with the last), writes results.json in the agreed schema, and a run stopped
mid-way resumes to the same per-step losses as an uninterrupted one.

Fine-tuning has every protection of pre-training (one engine, `spcl_jax.engine`), each tested
by doing the fault on the ChestX-ray14 run (2 epochs of 4 steps): a run killed at a named moment
(mid-epoch, mid-val, before best/ is saved, mid-test) and rerun ends with the results.json and
selection.json of the uninterrupted run, each metrics row once; a second run on a workdir in use
refuses naming the holder; a truncated latest checkpoint is moved aside and the previous one
used, to the same results, as with --restore_step; a resume may change only the free fields (or
those it names), and a finished workdir rerun with another lr is a config error (exit 2); a bad
start (an init of another size, a fine-tuning workdir as init) writes nothing. The "kill" is an
exception raised at the named moment (`engine.moment_listeners`): no handler of the run catches
it, and the resume starts from what is on disk, as after kill -9. Where what is on disk depends
on the kill itself (orbax's threads stopped mid-write), a subprocess kill -9s itself while the
first checkpoint is written.
"""

import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import finetune_fixtures as ff
from export_fixtures import make_workdir
from run_safety_fixtures import read_metrics, truncate_params
from spcl_jax import checkpoint, command_line, engine, run_info, workdir_lock
from spcl_jax.finetune import results, trainer
from spcl_jax.preemption import StopRequest

TOP_LEVEL_KEYS = {"format", "task", "protocol", "label_fraction", "split_scheme", "init",
                  "metric", "classes", "val_best", "test_at_best_val", "test_at_last_epoch",
                  "seeds", "config", "split_hashes", "git_commit", "versions",
                  "accelerator_seconds", "device_kind", "num_devices", "predictions", "pool",
                  "train_positives"}
TEST_KEYS = {"epoch", "step", "macro_auc", "per_class", "ci95", "ci95_unit", "num_images"}
# What differs between two correct runs of the same config (the commit: when the checkout
# changes between the two, as it may while the suite runs).
RUN_DEPENDENT = ("accelerator_seconds", "git_commit")
THROUGHPUT = {"images_per_sec", "tflops_per_sec", "mfu"}


# Runs here rebuild identical steps: XLA's persistent cache compiles each program once.
pytestmark = pytest.mark.usefixtures("xla_compilation_cache")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared")
  with contextlib.redirect_stdout(io.StringIO()):
    return {task: build(root / task) for task, build in ff.PREPARED.items()}


def run(config, workdir, heads=None):
  """train_and_evaluate, recording the size of every split it predicts on, in order (and, into
  `heads` if given, the head kernel of the parameters each prediction used)."""
  predicted = []
  original = trainer.predict

  def recording_predict(ft, params, dataset, num_images):
    predicted.append(num_images)
    if heads is not None:
      heads.append(np.asarray(jax.device_get(params["head"]["kernel"])))
    return original(ft, params, dataset, num_images)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, "predict", recording_predict)
    outcome = trainer.train_and_evaluate(config, str(workdir))
  return outcome, predicted


@pytest.fixture(scope="module")
def nih_run(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nih_run")
  config = ff.finetune_config("nih14", prepared["nih14"])
  heads = []
  outcome, predicted = run(config, workdir, heads)
  return config, workdir, outcome, predicted, heads


def losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_nih_run_selects_on_val_scores_test_once_and_writes_results(nih_run):
  config, workdir, outcome, predicted, _ = nih_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(outcome))
  assert set(saved) == TOP_LEVEL_KEYS
  assert set(saved["test_at_best_val"]) == set(saved["test_at_last_epoch"]) == TEST_KEYS
  assert saved["format"] == "spcl_jax.finetune.results/1"
  assert (saved["task"], saved["label_fraction"], saved["split_scheme"]) == ("nih14", 100,
                                                                             "paper")
  assert saved["classes"][0] == "Atelectasis" and len(saved["classes"]) == 14
  # val (10 images) after each of the 2 epochs, then at the end val once more at the best
  # epoch (its predictions CSV) and test (5 images) twice.
  assert predicted == [10, 10, 10, 5, 5]
  history = json.loads((workdir / trainer.SELECTION_FILE).read_text())["history"]
  aucs = [history[str(e)]["macro_auc"] for e in (1, 2)]
  best_epoch = int(np.argmax(aucs)) + 1
  assert saved["val_best"]["epoch"] == best_epoch
  assert saved["val_best"]["macro_auc"] == max(aucs)
  assert saved["test_at_best_val"]["step"] == saved["val_best"]["step"] == 4 * best_epoch
  assert saved["test_at_last_epoch"]["step"] == 8
  assert checkpoint.available_steps(workdir / "best") == [4 * best_epoch]
  test = saved["test_at_best_val"]
  assert test["num_images"] == 5
  assert test["ci95"][0] <= test["macro_auc"] <= test["ci95"][1]
  assert set(saved["split_hashes"]) == {"train", "val", "test"}
  sums = (ff_prepared_dir(config) / "splits/SHA256SUMS").read_text()
  assert all(f"{digest}  {stem}.txt" in sums for stem, digest in saved["split_hashes"].items())
  assert saved["config"]["model"]["variant"] == "pico/16"


@pytest.mark.slow
def test_predictions_csvs_recompute_results_json_aucs_with_scikit_learn(nih_run):
  import hashlib
  from sklearn.metrics import roc_auc_score
  from spcl_jax.data.prepared_folder import LabelledSource
  from spcl_jax.finetune import predictions
  config, workdir, outcome, _, _ = nih_run
  listed = outcome["predictions"]
  assert set(listed) == {"val_best_val", "test_best_val", "test_last_epoch"}
  for key, entry in (("val_best_val", outcome["val_best"]),
                     ("test_best_val", outcome["test_at_best_val"]),
                     ("test_last_epoch", outcome["test_at_last_epoch"])):
    path = workdir / listed[key]["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[key]["sha256"]
    table = predictions.read_classification_csv(path)
    assert table["classes"] == outcome["classes"]
    per_class = [roc_auc_score(table["labels"][:, k], table["probs"][:, k])
                 for k in range(len(table["classes"]))]
    assert np.mean(per_class) == pytest.approx(entry["macro_auc"], abs=1e-12)
    assert per_class == pytest.approx(list(entry["per_class"].values()), abs=1e-12)
  # Rows are the split's images in record order, each with its own patient and targets.
  test = LabelledSource(config.data.prepared, "test", "100", policy=config.chexpert_policy)
  table = predictions.read_classification_csv(workdir / listed["test_best_val"]["file"])
  assert table["names"] == [test.name(i) for i in range(len(test))]
  assert table["patients"] == [str(int(n[:8])) for n in table["names"]]
  np.testing.assert_array_equal(table["labels"], test.targets)


@pytest.mark.slow
def test_predict_reproduces_the_runs_test_probabilities_and_reports_bad_files(nih_run,
                                                                             tmp_path):
  import data_fixtures as fx
  from spcl_jax import predict
  from spcl_jax.finetune import predictions
  config, workdir, outcome, _, _ = nih_run
  raw = ff_prepared_dir(config).parent / "raw/images"
  table = predictions.read_classification_csv(
      workdir / outcome["predictions"]["test_best_val"]["file"])
  pixels = np.asarray(__import__("PIL.Image").Image.open(raw / table["names"][0]),
                      np.uint16) << 4
  # The same radiograph as MONOCHROME2 and as MONOCHROME1 (white = low), the latter without a
  # suffix: prepare's decode inverts it, so both score alike.
  (tmp_path / "mono2.dcm").write_bytes(fx.dicom_bytes(pixels))
  (tmp_path / "mono1").write_bytes(fx.dicom_bytes(4095 - pixels, photometric="MONOCHROME1"))
  fx.write_png(tmp_path / "tiny.png", np.zeros((20, 80), np.uint8))
  (tmp_path / "broken.png").write_bytes(b"not an image")
  listed = [str(raw / name) for name in table["names"]] + [
      "mono2.dcm", "mono1", "tiny.png", "broken.png", "missing.png"]
  (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
  out = tmp_path / "preds.csv"
  with contextlib.redirect_stdout(io.StringIO()):
    code = predict.main(["--workdir", str(workdir), "--images", str(tmp_path / "list.txt"),
                         "--out", str(out), "--batch-per-device", "1"])
  assert code == 0
  import csv
  with open(out, newline="") as f:
    rows = list(csv.DictReader(f))
  probs = np.asarray([[float(r[f"prob_{c}"]) for c in table["classes"]] for r in rows])
  n = len(table["names"])
  assert [r["path"] for r in rows] == [str(raw / name) for name in table["names"]] + [
      str(tmp_path / "mono2.dcm"), str(tmp_path / "mono1")]
  # 8 steps leave the probabilities within ~1e-3 of 0.5, so agreement to 1e-5 alone could miss a
  # small change of input (the JPEG round trip of these smooth images is nearly lossless): the
  # stored bytes are compared exactly below.
  np.testing.assert_allclose(probs[:n], table["probs"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(probs[n + 1], probs[n], rtol=0, atol=1e-5)
  # Each file is stored byte for byte as prepare stored it (size, filter, JPEG quality).
  from spcl_jax.data.prepared_folder import LabelledSource
  from spcl_jax.inference import images, model
  test = LabelledSource(config.data.prepared, "test", "100")
  stored = model.load_workdir(workdir).stored
  assert [images.stored_bytes(raw / test.name(i), stored)[0] for i in range(len(test))] == [
      test[i]["encoded"] for i in range(len(test))]
  report = json.loads((tmp_path / "preds_report.json").read_text())
  assert (report["images"], report["scored"]) == (n + 5, n + 2)
  bad = {kind: [item["path"] for item in v["items"]] for kind, v in report["problems"].items()}
  assert bad == {"too_small": [str(tmp_path / "tiny.png")],
                 "undecodable": [str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]}
  # The classifier exported to timm scores the same (its .json carries the eval transform).
  from spcl_jax.export import __main__ as export_cli
  with contextlib.redirect_stdout(io.StringIO()):
    assert export_cli.main(["--workdir", str(workdir), "--format", "timm",
                            "--out", str(tmp_path / "clf.safetensors")]) == 0
    assert predict.main(["--model", str(tmp_path / "clf.safetensors"), "--images",
                         str(raw.parent / "images"), "--out", str(tmp_path / "exported.csv")]) == 0
  with open(tmp_path / "exported.csv", newline="") as f:
    exported = {r["path"]: [float(r[f"prob_{c}"]) for c in table["classes"]]
                for r in csv.DictReader(f)}
  np.testing.assert_allclose([exported[str(raw / name)] for name in table["names"]],
                             table["probs"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_report_draws_roc_and_training_curves_into_a_self_contained_html(nih_run, tmp_path):
  import base64
  import re
  from PIL import Image
  from spcl_jax.finetune import predictions
  from spcl_jax.report import __main__ as report_cli
  from spcl_jax.report import figures
  _, workdir, outcome, _, _ = nih_run
  with contextlib.redirect_stdout(io.StringIO()):
    assert report_cli.main([str(workdir), "--out", str(tmp_path / "report")]) == 0
  pngs = sorted((tmp_path / "report/figures").glob("*.png"))
  assert [p.name.rsplit("_", 1)[-1] for p in pngs] == ["curves.png", "roc.png"]
  for png in pngs:
    assert Image.open(png).size[0] >= 600
  # The legend's AUCs are results.json's per-class AUCs.
  curves = figures.roc_curves(predictions.read_classification_csv(
      workdir / outcome["predictions"]["test_best_val"]["file"]))
  assert {k: v["auc"] for k, v in curves.items()} == pytest.approx(
      outcome["test_at_best_val"]["per_class"], abs=1e-12)
  steps, step_losses = figures.step_losses(workdir / "metrics.jsonl")
  assert list(steps) == list(range(1, 9)) and dict(zip(steps, step_losses)) == losses(workdir)
  page = (tmp_path / "report/report.html").read_text()
  embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
  assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
  assert "Table 1: mAUC" in page and "<table>" in page
  assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens from disk


@pytest.mark.slow
def test_explain_writes_a_map_per_image_and_reports_bad_files(nih_run, tmp_path, capsys):
  from spcl_jax import explain
  config, workdir, outcome, _, _ = nih_run
  raw = ff_prepared_dir(config).parent / "raw/images"
  names = sorted(p.name for p in raw.glob("*.png"))[:3]
  (tmp_path / "list.txt").write_text("\n".join([str(raw / n) for n in names] + ["gone.png"]))
  with contextlib.redirect_stdout(io.StringIO()):
    assert explain.main(["--workdir", str(workdir), "--images", str(tmp_path / "list.txt"),
                         "--class", "Effusion", "--out", str(tmp_path / "maps"),
                         "--steps", "4"]) == 0
  for name in names:
    stem = name.removesuffix(".png")
    assert np.load(tmp_path / "maps" / f"{stem}.npy").shape == (2, 2)  # 32 px / patch 16
    assert (tmp_path / "maps" / f"{stem}.png").stat().st_size > 0
  report = json.loads((tmp_path / "maps/saliency_report.json").read_text())
  assert report["explained"] == 3 and [p["kind"] for p in report["problems"]] == ["undecodable"]
  code = explain.main(["--workdir", str(workdir), "--images", str(raw), "--class", "Fractures",
                       "--out", str(tmp_path / "no")])
  assert code != 0 and "--class 'Fractures' is not one of" in capsys.readouterr().err


@pytest.mark.slow
def test_test_split_is_scored_with_the_best_val_then_the_last_parameters(nih_run):
  _, workdir, outcome, _, heads = nih_run
  # This fixture's val score peaks at epoch 1 of 2, so the two test entries must come from
  # different parameters: the best-on-val ones (WORKDIR/best), then the last checkpoint's.
  assert outcome["val_best"]["epoch"] == 1
  best, _ = checkpoint.restore_params(workdir / "best", 4)
  last, _ = checkpoint.restore_params(workdir, 8)
  assert not np.array_equal(best["head"]["kernel"], last["head"]["kernel"])
  # predictions in order: val after epochs 1 and 2, val at the best epoch, test best, test last
  np.testing.assert_array_equal(heads[3], best["head"]["kernel"])
  np.testing.assert_array_equal(heads[4], last["head"]["kernel"])


@pytest.mark.slow
def test_export_takes_the_best_val_parameters_not_the_latest_checkpoint(nih_run, tmp_path):
  from safetensors.numpy import load_file
  from spcl_jax.export import export_checkpoint
  _, workdir, outcome, _, heads = nih_run
  assert outcome["val_best"]["step"] == 4 and checkpoint.available_steps(workdir)[-1] == 8
  weights, sidecar = export_checkpoint(workdir, "timm", tmp_path / "clf.safetensors")
  described = json.loads(sidecar.read_text())
  assert (described["source"]["step"], described["source"]["selected"]) == (4, "best_val")
  np.testing.assert_array_equal(load_file(str(weights))["head.weight"], heads[3].T)


def ff_prepared_dir(config):
  import pathlib
  return pathlib.Path(config.data.prepared)


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(nih_run, capsys):
  config, workdir, outcome, _, _ = nih_run
  again, predicted = run(config, workdir)
  assert predicted == [] and again == json.loads(json.dumps(outcome))
  assert "nothing to do" in capsys.readouterr().out


class _StopAtStep3(StopRequest):
  def should_stop(self, step):
    return step == 3


@pytest.mark.slow
def test_stopped_run_resumes_with_the_same_per_step_losses(nih_run, tmp_path):
  config, reference_dir, reference, _, _ = nih_run
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(engine, "StopRequest", _StopAtStep3)
    stopped, predicted = run(config, tmp_path)
  assert stopped == {"stopped_at_step": 3} and predicted == []
  assert checkpoint.available_steps(tmp_path) == [3]
  resumed, _ = run(config, tmp_path)
  expected = losses(reference_dir)
  assert losses(tmp_path) == expected and sorted(expected) == list(range(1, 9))
  for key in ("val_best", "test_at_best_val", "test_at_last_epoch"):
    assert resumed[key] == reference[key]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["chexpert", "rsna"])
def test_chexpert_and_rsna_fine_tune_to_results(prepared, tmp_path, task):
  config = ff.finetune_config(task, prepared[task], epochs=1, **{"optim.warmup_epochs": 0})
  outcome, predicted = run(config, tmp_path)
  assert predicted == [10, 10, 5, 5]
  expected_classes = {"chexpert": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                   "Pleural Effusion"], "rsna": ["Pneumonia"]}[task]
  assert outcome["classes"] == expected_classes
  assert list(outcome["test_at_best_val"]["per_class"]) == expected_classes
  assert outcome["config"]["chexpert_policy"] == "medical_mae"
  assert json.loads((tmp_path / "results.json").read_text())["task"] == task


def test_seed_aggregate_is_mean_and_std_per_number():
  def entry(auc, a, b):
    return {"epoch": 1, "step": 4, "macro_auc": auc, "per_class": {"a": a, "b": b},
            "ci95": [auc - 0.1, auc + 0.1], "num_images": 5}
  per_seed = [{"task": "rsna", "val_best": entry(0.6, 0.5, 0.7), "seeds": [0],
               "test_at_best_val": entry(0.7, 0.6, 0.8), "test_at_last_epoch": entry(0.5, 0.4,
                                                                                     0.6),
               "accelerator_seconds": 2.0},
              {"task": "rsna", "val_best": entry(0.8, 0.7, 0.9), "seeds": [1],
               "test_at_best_val": entry(0.9, 0.8, 1.0), "test_at_last_epoch": entry(0.7, 0.6,
                                                                                     0.8),
               "accelerator_seconds": 3.0}]
  out = results.aggregate(per_seed, ["seed_0/results.json", "seed_1/results.json"])
  assert out["seeds"] == [0, 1] and out["per_seed"] == ["seed_0/results.json",
                                                         "seed_1/results.json"]
  assert out["test_at_best_val"]["macro_auc"] == pytest.approx(0.8)
  assert out["test_at_best_val"]["macro_auc_std"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
  assert out["test_at_best_val"]["per_class"]["b"] == pytest.approx(0.9)
  assert out["test_at_best_val"]["per_class_std"]["a"] == pytest.approx(np.std([0.6, 0.8],
                                                                                ddof=1))
  assert out["accelerator_seconds"] == 5.0 and out["task"] == "rsna"


def test_bootstrap_interval_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, (60, 2))
  scores = labels + rng.normal(0, 1.0, (60, 2))
  lo, hi = results.bootstrap_ci(labels, scores, ["a", "b"], samples=200, seed=3)
  # Independent reference: rank-based AUC (Mann-Whitney) on the same resamples.
  def mw_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
  draw = np.random.default_rng(3)
  values = []
  while len(values) < 200:
    idx = draw.integers(0, 60, 60)
    y, s = labels[idx], scores[idx]
    if any(len(set(y[:, k])) < 2 for k in range(2)):
      continue
    values.append(np.mean([mw_auc(y[:, k], s[:, k]) for k in range(2)]))
  assert (lo, hi) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)


@pytest.mark.slow
def test_user_split_files_are_read_and_a_single_valued_val_class_is_an_error(prepared,
                                                                             tmp_path):
  from spcl_jax.auc import SingleClassError
  from spcl_jax.data import splits
  from spcl_jax.data.prepared_folder import LabelledSource
  out = prepared["nih14"]
  val = LabelledSource(out, "val")
  same = [i for i in range(len(val)) if (val.targets[i] == val.targets[0]).all()]
  assert len(same) >= 2
  lists = {"train": splits.read_split_file(out / "splits/train.txt"),
           "val": [val[i]["name"] for i in same],
           "test": splits.read_split_file(out / "splits/test.txt")}
  for name, names in lists.items():
    (tmp_path / f"{name}.txt").write_text("\n".join(names) + "\n")
  config = ff.finetune_config("nih14", out, split_scheme="files", epochs=1,
                              **{"optim.warmup_epochs": 0})
  for name in lists:
    config.split_files[name] = str(tmp_path / f"{name}.txt")
  # At the start, before anything is written, pointing at the option that drops a class.
  with pytest.raises(SingleClassError, match="class 'Atelectasis' has only .* val split.*"
                     "config.classes"):
    run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_config_classes_keeps_the_named_classes_in_every_split(prepared):
  from spcl_jax.finetune import data
  config = ff.finetune_config("nih14", prepared["nih14"], classes="Edema, Atelectasis")
  sources = data.split_sources(config)
  full = data.split_sources(ff.finetune_config("nih14", prepared["nih14"]))
  for split, source in sources.items():
    assert source.label_names == ["Edema", "Atelectasis"]
    edema, atelectasis = (full[split].label_names.index(c) for c in ("Edema", "Atelectasis"))
    np.testing.assert_array_equal(source.targets, full[split].targets[:, [edema, atelectasis]])
    assert source[0]["label"].tolist() == source.targets[0].tolist()
  config.classes = "Edema,Oedema"
  with pytest.raises(ValueError, match="config.classes=.*'Oedema' is not a class"):
    data.split_sources(config)


def test_records_are_opened_in_the_main_thread_before_any_pipeline_thread_reads(prepared):
  """Several data-loading threads importing TFDS at once deadlocked a start: the sources open
  their records when made, in the caller's thread; the pipeline's threads only read."""
  import threading
  from spcl_jax.data.prepared_folder import PreparedFolder
  from spcl_jax.finetune import data
  events = []
  opening, reading = PreparedFolder._open_records, PreparedFolder.record  # pylint: disable=protected-access

  def recorded(kind, method):
    def wrapper(self, *args):
      events.append((kind, threading.current_thread() is threading.main_thread()))
      return method(self, *args)
    return wrapper
  config = ff.finetune_config("nih14", prepared["nih14"], **{"data.read_threads": 4})
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(PreparedFolder, "_open_records", recorded("open", opening))
    patch.setattr(PreparedFolder, "record", recorded("read", reading))
    sources = data.split_sources(config)
    next(iter(data.train_dataset(config, sources["train"])))
  opens = [i for i, (kind, _) in enumerate(events) if kind == "open"]
  reads = [i for i, (kind, _) in enumerate(events) if kind == "read"]
  assert len(opens) == 3 and all(events[i][1] for i in opens)  # one per split, main thread
  assert reads and max(opens) < min(reads)
  assert not all(events[i][1] for i in reads)  # the pipeline did read in its own threads


def test_official_scheme_reads_the_official_split_files(prepared):
  from spcl_jax.finetune import data
  config = ff.finetune_config("nih14", prepared["nih14"], split_scheme="official",
                              label_fraction=10)
  sources = data.split_sources(config)
  assert len(sources["test"]) == 10  # the download's test_list.txt
  assert len(sources["train"]) + len(sources["val"]) < 40  # train: a 10% subset of the rest
  assert {s["name"] for s in (sources["test"][i] for i in range(10))} == {
      f"{p:08d}_000.png" for p in range(1, 11)}
  assert set(data.split_hashes(sources)) == {"official_train_10pct", "official_val",
                                             "official_test"}


def test_selection_keeps_the_best_val_epoch_and_the_first_of_equal_ones(tmp_path):
  from spcl_jax.finetune.trainer import Selection
  selection = Selection(tmp_path / "selection.json")
  assert selection.best_epoch is None
  selection.history = {1: {"macro_auc": 0.61}, 2: {"macro_auc": 0.74}, 3: {"macro_auc": 0.74},
                       4: {"macro_auc": 0.55}}
  assert selection.best_epoch == 2
  selection.save()
  assert Selection(tmp_path / "selection.json").best_epoch == 2  # read back after a restart
  selection.keep_until(1)
  assert selection.best_epoch == 1


# --- the engine's protections, by doing the fault ------------------------------------------

class Killed(BaseException):
  """Stands for kill -9 at a named moment: no Exception handler of the run catches it."""


@pytest.fixture(scope="module")
def reference(nih_run):
  """The uninterrupted run: (config, workdir, results)."""
  config, workdir, outcome, _, _ = nih_run
  return config, workdir, outcome


def comparable(workdir):
  results = json.loads((workdir / trainer.RESULTS_FILE).read_text())
  for key in RUN_DEPENDENT:
    results.pop(key)
  return results, json.loads((workdir / trainer.SELECTION_FILE).read_text())


def row_kinds(workdir):
  """(step, kind) per metrics row; throughput is absent from the first row a start logs."""
  return [(r["step"], ",".join(sorted(set(r) - THROUGHPUT))) for r in read_metrics(workdir)]


def copy_of(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run"


def run_killed_at(config, workdir, moment: str, at_step: int) -> None:
  def listener(name, step):
    if (name, step) == (moment, at_step):
      raise Killed(f"{moment} at step {step}")
  engine.moment_listeners.append(listener)
  try:
    with pytest.raises(Killed):
      trainer.train_and_evaluate(config, str(workdir))
  finally:
    engine.moment_listeners.remove(listener)


@pytest.mark.parametrize("moment,at_step", [("train_step", 6), ("val", 8), ("best_save", None),
                                            ("test", 8)])
@pytest.mark.slow
def test_a_run_killed_at_a_named_moment_resumes_to_the_same_results(reference, tmp_path,
                                                                    moment, at_step):
  config, reference_dir, results = reference
  if at_step is None:  # the epoch whose parameters the uninterrupted run kept in best/
    at_step = results["val_best"]["step"]
  run_killed_at(config, tmp_path, moment, at_step)
  assert not (tmp_path / trainer.RESULTS_FILE).exists()
  trainer.train_and_evaluate(config, str(tmp_path))
  assert comparable(tmp_path) == comparable(reference_dir)
  rows = row_kinds(tmp_path)
  assert len(rows) == len(set(rows)) and sorted(rows) == sorted(row_kinds(reference_dir))
  assert checkpoint.available_steps(tmp_path / checkpoint.BEST_DIR) == [
      results["val_best"]["step"]]


@pytest.mark.slow
def test_a_redone_epoch_that_scores_lower_falls_back_to_the_previous_best(reference, tmp_path,
                                                                          monkeypatch):
  """Killed while epoch 2's checkpoint is written, after epoch 2 beat epoch 1 and went to
  best/; the resumed run redoes epoch 2, which now scores lower (as on GPUs, whose kernels are
  not bit-exact): the best is epoch 1 again, and its parameters must still be in best/."""
  from spcl_jax.finetune import workloads  # pylint: disable=g-import-not-at-top
  config = reference[0]
  val_auc = {1: 0.6, 2: 0.7}
  score = workloads.Classification.score

  def scripted(self, source, outputs, classes, where):
    scored = score(self, source, outputs, classes, where)
    epoch = [e for e in val_auc if f"(epoch {e})" in where]
    return {**scored, "macro_auc": val_auc[epoch[0]]} if epoch else scored
  monkeypatch.setattr(workloads.Classification, "score", scripted)
  run_killed_at(config, tmp_path, "checkpoint_save", 8)
  # In-process the interrupted save still completes as the run closes; a kill -9 leaves a
  # half-written folder that the resume removes: the same as no step-8 checkpoint at all.
  shutil.rmtree(checkpoint.checkpoint_dir(tmp_path) / "8")
  assert checkpoint.available_steps(tmp_path) == [4]
  assert checkpoint.available_steps(tmp_path / checkpoint.BEST_DIR) == [4, 8]
  val_auc[2] = 0.5
  outcome = trainer.train_and_evaluate(config, str(tmp_path))
  assert outcome["val_best"]["epoch"] == outcome["test_at_best_val"]["epoch"] == 1
  assert checkpoint.available_steps(tmp_path / checkpoint.BEST_DIR) == [4]
  epoch_1 = checkpoint.restore_params(tmp_path, 4)[0]
  best = checkpoint.restore_params(tmp_path / checkpoint.BEST_DIR, 4)[0]
  assert jax.tree.all(jax.tree.map(np.array_equal, epoch_1, best))


# The reference run in a process that kill -9s itself while the step-S checkpoint is written
# (orbax's threads still at work), with this process's precision and compilation cache.
_KILLED_WHILE_SAVING = """
import os, pathlib, signal, sys
import jax
tests, prepared, workdir, at_step, cache = sys.argv[1:]
sys.path.insert(0, tests)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import finetune_fixtures as ff
from spcl_jax import engine
from spcl_jax.finetune import trainer
def kill(moment, step):
  if (moment, step) == ("checkpoint_save", int(at_step)):
    os.kill(os.getpid(), signal.SIGKILL)
engine.moment_listeners.append(kill)
trainer.train_and_evaluate(ff.finetune_config("nih14", pathlib.Path(prepared)), workdir)
"""


@pytest.mark.slow
def test_a_run_killed_by_sigkill_while_a_checkpoint_is_written_resumes_to_the_same_results(
    reference, tmp_path):
  """A real kill -9 during the first checkpoint's save, after best/ got that epoch: the resume
  removes the half-written folder, has nothing intact to restore, so it drops the best/ of the
  epoch it redoes and starts over, and ends as the uninterrupted run."""
  config, reference_dir, results = reference
  best_epoch_end = results["val_best"]["step"]
  tests = pathlib.Path(__file__).resolve().parent
  killed = subprocess.run(
      [sys.executable, "-c", _KILLED_WHILE_SAVING, str(tests), config.data.prepared,
       str(tmp_path), str(best_epoch_end), jax.config.jax_compilation_cache_dir],
      cwd=tests.parent, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert list(checkpoint.checkpoint_dir(tmp_path).glob(f"*{checkpoint.TMP_MARKER}*"))
  assert checkpoint.available_steps(tmp_path / checkpoint.BEST_DIR) == [best_epoch_end]
  best_when_resumed = []

  def look_at_best(moment, step):
    if moment == "train_step" and not best_when_resumed:
      best_when_resumed.append(checkpoint.available_steps(tmp_path / checkpoint.BEST_DIR))
  engine.moment_listeners.append(look_at_best)
  try:
    trainer.train_and_evaluate(config, str(tmp_path))
  finally:
    engine.moment_listeners.remove(look_at_best)
  assert best_when_resumed == [[]]
  assert comparable(tmp_path) == comparable(reference_dir)
  rows = row_kinds(tmp_path)
  assert len(rows) == len(set(rows)) and sorted(rows) == sorted(row_kinds(reference_dir))


@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_refuses_naming_the_holder(reference, tmp_path):
  config = reference[0]
  holder = workdir_lock.WorkdirLock(tmp_path)
  holder.acquire()
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      trainer.train_and_evaluate(config, str(tmp_path))
  finally:
    holder.release()
  line = command_line.one_line(error.value)
  assert f"in use by PID {os.getpid()}" in line and "\n" not in line
  assert [p.name for p in tmp_path.iterdir()] == [workdir_lock.FILENAME]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["truncated latest checkpoint", "--restore_step=4"])
def test_a_run_resumed_from_an_earlier_checkpoint_ends_the_same(reference, tmp_path, capsys,
                                                                fault):
  config, reference_dir, _ = reference
  workdir = copy_of(reference_dir, tmp_path)
  (workdir / trainer.RESULTS_FILE).unlink()
  if fault == "truncated latest checkpoint":
    truncate_params(checkpoint.checkpoint_dir(workdir) / "8")
    trainer.train_and_evaluate(config, str(workdir))
    assert "falling back to step 4" in capsys.readouterr().err
    moved_to = checkpoint.CORRUPT_DIR
  else:
    trainer.train_and_evaluate(config, str(workdir), restore_step=4)
    moved_to = checkpoint.SUPERSEDED_DIR
  assert [p.name.split("-")[0] for p in (workdir / moved_to).iterdir()] == ["8"]
  assert comparable(workdir) == comparable(reference_dir)


@pytest.mark.slow
def test_a_resume_changes_only_free_or_named_fields(reference, tmp_path, capsys):
  config, reference_dir, results = reference
  workdir = copy_of(reference_dir, tmp_path)
  starts = len(run_info.read_history(workdir))
  other_lr = config.copy_and_resolve_references()
  other_lr.optim.learning_rate = 3e-3
  with pytest.raises(run_info.LockedFieldChangedError) as error:
    trainer.train_and_evaluate(other_lr, str(workdir))
  assert "optim.learning_rate" in str(error.value)
  assert command_line.exit_code_for(error.value) == 2  # the CLI's exit code
  assert len(run_info.read_history(workdir)) == starts  # nothing recorded
  free = config.copy_and_resolve_references()
  free.log_every_steps = 2
  assert trainer.train_and_evaluate(free, str(workdir)) == results
  assert "nothing to do" in capsys.readouterr().out
  trainer.train_and_evaluate(other_lr, str(workdir),
                             allow_config_changes=["optim.learning_rate"])
  changes = [entry["changes"] for entry in run_info.read_history(workdir)][starts:]
  assert changes[0] == [{"field": "log_every_steps", "old": 1, "new": 2}]
  assert {"field": "optim.learning_rate", "old": 1e-3, "new": 3e-3,
          "overridden": True} in changes[1]


@pytest.mark.slow
def test_a_bad_init_is_refused_before_anything_is_written(reference, tmp_path):
  config = reference[0].copy_and_resolve_references()
  config.init = str(reference[1])
  with pytest.raises(ValueError, match="is a fine-tuning workdir"):
    trainer.train_and_evaluate(config, str(tmp_path / "a"))
  config.init = str(make_workdir(tmp_path / "pico8", "pico/8", 32)[0])  # another patch size
  with pytest.raises(ValueError, match="parameter .* has shape"):
    trainer.train_and_evaluate(config, str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_two_processes_of_four_devices_fine_tune_like_one_process_of_eight(nih_run, tmp_path):
  """launch/local_multiprocess.sh with the fine-tuning CLI: per-process data blocks, gathered
  eval outputs, process 0 alone writing; the same losses, val scores per epoch and results."""
  config, reference_dir, _, _, _ = nih_run
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PORT": str(24000 + os.getpid() % 1000), "DEVICES_PER_PROCESS": "4",
         "MODULE": "spcl_jax.finetune", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
  multi = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", f"--workdir={tmp_path}",
                          *ff.cli_args("nih14", config.data.prepared)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stderr[-3000:]
  got, want = losses(tmp_path), losses(reference_dir)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  multi_results, multi_selection = comparable(tmp_path)
  results, selection = comparable(reference_dir)
  for epoch in ("1", "2"):
    assert multi_selection["history"][epoch]["macro_auc"] == pytest.approx(
        selection["history"][epoch]["macro_auc"], abs=1e-6)
  for key in ("val_best", "test_at_best_val", "test_at_last_epoch"):
    assert multi_results[key]["epoch"] == results[key]["epoch"]
    assert multi_results[key]["macro_auc"] == pytest.approx(results[key]["macro_auc"], abs=1e-6)
  assert multi_results["config"] == results["config"]
