"""Fine-tuning numbers, not shapes: a set whose labels only a good init can learn.

`finetune_fixtures.prepared_nih_with_signal`: noise images labelled by a linear read-out of a
pre-trained encoder's features (the teacher, `teacher_workdir`). Fine-tuning the head on that
frozen init reaches a high macro AUC in one short epoch; from a random init it stays low, and
a run whose labels, predictions or init go astray would score like that too.
"""

import contextlib
import io
import json

import flax
import numpy as np
import pytest

import finetune_fixtures as ff
from spcl_jax import checkpoint
from spcl_jax.finetune import trainer

pytestmark = pytest.mark.usefixtures("xla_compilation_cache")

LEARNT = 0.8    # from the teacher init: val ~0.85, test ~0.9 macro AUC
CHANCE = 0.7    # from a random init: test ~0.55


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp("signal")
  init, encoder = ff.teacher_workdir(root / "init")
  with contextlib.redirect_stdout(io.StringIO()):
    prepared = ff.prepared_nih_with_signal(root / "nih", encoder)
  return init, encoder, prepared


def fine_tune(config, workdir):
  with contextlib.redirect_stdout(io.StringIO()):
    return trainer.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def teacher_run(teacher, tmp_path_factory):
  init, _, prepared = teacher
  workdir = tmp_path_factory.mktemp("teacher_run")
  return workdir, fine_tune(ff.signal_config(prepared, str(init)), workdir)


@pytest.mark.slow
def test_fine_tuning_from_the_teacher_init_learns_its_labels(teacher_run):
  _, outcome = teacher_run
  print(f"teacher init: val {outcome['val_best']['macro_auc']:.4f}, test "
        f"{outcome['test_at_best_val']['macro_auc']:.4f}")
  assert outcome["val_best"]["macro_auc"] > LEARNT
  assert outcome["test_at_best_val"]["macro_auc"] > LEARNT
  assert min(outcome["test_at_best_val"]["per_class"].values()) > 0.5
  # The test split does not fill its last batch (batch 8): the padding has to be dropped
  # from the right end for predictions to line up with the labels.
  assert outcome["test_at_best_val"]["num_images"] % 8 != 0


@pytest.mark.slow
def test_the_fine_tuned_encoder_is_the_inits(teacher, teacher_run):
  # freeze_encoder: the encoder at step 0 is what every later step holds, so it must be the
  # init's (its final norm left out: pool 'avg' has fc_norm instead).
  _, encoder, _ = teacher
  workdir, outcome = teacher_run
  params, _ = checkpoint.restore_params(workdir / "best", outcome["val_best"]["step"])
  got = flax.traverse_util.flatten_dict(params["encoder"], sep="/")
  want = {k: v for k, v in flax.traverse_util.flatten_dict(encoder, sep="/").items()
          if "encoder_norm" not in k}
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.slow
def test_the_inits_normalisation_is_used(teacher_run):
  workdir, outcome = teacher_run
  assert (outcome["config"]["data"]["mean"], outcome["config"]["data"]["std"]) == (
      ff.TEACHER_MEAN, ff.TEACHER_STD)
  info = json.loads((workdir / "config.json").read_text())
  assert info["normalization"] == {"mean": ff.TEACHER_MEAN, "std": ff.TEACHER_STD}


@pytest.mark.slow
def test_a_random_init_does_not_learn_the_teachers_labels(teacher, tmp_path):
  # The control that makes the numbers above mean something: same budget, no teacher.
  _, _, prepared = teacher
  outcome = fine_tune(ff.signal_config(prepared, "random"), tmp_path)
  print(f"random init: test {outcome['test_at_best_val']['macro_auc']:.4f}")
  assert outcome["test_at_best_val"]["macro_auc"] < CHANCE


def test_the_teachers_readout_lies_in_the_features_top_principal_directions():
  """The labels are read along the directions the features vary most in: few examples find
  them, and features without them (another encoder's) cannot score them."""
  scales = np.array([5.0, 4.0, 3.0, 0.1, 0.1, 0.1])
  features = np.random.default_rng(0).normal(size=(5000, 6)) * scales
  readout = ff._readout(features, 14)  # pylint: disable=protected-access
  assert readout.shape == (6, 14)
  assert np.abs(readout[3:]).max() < 0.05 * np.abs(readout[:3]).max()
