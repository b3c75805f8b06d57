"""Fine-tuning end to end on prepared fixtures of ChestX-ray14, CheXpert and RSNA (pico/16, 32 px).

A run selects its checkpoint on val, scores test only after training (once with the best-on-val
parameters, once with the last), writes results.json in the agreed schema, and a run stopped
mid-way resumes to the same per-step losses as an uninterrupted one.
"""

import contextlib
import io
import json

import numpy as np
import pytest

import finetune_fixtures as ff
from spcl_jax import checkpoint
from spcl_jax.finetune import results, trainer
from spcl_jax.preemption import StopRequest

TOP_LEVEL_KEYS = {"format", "task", "protocol", "label_fraction", "split_scheme", "init",
                  "metric", "classes", "val_best", "test_at_best_val", "test_at_last_epoch",
                  "seeds", "config", "split_hashes", "git_commit", "versions",
                  "accelerator_seconds", "device_kind", "num_devices", "pool",
                  "train_positives"}
TEST_KEYS = {"epoch", "step", "macro_auc", "per_class", "ci95", "ci95_unit", "num_images"}


# Runs here rebuild identical steps: XLA's persistent cache compiles each program once.
pytestmark = pytest.mark.usefixtures("xla_compilation_cache")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared")
  with contextlib.redirect_stdout(io.StringIO()):
    return {task: build(root / task) for task, build in ff.PREPARED.items()}


def run(config, workdir):
  """train_and_evaluate, recording the size of every split it predicts on, in order."""
  predicted = []
  original = trainer.predict

  def recording_predict(ft, params, dataset, num_images):
    predicted.append(num_images)
    return original(ft, params, dataset, num_images)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, "predict", recording_predict)
    outcome = trainer.train_and_evaluate(config, str(workdir))
  return outcome, predicted


@pytest.fixture(scope="module")
def nih_run(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nih_run")
  config = ff.finetune_config("nih14", prepared["nih14"])
  outcome, predicted = run(config, workdir)
  return config, workdir, outcome, predicted


def losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_nih_run_selects_on_val_scores_test_once_and_writes_results(nih_run):
  config, workdir, outcome, predicted = nih_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(outcome))
  assert set(saved) == TOP_LEVEL_KEYS
  assert set(saved["test_at_best_val"]) == set(saved["test_at_last_epoch"]) == TEST_KEYS
  assert saved["format"] == "spcl_jax.finetune.results/1"
  assert (saved["task"], saved["label_fraction"], saved["split_scheme"]) == ("nih14", 100,
                                                                             "paper")
  assert saved["classes"][0] == "Atelectasis" and len(saved["classes"]) == 14
  # val (10 images) after each of the 2 epochs, then test (5 images) twice, only at the end.
  assert predicted == [10, 10, 5, 5]
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


def ff_prepared_dir(config):
  import pathlib
  return pathlib.Path(config.data.prepared)


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing(nih_run, capsys):
  config, workdir, outcome, _ = nih_run
  again, predicted = run(config, workdir)
  assert predicted == [] and again == json.loads(json.dumps(outcome))
  assert "nothing to do" in capsys.readouterr().out


class _StopAtStep3(StopRequest):
  def should_stop(self, step):
    return step == 3


@pytest.mark.slow
def test_stopped_run_resumes_with_the_same_per_step_losses(nih_run, tmp_path):
  config, reference_dir, reference, _ = nih_run
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, "StopRequest", _StopAtStep3)
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
  assert predicted == [10, 5, 5]
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
  from spcl_jax.data.prepared import LabelledSource
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
  with pytest.raises(SingleClassError, match="class 'Atelectasis' has only .* val split"):
    run(config, tmp_path / "run")


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
