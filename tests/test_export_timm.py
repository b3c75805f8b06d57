"""timm export: strict loading and CLS parity with the JAX encoder on the bundled CXRs.

float32 on CPU on both sides; max abs difference at most 1e-4 (docs/method.md §8). pico/16 at
64 on 4 images (the fast tier), ViT-tiny at 256 on 4 images and ViT-S/16 at 512 on 2 images, each
with 1 and 3 input channels. And the
whole path a user takes (slow tier): pre-train with the trainer, export, load in timm, extract.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from export_fixtures import (TOLERANCE, jax_cls_features, make_config, make_workdir,
                             max_abs_diff, sample_images, torch_input)
from spcl_jax import train
from spcl_jax.configs import demo
from spcl_jax.data.sources import SAMPLE_DIR
from spcl_jax.export import export_checkpoint
from spcl_jax.extract import main as extract_main
from spcl_jax.pretrained import load_pretrained

torch.set_default_dtype(torch.float32)

CASES = {"pico": ("pico/16", 64, 4), "tiny": ("Ti/16", 256, 4), "small": ("S/16", 512, 2)}


@pytest.fixture(scope="module", params=["pico", pytest.param("tiny", marks=pytest.mark.slow),
                                        pytest.param("small", marks=pytest.mark.slow)])
def case(request, tmp_path_factory):
  """A workdir, its 1- and 3-channel timm exports loaded strictly, and their CLS features."""
  variant, image_size, count = CASES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  workdir, params = make_workdir(root / "workdir", variant, image_size)
  config = make_config(variant, image_size)
  _, images = sample_images(image_size, count, config.data.resize_filter)
  out = dict(name=request.param, mean=config.data.mean, std=config.data.std, images=images,
             reference=jax_cls_features(variant, image_size, params, images))
  for in_chans in (1, 3):
    paths = export_checkpoint(workdir, "timm", root / f"vit_{in_chans}ch.safetensors",
                              in_chans=in_chans)
    model, state = build_timm(paths)
    out[in_chans] = dict(
        paths=paths, load_result=model.load_state_dict(state, strict=True),
        features=cls_features(model, torch_input(images, in_chans, out["mean"], out["std"])))
  return out


def build_timm(paths, **overrides):
  """The model the sidecar describes (random init skipped: the weights are loaded next)."""
  weights, sidecar = paths
  kwargs = json.loads(sidecar.read_text())["timm_kwargs"] | overrides
  model = VisionTransformer(**kwargs, weight_init="skip").eval()
  return model, load_file(str(weights))


def cls_features(model, x):
  with torch.no_grad():
    return model.forward_features(x)[:, 0].numpy()


@pytest.mark.parametrize("in_chans", [1, 3])
def test_timm_export_loads_strictly_and_matches_jax(case, in_chans):
  result = case[in_chans]["load_result"]
  assert not result.missing_keys and not result.unexpected_keys
  diff = max_abs_diff(case[in_chans]["features"], case["reference"])
  print(f"{case['name']} in_chans={in_chans}: max abs diff vs JAX {diff:.3g}")
  assert diff <= TOLERANCE


def test_three_channel_export_on_rgb_copy_equals_one_channel(case):
  diff = max_abs_diff(case[3]["features"], case[1]["features"])
  print(f"{case['name']}: 3-channel on RGB copy vs 1-channel: max abs diff {diff:.3g}")
  assert diff <= TOLERANCE


def test_sidecar_describes_the_run(case):
  meta = json.loads(case[3]["paths"][1].read_text())
  assert meta["in_chans"] == 3 and meta["timm_kwargs"]["in_chans"] == 3
  assert meta["mean"] == [case["mean"]] * 3 and meta["std"] == [case["std"]] * 3
  assert meta["image_size"] == case["images"].shape[1]
  assert meta["source"]["step"] == 7
  assert meta["preprocessing"]["resize_filter"] == "bilinear"


def test_pos_embed_resamples_to_224_and_keeps_cls_without_position(case):
  """What fine-tuning at 224 does: timm's bicubic resampling of our (1, 1 + N, D) table."""
  model_224, state = build_timm(case[1]["paths"], img_size=224)
  grid = model_224.patch_embed.grid_size
  state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid,
                                              num_prefix_tokens=1)
  assert state["pos_embed"].shape == (1, 1 + grid[0] * grid[1], model_224.embed_dim)
  assert torch.count_nonzero(state["pos_embed"][0, 0]) == 0
  model_224.load_state_dict(state, strict=True)
  reps = -(-224 // case["images"].shape[-1])  # small cases tile their images up to 224
  images = np.tile(case["images"], (1, reps, reps))[:, :224, :224]
  features = cls_features(model_224, torch_input(images, 1, case["mean"], case["std"]))
  assert features.shape == (len(case["images"]), model_224.embed_dim)
  assert np.all(np.isfinite(features))


# --- the whole path: the trainer's own checkpoint ------------------------------------------

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


@pytest.mark.slow
def test_trainer_checkpoint_exports_to_timm_with_parity(trained_workdir, tmp_path):
  workdir, config = trained_workdir
  pretrained = load_pretrained(workdir)
  assert pretrained.step == 4
  paths = export_checkpoint(workdir, "timm", tmp_path / "vit.safetensors")
  model, state = build_timm(paths)
  model.load_state_dict(state, strict=True)
  _, images = sample_images(64, 4, config.data.resize_filter)
  ours = jax_cls_features("pico/16", 64, pretrained.params, images)
  theirs = cls_features(model, torch_input(images, 1, config.data.mean, config.data.std))
  assert max_abs_diff(ours, theirs) <= TOLERANCE
  assert np.abs(ours).max() > 0.1  # real features, not a degenerate all-zero output


@pytest.mark.slow
def test_extract_reads_the_trainer_workdir(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  out = tmp_path / "feats.npz"
  assert extract_main(["--workdir", str(workdir), "--images", str(SAMPLE_DIR),
                       "--out", str(out)]) == 0
  feats = np.load(out)
  assert feats["cls"].shape == (16, 64) and len(set(feats["names"])) == 16
  assert int(feats["step"]) == 4
