"""The numpy side of the export: channel spreading, position table, npz round trip (no torch)."""

import numpy as np
import pytest

from export_fixtures import make_config, random_encoder_params
from spcl_jax.weights import layout, npz_format
from spcl_jax.models.vit import sincos_2d_posemb


@pytest.fixture(scope="module")
def mu_params():
  return random_encoder_params(make_config("pico/16", 64), seed=3)


def test_spread_over_channels_keeps_the_grayscale_response():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 4, 1, 8)).astype(np.float32)
  spread = layout.spread_over_channels(kernel, 3)
  assert spread.shape == (4, 4, 3, 8)
  np.testing.assert_allclose(spread[:, :, 0], kernel[:, :, 0] / 3, rtol=1e-7)
  # A grayscale patch copied to 3 channels gives the 1-channel response.
  patch = rng.normal(size=(4, 4)).astype(np.float32)
  one = np.einsum("yx,yxd->d", patch, kernel[:, :, 0])
  three = np.einsum("yxc,yxcd->d", np.repeat(patch[..., None], 3, axis=-1), spread)
  np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-6)
  assert layout.spread_over_channels(kernel, 1) is kernel


def test_check_in_chans_names_the_flag():
  layout.check_in_chans(1, 1)
  layout.check_in_chans(1, 3)
  layout.check_in_chans(3, 3)
  with pytest.raises(ValueError, match="--in-chans 2"):
    layout.check_in_chans(1, 2)
  with pytest.raises(ValueError, match="model.channels"):
    layout.check_in_chans(3, 1)


def test_pos_embed_has_a_zero_cls_row_then_the_pretraining_table():
  table = layout.pos_embed_with_cls_row(4, 16)
  assert table.shape == (1, 17, 16)
  np.testing.assert_array_equal(table[0, 0], 0.0)
  np.testing.assert_array_equal(table[0, 1:], sincos_2d_posemb(4, 16))


def test_timm_state_dict_shapes_and_qkv_order(mu_params):
  state = layout.timm_state_dict(mu_params, grid_size=4, in_chans=3)
  d, p = 64, 16
  assert state["patch_embed.proj.weight"].shape == (d, 3, p, p)
  assert state["pos_embed"].shape == (1, 17, d)
  assert state["blocks.1.attn.qkv.weight"].shape == (3 * d, d)
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
  # Rows d..2d of qkv are the key projection: output feature (head h, dim j) = row h*Dh + j.
  key = mu_params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]["key"]
  np.testing.assert_array_equal(state["blocks.1.attn.qkv.weight"][d + 32 + 5],
                                key["kernel"][:, 1, 5])
  np.testing.assert_array_equal(state["blocks.1.attn.qkv.bias"][d + 32 + 5], key["bias"][1, 5])
  # Conv weight [d, c, y, x] is the flax kernel [y, x, c, d] (spread over 3 channels).
  kernel = mu_params["embedding"]["kernel"]
  np.testing.assert_allclose(state["patch_embed.proj.weight"][7, 2, 3, 11],
                             kernel[3, 11, 0, 7] / 3, rtol=1e-6)


def test_timm_kwargs_spell_out_the_architecture():
  info = dict(image_size=512, patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536)
  kwargs = layout.timm_kwargs(info, in_chans=1)
  assert kwargs["mlp_ratio"] == 4.0 and kwargs["embed_dim"] == 384
  assert kwargs["num_classes"] == 0 and kwargs["class_token"] and not kwargs["no_embed_class"]
  with pytest.raises(ValueError, match="mlp_dim"):
    layout.timm_kwargs(dict(info, mlp_dim=1000), in_chans=1)


def test_npz_round_trips_the_parameters(mu_params, tmp_path):
  arrays = npz_format.big_vision_arrays(mu_params, grid_size=4, in_chans=1)
  path = npz_format.write_npz(arrays, tmp_path / "mu.npz")
  read = npz_format.read_npz(path)
  assert read["pos_embedding"].shape == (1, 16, 64)  # no CLS row: big_vision's layout
  np.testing.assert_array_equal(read["pos_embedding"][0], sincos_2d_posemb(4, 64))
  back = npz_format.params_from_big_vision(read)
  flat_in = dict(_flatten(mu_params))
  flat_back = dict(_flatten(back))
  assert flat_in.keys() == flat_back.keys()
  for name, value in flat_in.items():
    np.testing.assert_array_equal(flat_back[name], value, err_msg=name)


def test_npz_three_channel_kernel_is_spread(mu_params):
  arrays = npz_format.big_vision_arrays(mu_params, grid_size=4, in_chans=3)
  kernel = np.asarray(mu_params["embedding"]["kernel"])
  assert arrays["embedding/kernel"].shape == (16, 16, 3, 64)
  np.testing.assert_allclose(arrays["embedding/kernel"].sum(axis=2), kernel[:, :, 0],
                             rtol=1e-5, atol=1e-7)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", np.asarray(value)
