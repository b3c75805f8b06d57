"""The whole path a user takes: pre-train with the trainer, then export and load in timm."""

import numpy as np
import pytest

from spcl_jax.configs import demo
from export_fixtures import TOLERANCE, jax_cls_features, max_abs_diff, sample_images, torch_input
from spcl_jax import train
from spcl_jax.data.sources import SAMPLE_DIR
from spcl_jax.export import export_checkpoint
from spcl_jax.extract import main as extract_main
from spcl_jax.pretrained import load_pretrained
from test_export_timm import build_timm, cls_features


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  config = demo.get_config()
  config.model.image_size = 64
  config.total_steps = 4
  config.checkpoint_every_steps = 4
  del config.evals["probe"], config.evals["knn"]  # exported here; evaluated in test_train.py
  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(config, str(workdir))
  return workdir, config


def test_trainer_checkpoint_exports_to_timm_with_parity(trained_workdir, tmp_path):
  workdir, config = trained_workdir
  pretrained = load_pretrained(workdir)
  assert pretrained.step == 4
  paths = export_checkpoint(workdir, "timm", tmp_path / "vit.safetensors")
  model, state = build_timm(paths)
  model.load_state_dict(state, strict=True)
  _, images = sample_images(64, 4, config.data.resize_filter)
  ours = jax_cls_features("mu/16", 64, pretrained.params, images)
  theirs = cls_features(model, torch_input(images, 1, config.data.mean, config.data.std))
  assert max_abs_diff(ours, theirs) <= TOLERANCE
  assert np.abs(ours).max() > 0.1  # real features, not a degenerate all-zero output


def test_extract_reads_the_trainer_workdir(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  out = tmp_path / "feats.npz"
  assert extract_main(["--workdir", str(workdir), "--images", str(SAMPLE_DIR),
                       "--out", str(out)]) == 0
  feats = np.load(out)
  assert feats["cls"].shape == (16, 64) and len(set(feats["names"])) == 16
  assert int(feats["step"]) == 4
