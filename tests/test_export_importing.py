"""import_encoder: every export format read back into our parameters, and foreign timm ViTs."""

import numpy as np
import pytest

from export_fixtures import (TOLERANCE, jax_cls_features, make_config, make_workdir,
                             max_abs_diff, sample_images, torch_input)
from spcl_jax.export import export_checkpoint
from spcl_jax.weights import npz_format
from spcl_jax.weights.importing import import_encoder
from spcl_jax.models.vit import sincos_2d_posemb

VARIANT, IMAGE_SIZE = "pico/16", 64


def _flat(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", np.asarray(value)


def assert_same_params(actual, expected, exact=True, skip=()):
  actual, expected = dict(_flat(actual)), dict(_flat(expected))
  assert actual.keys() == expected.keys()
  for name, value in expected.items():
    if name in skip:
      continue
    assert actual[name].dtype == np.float32, name
    if exact:
      np.testing.assert_array_equal(actual[name], value, err_msg=name)
    else:
      np.testing.assert_array_max_ulp(actual[name], value, maxulp=2)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("import")
  workdir, params = make_workdir(root / "workdir", VARIANT, IMAGE_SIZE)
  files = {
      "timm": export_checkpoint(workdir, "timm", root / "vit.safetensors")[0],
      "timm3": export_checkpoint(workdir, "timm", root / "vit3.safetensors", in_chans=3)[0],
      "medical_mae": export_checkpoint(workdir, "medical_mae", root / "vit.pth")[0],
      "npz": export_checkpoint(workdir, "npz", root / "vit.npz")[0],
  }
  return root, params, files


@pytest.mark.parametrize("fmt", ["timm", "npz"])
def test_one_channel_exports_import_to_identical_params(exported, fmt):
  _, params, files = exported
  imported, info = import_encoder(files[fmt])
  assert_same_params(imported, params)
  assert info["model"]["variant"] == VARIANT and info["model"]["channels"] == 1
  assert info["pos_embedding_is_sincos"] and not info["cls_position_folded"]
  np.testing.assert_array_equal(info["pos_embedding"][0], sincos_2d_posemb(4, 64))
  assert info["extras"] == {} and info["ignored"] == [] and not info["encoder_norm_is_identity"]


@pytest.mark.parametrize("fmt", ["timm3", "medical_mae"])
def test_three_channel_exports_sum_back_to_the_one_channel_kernel(exported, fmt):
  _, params, files = exported
  imported, info = import_encoder(files[fmt])  # in_chans=1: summed over channels
  assert info["source_channels"] == 3 and info["model"]["channels"] == 1
  # Spreading divided the kernel by 3 in float32: the sum is back within float32 rounding.
  assert_same_params(imported, params, skip=("embedding/kernel",))
  np.testing.assert_array_max_ulp(imported["embedding"]["kernel"], params["embedding"]["kernel"],
                                  maxulp=2)
  kept, _ = import_encoder(files[fmt], in_chans=None)
  assert kept["embedding"]["kernel"].shape == (16, 16, 3, 64)
  np.testing.assert_allclose(kept["embedding"]["kernel"][:, :, 2],
                             params["embedding"]["kernel"][:, :, 0] / 3, rtol=1e-6)


def test_grid_change_gives_the_sincos_table_of_the_new_grid(exported):
  _, _, files = exported
  _, info = import_encoder(files["timm"], image_size=128)
  assert info["grid"] == 8 and info["source_grid"] == 4 and info["model"]["image_size"] == 128
  np.testing.assert_array_equal(info["pos_embedding"][0], sincos_2d_posemb(8, 64))
  with pytest.raises(ValueError, match="image_size 100 is not a multiple of the patch size 16"):
    import_encoder(files["timm"], image_size=100)


def test_scanned_big_vision_layout_is_unstacked(exported, tmp_path):
  _, params, files = exported
  arrays = npz_format.read_npz(files["npz"])
  blocks = sorted({k.split("/")[1] for k in arrays if k.startswith("Transformer/encoderblock_")})
  scanned = {k: v for k, v in arrays.items() if not k.startswith("Transformer/encoderblock_")}
  for key in [k for k in arrays if k.startswith("Transformer/encoderblock_0/")]:
    rest = key.split("/", 2)[2]
    scanned[f"Transformer/encoderblock/{rest}"] = np.stack(
        [arrays[f"Transformer/{b}/{rest}"] for b in blocks])
  imported, _ = import_encoder(npz_format.write_npz(scanned, tmp_path / "scan.npz"))
  assert_same_params(imported, params)


# --- errors name the file and the key -----------------------------------------------------------

def _rewrite_safetensors(source, target, change):
  from safetensors.numpy import load_file, save_file
  state = load_file(str(source))
  change(state)
  save_file(state, str(target))
  return target


def test_unknown_missing_and_misshapen_keys_are_named(exported, tmp_path):
  _, _, files = exported
  path = _rewrite_safetensors(files["timm"], tmp_path / "extra.safetensors",
                              lambda s: s.update({"blocks.0.ls1.gamma": np.ones(64, np.float32)}))
  with pytest.raises(ValueError, match=r"extra.safetensors.*unknown key\(s\) \['blocks.0.ls1"):
    import_encoder(path)
  path = _rewrite_safetensors(files["timm"], tmp_path / "missing.safetensors",
                              lambda s: s.pop("blocks.1.norm2.bias"))
  with pytest.raises(ValueError, match=r"missing.safetensors.*missing key\(s\) "
                     r"\['blocks.1.norm2.bias'\]"):
    import_encoder(path)
  path = _rewrite_safetensors(
      files["timm"], tmp_path / "shape.safetensors",
      lambda s: s.update({"blocks.1.attn.qkv.bias": s["blocks.1.attn.qkv.bias"][:-3]}))
  with pytest.raises(ValueError, match=r"shape.safetensors.*blocks.1.attn.qkv.bias has shape "
                     r"\(189,\), expected \(192,\)"):
    import_encoder(path)
  (tmp_path / "model.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="model.bin.*unknown checkpoint type '.bin'"):
    import_encoder(tmp_path / "model.bin")
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    import_encoder(tmp_path / "absent.npz")


def test_medical_mae_file_without_a_model_dict_is_named(tmp_path):
  import torch  # the `torch` extra, which the suite installs: missing fails, never skips
  torch.save({"state": 1}, tmp_path / "odd.pth")
  with pytest.raises(ValueError, match=r"odd.pth.*expected Medical MAE's \{'model': "
                     r"state_dict\}, found \['state'\]"):
    import_encoder(tmp_path / "odd.pth")


# --- foreign timm models: learned positions, CLS row, MAE decoder, classifier head --------------

def _timm_vit(**kwargs):
  from timm.models import vision_transformer as timm_vit  # the `torch` extra, as above
  import torch
  torch.manual_seed(0)
  model = timm_vit.VisionTransformer(img_size=IMAGE_SIZE, patch_size=16, in_chans=3,
                                     embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
                                     qkv_bias=True, **kwargs).eval()
  with torch.no_grad():  # timm initialises biases and norms to 0/1: make every one count.
    for name, value in model.named_parameters():
      if not name.endswith("weight") or "norm" in name:
        value.add_(0.1 * torch.randn_like(value))
  return model


def test_timm_model_with_a_cls_position_computes_the_same_cls_feature(tmp_path):
  import torch
  from safetensors.torch import save_file
  model = _timm_vit(num_classes=0, global_pool="token")
  with torch.no_grad():  # Sin-cos patch positions (ours), a learned, non-zero CLS row.
    model.pos_embed[0, 1:] = torch.from_numpy(sincos_2d_posemb(4, 64))
    model.pos_embed[0, 0] = torch.randn(64)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  # Medical MAE pre-training checkpoints also carry the MAE decoder: ignored, and listed.
  state["decoder_embed.weight"] = torch.zeros(32, 64)
  state["mask_token"] = torch.zeros(1, 1, 32)
  torch.save({"model": state}, tmp_path / "mae.pth")
  params, info = import_encoder(tmp_path / "mae.pth")
  assert info["cls_position_folded"] and info["pos_embedding_is_sincos"]
  assert info["ignored"] == ["decoder_embed.weight", "mask_token"]
  assert info["model"]["num_heads"] == 2  # From the width: no sidecar in a .pth from elsewhere.
  _, images = sample_images(IMAGE_SIZE, 2)
  config = make_config(VARIANT, IMAGE_SIZE)
  ours = jax_cls_features(VARIANT, IMAGE_SIZE, params, images)
  with torch.no_grad():
    theirs = model.forward_features(
        torch_input(images, 3, config.data.mean, config.data.std))[:, 0].numpy()
  assert max_abs_diff(ours, theirs) <= TOLERANCE
  # Learned (non sin-cos) positions come back, resampled to the asked grid.
  with torch.no_grad():
    model.pos_embed[0, 1:] = torch.randn(16, 64)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / "learned.safetensors"))
  _, info = import_encoder(tmp_path / "learned.safetensors", image_size=128)
  assert not info["pos_embedding_is_sincos"] and info["pos_embedding"].shape == (1, 64, 64)


def test_avg_pool_classifier_brings_fc_norm_and_head(tmp_path):
  import torch
  from safetensors.torch import save_file
  model = _timm_vit(num_classes=3, global_pool="avg", fc_norm=True)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert "norm.weight" not in state  # timm's final norm is the identity here
  save_file(state, str(tmp_path / "classifier.safetensors"))
  params, info = import_encoder(tmp_path / "classifier.safetensors")
  np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["scale"], np.ones(64))
  np.testing.assert_array_equal(params["Transformer"]["encoder_norm"]["bias"], np.zeros(64))
  assert info["encoder_norm_is_identity"]
  np.testing.assert_array_equal(info["extras"]["head"]["kernel"], state["head.weight"].numpy().T)
  np.testing.assert_array_equal(info["extras"]["fc_norm"]["scale"],
                                state["fc_norm.weight"].numpy())


def test_encoder_without_final_norm_exports_without_norm(exported):
  # A classifier pooled through fc_norm keeps no encoder_norm; timm has no `norm` then.
  from spcl_jax.weights import layout
  _, params, _ = exported
  trimmed = {**params, "Transformer": {k: v for k, v in params["Transformer"].items()
                                       if k != "encoder_norm"}}
  state = layout.timm_state_dict(trimmed, grid_size=4, in_chans=1)
  assert "norm.weight" not in state and "blocks.1.mlp.fc2.bias" in state
  assert set(layout.timm_state_dict(params, 4, 1)) - set(state) == {"norm.weight", "norm.bias"}
