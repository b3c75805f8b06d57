"""The encoder: big_vision names and shapes, logical axes, the fixed sin-cos table, patch order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spcl_jax.models import vit


def tiny_model_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(variant="pico/16", image_size=64, channels=1,
                                       dtype="float32", attention_impl="", remat=False))
  cfg.update(overrides)
  return cfg


def init(model, n=4):
  p = model.patch_size
  return model.init(jax.random.key(0), jnp.zeros((1, n, p * p)), jnp.zeros((1, n), jnp.int32))


def test_parameter_names_and_shapes_are_big_vision_s():
  model = vit.build_encoder(tiny_model_config())
  params = nn.unbox(init(model))["params"]
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes["embedding"] == {"kernel": (16, 16, 1, 64), "bias": (64,)}
  assert shapes["cls"] == (1, 1, 64)
  assert set(shapes["Transformer"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  block = shapes["Transformer"]["encoderblock_1"]
  assert block["MultiHeadDotProductAttention_0"]["query"]["kernel"] == (64, 2, 32)
  assert block["MultiHeadDotProductAttention_0"]["out"]["kernel"] == (2, 32, 64)
  assert block["MlpBlock_0"]["Dense_0"]["kernel"] == (64, 256)
  assert block["MlpBlock_0"]["Dense_1"]["kernel"] == (256, 64)
  assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                        "MlpBlock_0"}
  assert "pos_embedding" not in params  # fixed table, not a parameter


def test_every_parameter_has_logical_axis_names():
  boxed = init(vit.build_encoder(tiny_model_config()))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)


@pytest.mark.parametrize("variant,dims", [("S/16", (384, 12, 6)), ("B/16", (768, 12, 12)),
                                          ("L/16", (1024, 24, 16))])
def test_paper_variants(variant, dims):
  d = vit.variant_dims(variant)
  assert (d["width"], d["depth"], d["num_heads"], d["mlp_dim"]) == (*dims, 4 * dims[0])
  with pytest.raises(ValueError, match="config.model.variant"):
    vit.variant_dims("X/16")


def test_sincos_table_follows_the_mae_formula():
  grid, width = 4, 16
  table = vit.sincos_2d_posemb(grid, width)
  assert table.shape == (16, 16)
  quarter = width // 4
  for k in range(grid * grid):
    row, col = divmod(k, grid)
    for i in range(quarter):
      omega = 1.0 / 10000 ** (i / quarter)
      np.testing.assert_allclose(table[k, i], np.sin(col * omega), atol=1e-6)
      np.testing.assert_allclose(table[k, quarter + i], np.cos(col * omega), atol=1e-6)
      np.testing.assert_allclose(table[k, 2 * quarter + i], np.sin(row * omega), atol=1e-6)
      np.testing.assert_allclose(table[k, 3 * quarter + i], np.cos(row * omega), atol=1e-6)


def test_patchify_matches_a_stride_p_convolution():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 48)).astype(np.float32)
  kernel = rng.normal(size=(16, 16, 1, 8)).astype(np.float32)
  patches = vit.patchify(jnp.asarray(images), 16)
  assert patches.shape == (2, 6, 256)
  via_matmul = np.asarray(patches) @ kernel.reshape(256, 8)
  conv = jax.lax.conv_general_dilated(
      jnp.asarray(images)[..., None], jnp.asarray(kernel), (16, 16), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(via_matmul, np.asarray(conv).reshape(2, 6, 8), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.slow
def test_layer_norm_and_gelu_match_pytorch_conventions():
  # The MLP's GELU is the exact erf form (Flax's default tanh form is off by ~1e-3): an MLP
  # block with identity-like weights must reproduce erf-GELU, not the tanh approximation.
  mlp = vit.MlpBlock(mlp_dim=4)
  x = jnp.linspace(-3, 3, 4)[None, :]
  params = {"Dense_0": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)},
            "Dense_1": {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}}
  exact = 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))
  np.testing.assert_allclose(mlp.apply({"params": params}, x), exact, atol=1e-6)
  assert float(jnp.max(jnp.abs(nn.gelu(x) - exact))) > 1e-4  # the tanh form would fail above
  # LayerNorm: eps 1e-6 and the two-pass variance, checked on values where they matter.
  ln = vit._layer_norm("ln", jnp.float32)  # pylint: disable=protected-access
  assert ln.epsilon == 1e-6 and ln.use_fast_variance is False
  y = jnp.array([[1e4 + 1e-3, 1e4 - 1e-3, 1e4, 1e4]])
  out = ln.apply(ln.init(jax.random.key(0), y), y)
  ref = (y - y.mean()) / np.sqrt(np.var(np.asarray(y, np.float64)) + 1e-6)
  np.testing.assert_allclose(out, ref, atol=2e-3)


@pytest.mark.slow
def test_only_visible_patches_are_encoded_and_order_is_irrelevant_to_cls():
  model = vit.build_encoder(tiny_model_config())
  params = nn.unbox(init(model))["params"]
  rng = np.random.default_rng(1)
  patches = jnp.asarray(rng.normal(size=(1, 5, 256)), jnp.float32)
  positions = jnp.array([[3, 7, 0, 12, 9]])
  out = model.apply({"params": params}, patches, positions)
  assert out.shape == (1, 6, 64)
  perm = jnp.array([4, 2, 0, 3, 1])
  out_perm = model.apply({"params": params}, patches[:, perm], positions[:, perm])
  # No position of its own in the sequence: the CLS output is permutation invariant.
  np.testing.assert_allclose(out[:, 0], out_perm[:, 0], atol=1e-5)


@pytest.mark.slow
def test_remat_and_bfloat16_keep_parameters_and_outputs_close():
  cfg = tiny_model_config()
  model = vit.build_encoder(cfg)
  params = nn.unbox(init(model))["params"]
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 64)), jnp.float32)
  ref = vit.encode_images(model, params, images)
  remat = vit.build_encoder(tiny_model_config(remat=True))
  np.testing.assert_allclose(vit.encode_images(remat, params, images), ref, atol=1e-5)
  bf16 = vit.build_encoder(tiny_model_config(dtype="bfloat16"))
  out = vit.encode_images(bf16, params, images)
  assert out.dtype == jnp.float32  # the final LayerNorm output stays float32
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1
