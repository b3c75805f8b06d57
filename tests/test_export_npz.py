"""big_vision npz export read by timm's own npz loader (`VisionTransformer.load_pretrained`).

The model must be built with `no_embed_class=True` (docs/method.md §8): our `pos_embedding`
has no CLS row, and timm then adds it to the patch tokens only, as pre-training does.
"""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from export_fixtures import (TOLERANCE, jax_cls_features, make_config, make_workdir,
                             max_abs_diff, sample_images, torch_input)
from spcl_jax.export import export_checkpoint

VARIANT, IMAGE_SIZE, COUNT = "Ti/16", 256, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("npz")
  workdir, params = make_workdir(root / "workdir", VARIANT, IMAGE_SIZE)
  config = make_config(VARIANT, IMAGE_SIZE)
  _, images = sample_images(IMAGE_SIZE, COUNT)
  timm_json = export_checkpoint(workdir, "timm", root / "vit.safetensors")[1]
  return dict(root=root, workdir=workdir, images=images, mean=config.data.mean,
              std=config.data.std, kwargs=json.loads(timm_json.read_text())["timm_kwargs"],
              reference=jax_cls_features(VARIANT, IMAGE_SIZE, params, images))


@pytest.mark.parametrize("in_chans", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_npz_through_timm_big_vision_loader_matches_jax(run, in_chans):
  [path] = export_checkpoint(run["workdir"], "npz", run["root"] / f"vit_{in_chans}.npz",
                             in_chans=in_chans)
  kwargs = run["kwargs"] | dict(in_chans=in_chans, no_embed_class=True)
  model = VisionTransformer(**kwargs, weight_init="skip").eval()
  # Poison every parameter first: anything the loader leaves untouched shows up as NaN.
  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float("nan"))
  model.load_pretrained(str(path))
  assert all(torch.isfinite(p).all() for p in model.parameters())
  with torch.no_grad():
    features = model.forward_features(
        torch_input(run["images"], in_chans, run["mean"], run["std"]))[:, 0].numpy()
  diff = max_abs_diff(features, run["reference"])
  print(f"npz in_chans={in_chans} via timm load_pretrained: max abs diff vs JAX {diff:.3g}")
  assert diff <= TOLERANCE
