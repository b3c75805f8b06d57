"""Evaluators: probe and kNN on synthetic features, the sample's labels, held-out eval images
of a prepared folder, config errors, and `python -m spcl_jax.evaluate` on a workdir."""

import json

import numpy as np
import pytest

import data_fixtures as fx
from spcl_jax.configs import demo
from export_fixtures import make_workdir, random_encoder_params
from spcl_jax import auc, evaluate, evaluators, sharding, steps
from spcl_jax.configuration import ConfigError, validate_config
from spcl_jax.data import eval_splits, prepare
from spcl_jax.data.eval_splits import LabelledSplit
from spcl_jax.data.prepared_folder import LabelledSource, PreparedSource
from spcl_jax.data.sources import SAMPLE_DIR, FolderSource
from spcl_jax.evaluators import frozen_features
from spcl_jax.evaluators.knn import knn_scores
from spcl_jax.evaluators.linear_probe import probe_scores

CLASSES = ("a", "b", "c")


def synthetic(seed=0, n=2000, dim=32):
  """Three binary labels, each the side of a random hyperplane, pushed 0.5 off it (separable)."""
  rng = np.random.default_rng(seed)
  directions = rng.normal(size=(len(CLASSES), dim))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  x = rng.normal(size=(n, dim))
  side = np.sign(x @ directions.T)
  x += 0.5 * side @ directions
  return x.astype(np.float32), (side > 0).astype(np.int32), rng


@pytest.mark.parametrize("scores", [probe_scores, knn_scores])
def test_separable_features_score_high_and_shuffled_labels_score_chance(scores):
  x, y, rng = synthetic()
  train, val = slice(0, 1000), slice(1000, 2000)
  macro, per_class = auc.macro_auc(y[val], scores(x[train], y[train], x[val]), CLASSES)
  print(f"{scores.__name__}: separable macro AUC {macro:.4f}")
  assert macro > 0.95 and min(per_class.values()) > 0.95
  shuffled = y[rng.permutation(len(y))]
  macro, _ = auc.macro_auc(shuffled[val], scores(x[train], shuffled[train], x[val]), CLASSES)
  print(f"{scores.__name__}: shuffled macro AUC {macro:.4f}")
  assert abs(macro - 0.5) < 0.05


def dino_knn_reference(train_x, train_y, val_x, k, temperature):
  """DINO's weighted vote written out in NumPy: the independent check of the sklearn wiring."""
  normalise = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  similarity = normalise(val_x) @ normalise(train_x).T
  top = np.argsort(-similarity, axis=1)[:, :k]
  weights = np.exp(np.take_along_axis(similarity, top, axis=1) / temperature)
  return np.einsum("mk,mkc->mc", weights, train_y[top]) / weights.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (500, 0.07)])
def test_knn_is_dinos_weighted_vote(k, temperature):
  x, y, _ = synthetic(seed=1, n=300, dim=8)
  x = x.astype(np.float64)  # scikit-learn keeps float32 inputs in float32
  got = knn_scores(x[:200], y[:200], x[200:], k=k, temperature=temperature)
  want = dino_knn_reference(x[:200], y[:200], x[200:], min(k, 200), temperature)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_probe_scores_each_class_on_its_own():
  x, y, _ = synthetic(seed=2, n=400)
  both = probe_scores(x[:300], y[:300], x[300:])
  alone = probe_scores(x[:300], y[:300, 1:2], x[300:])
  np.testing.assert_allclose(both[:, 1:2], alone, rtol=1e-5, atol=1e-6)
  assert auc.macro_auc(y[300:], both, CLASSES)[0] > 0.95


def test_probe_standardises_features_so_their_scale_does_not_matter():
  x, y, _ = synthetic(seed=3, n=400)
  scaled = x * np.geomspace(1e-3, 1e3, x.shape[1])  # without standardisation C would differ
  np.testing.assert_allclose(probe_scores(scaled[:300], y[:300], scaled[300:]),
                             probe_scores(x[:300], y[:300], x[300:]), rtol=1e-3, atol=1e-3)


# --- the bundled sample's labels --------------------------------------------------------------

def test_sample_labels_come_from_the_file_names():
  assert eval_splits.sample_label("person1946_bacteria_4875.png") == ("person1946", 1)
  assert eval_splits.sample_label("NORMAL2-IM-1427-0001.png") == ("NORMAL2-IM-1427", 0)
  with pytest.raises(ValueError, match="'scan.png'.*person<P>_bacteria_<N>"):
    eval_splits.sample_label("scan.png")


def test_sample_split_is_by_patient_and_has_both_classes_on_each_side():
  train = eval_splits.open_labelled("sample", "train")
  val = eval_splits.open_labelled("sample", "val")
  names = {split: [s.source.name(i) for i in range(len(s.source))]
           for split, s in (("train", train), ("val", val))}
  assert sorted(names["train"] + names["val"]) == sorted(p.name for p in SAMPLE_DIR.glob("*.png"))
  patients = {split: {eval_splits.sample_label(n)[0] for n in names[split]} for split in names}
  assert not patients["train"] & patients["val"]
  both = [n for n in names["train"] + names["val"] if n.startswith("person1946_")]
  assert len(both) == 2 and (set(both) <= set(names["train"]) or set(both) <= set(names["val"]))
  for split in (train, val):
    assert split.class_names == ("pneumonia",) and set(split.labels.ravel()) == {0, 1}
    for i in range(len(split.source)):
      assert split.labels[i, 0] == eval_splits.sample_label(split.source.name(i))[1]
  assert eval_splits.open_labelled("sample", "val").source.indices == val.source.indices


# --- prepared folders: held-out images, labels ------------------------------------------------

@pytest.fixture(scope="module")
def nih(tmp_path_factory):
  """20 NIH patients (2 images each) prepared at 64 px: 7:2:1 train/val/test by patient."""
  root = tmp_path_factory.mktemp("nih")
  rows = []
  for patient in range(1, 21):
    for k in range(2):
      name = f"{patient:08d}_{k:03d}.png"
      rows.append(fx.nih_row(name, ["No Finding", "Effusion", "Effusion|Mass"][(patient + k) % 3],
                             patient, "PA"))
      fx.write_png(root / "raw/images" / name, fx.gradient(64, 72, patient * 2 + k))
  fx.write_csv(root / "raw/Data_Entry_2017_v2020.csv", fx.NIH_HEADER, rows)
  assert prepare.main(["nih_chestxray14", "--src", str(root / "raw"), "--out", str(root / "out"),
                       "--image-size", "64", "--workers", "1"]) == 0
  return root / "out"


def small_config(source):
  config = demo.get_config()
  config.model.image_size = 64  # 16 patches: the smallest size the 0.6 mask ratio allows
  config.batch_size = 8
  config.data.source = source
  config.evals.probe.data = config.evals.knn.data = "sample"
  return config


def test_eval_images_are_disjoint_from_the_training_split(nih, tmp_path, capsys):
  config = small_config(f"prepared:{nih},split=train")
  config.evals.probe.data = f"prepared:{nih}"
  config.evals.probe.classes = ("Effusion",)
  del config.evals["knn"]
  training = steps.build_training(config, sharding.make_mesh(config))
  evals = evaluators.Evaluators(config, training, tmp_path)
  train, val = PreparedSource(nih, "train"), PreparedSource(nih, "val")
  train_names = {train.name(i) for i in range(len(train))}
  val_names = [val.name(i) for i in range(len(val))]
  listing = json.loads((tmp_path / "eval_images.json").read_text())
  assert listing["retrieval"]["eval"] == val_names[:8] and not train_names & set(val_names)
  assert set(listing["probe"]["train"]) == train_names
  assert listing["probe"]["val"] == val_names
  out = capsys.readouterr().out
  assert f"8 images of prepared:{nih},split=val" in out and "does not read" in out
  labelled = LabelledSource(nih, "val")
  probe = next(s.evaluator for s in evals.scheduled if s.name == "probe")
  effusion = labelled.targets[:, list(labelled.label_names).index("Effusion")]
  np.testing.assert_array_equal(probe.val.labels[:, 0], effusion)
  params = {"encoder": random_encoder_params(config)}
  results = probe.run(params)  # (pair retrieval runs in test_train.py)
  assert 0 <= results["auc"] <= 1 and results["auc"] == results["auc/Effusion"]


def test_a_class_with_one_label_value_is_named_at_start(monkeypatch):
  config = small_config("sample")
  training = steps.build_training(config, sharding.make_mesh(config))
  folder = FolderSource(SAMPLE_DIR)
  one_valued = LabelledSplit(folder, np.zeros((16, 1), np.int32), ("Hernia",), "val (16 images)")
  normal = eval_splits.open_labelled("sample", "train")
  monkeypatch.setattr(frozen_features, "open_labelled",
                      lambda data, split, classes: normal if split == "train" else one_valued)
  with pytest.raises(auc.SingleClassError, match="class 'Hernia' has only negative labels"):
    evaluators.factory_of("knn")("knn", config.evals.knn, training)


def test_non_finite_features_give_no_auc_instead_of_failing(monkeypatch):
  """A diverged model: the trainer's loss check stops the run, the probe reports null."""
  config = small_config("sample")
  training = steps.build_training(config, sharding.make_mesh(config))
  probe = evaluators.factory_of("linear_probe")("probe", config.evals.probe, training)
  monkeypatch.setattr(probe, "_features", lambda params, split: np.full((len(split.source), 4),
                                                                        np.nan))
  result = probe.run(params=None)
  assert set(result) == {"auc", "auc/pneumonia"} and np.isnan(result["auc"])


@pytest.mark.parametrize("change,message", [
    (lambda c: c.evals.probe.update(type="svm"), "config.evals.probe.type='svm' is not an"),
    (lambda c: c.evals.knn.update(every_steps=0), "config.evals.knn.every_steps=0 must be"),
])
def test_bad_eval_config_is_named(change, message):
  config = small_config("sample")
  change(config)
  with pytest.raises(ConfigError, match=message):
    validate_config(config, num_batch_shards=8)


def test_a_misspelt_field_is_named():
  config = small_config("sample")
  config.evals.knn.temprature = 0.1
  training = steps.build_training(config, sharding.make_mesh(config))
  with pytest.raises(ConfigError, match=r"config.evals.knn: unknown field\(s\) temprature.*"
                                        r"temperature"):
    evaluators.Evaluators(config, training)


@pytest.mark.slow
def test_evaluate_command_on_a_workdir(tmp_path):
  workdir, _ = make_workdir(tmp_path / "run", "pico/16", 64)
  code = evaluate.main(["--workdir", str(workdir), "--config.evals.p.type=linear_probe",
                        "--config.evals.p.pooling=mean_patch", "--only", "p"])
  assert code == 0
  [record] = [json.loads(line) for line in (workdir / "evaluations.jsonl").read_text().splitlines()]
  assert record["step"] == 7 and 0 <= record["p_auc"] <= 1
  assert record["p_auc"] == record["p_auc/pneumonia"]
  assert evaluate.main(["--workdir", str(workdir), "--config.model.image_size=64"]) == 2  # usage


def test_probe_scores_are_the_decision_function_of_a_standardised_logistic_regression():
  # AUC needs a ranking: hard 0/1 predictions would tie most val images.
  from sklearn.linear_model import LogisticRegression
  x, y, _ = synthetic(seed=4, n=300, dim=8)
  x = x.astype(np.float64)
  got = probe_scores(x[:200], y[:200], x[200:])
  mean, std = x[:200].mean(axis=0), x[:200].std(axis=0)
  for k in range(len(CLASSES)):
    reference = LogisticRegression(max_iter=1000).fit((x[:200] - mean) / std, y[:200, k])
    want = (x[200:] - mean) / std @ reference.coef_[0] + reference.intercept_[0]
    np.testing.assert_allclose(got[:, k], want, rtol=1e-4, atol=1e-4)
  assert len(np.unique(got)) == got.size
