"""Medical MAE export: a 3-channel timm state dict under 'model', as its fine-tuning loads it."""

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from export_fixtures import (TOLERANCE, jax_cls_features, make_config, make_workdir,
                             max_abs_diff, sample_images, torch_input)
from spcl_jax.export import export_checkpoint

VARIANT, IMAGE_SIZE, COUNT = "pico/16", 128, 3
HEAD = {"head.weight", "head.bias"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("mmae")
  workdir, params = make_workdir(root / "workdir", VARIANT, IMAGE_SIZE)
  [path] = export_checkpoint(workdir, "medical_mae", root / "spcl.pth")  # 3 channels by default
  # Medical MAE loads with torch.load defaults: weights_only=True on torch >= 2.6.
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  config = make_config(VARIANT, IMAGE_SIZE)
  _, images = sample_images(IMAGE_SIZE, COUNT)
  return dict(workdir=workdir, root=root, checkpoint=checkpoint, images=images,
              mean=config.data.mean, std=config.data.std,
              reference=jax_cls_features(VARIANT, IMAGE_SIZE, params, images))


def medical_mae_vit(run, **kwargs):
  """A ViT shaped like Medical MAE's (timm's, 3 channels, LayerNorm eps 1e-6)."""
  info = run["checkpoint"]["spcl_jax"]["timm_kwargs"]
  base = {k: info[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
  return VisionTransformer(**base, qkv_bias=True, in_chans=3, weight_init="skip", **kwargs)


def test_checkpoint_holds_a_three_channel_timm_state_dict(run):
  state = run["checkpoint"]["model"]
  assert state["patch_embed.proj.weight"].shape[1] == 3
  assert run["checkpoint"]["spcl_jax"]["mean"] == [run["mean"]] * 3


def test_features_on_rgb_copy_match_jax(run):
  model = medical_mae_vit(run, img_size=IMAGE_SIZE, num_classes=0).eval()
  model.load_state_dict(run["checkpoint"]["model"], strict=True)
  with torch.no_grad():
    features = model.forward_features(
        torch_input(run["images"], 3, run["mean"], run["std"]))[:, 0].numpy()
  diff = max_abs_diff(features, run["reference"])
  print(f"medical_mae (3 channels) vs JAX: max abs diff {diff:.3g}")
  assert diff <= TOLERANCE


def load_like_medical_mae_finetuning(model, checkpoint):
  """Its recipe: resample pos_embed to the model's grid, then load with strict=False."""
  state = dict(checkpoint["model"])
  state["pos_embed"] = resample_abs_pos_embed(
      state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=1)
  return model.load_state_dict(state, strict=False)


def test_cls_token_finetuning_at_224_carries_everything_but_the_head(run):
  model = medical_mae_vit(run, img_size=224, num_classes=14, global_pool="token")
  result = load_like_medical_mae_finetuning(model, run["checkpoint"])
  assert set(result.missing_keys) == HEAD and not result.unexpected_keys


def test_global_pool_finetuning_drops_the_pretrained_norm(run):
  """Medical MAE's default: mean of the patch tokens through a fresh fc_norm (docs/export.md, "Medical MAE")."""
  model = medical_mae_vit(run, img_size=224, num_classes=14, global_pool="avg")
  result = load_like_medical_mae_finetuning(model, run["checkpoint"])
  assert set(result.missing_keys) == HEAD | {"fc_norm.weight", "fc_norm.bias"}
  assert set(result.unexpected_keys) == {"norm.weight", "norm.bias"}


def test_one_channel_medical_mae_export_is_refused(run):
  with pytest.raises(ValueError, match="--in-chans 1: Medical MAE"):
    export_checkpoint(run["workdir"], "medical_mae", run["root"] / "x.pth", in_chans=1)
