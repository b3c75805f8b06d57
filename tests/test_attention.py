"""Attention: padding for the fused kernels is invisible, 'auto' picks by device, remat policies.

The fused kernels (cuDNN) only run on NVIDIA GPUs; on CPU the same padding and masking code runs
with XLA's kernel, which is what these tests compare against the unpadded call. The cuDNN path
itself is traced (not run) with its version checks stubbed, because its batching rule under the
vmap over the two views is where a shape error would first show.
"""

import functools
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from spcl_jax import masking
from spcl_jax.configs import demo, vitb512
from spcl_jax.configuration import ConfigError, validate_config
from spcl_jax.models import attention, vit
from spcl_jax.steps import encode_views


def _demo_view_tokens():
  config = demo.get_config()
  grid = config.model.image_size // vit.variant_dims(config.model.variant)["patch_size"]
  return 1 + masking.view_size(grid ** 2, config.spcl.mask_ratio)


def _vitb512_view_tokens():
  config = vitb512.get_config()
  return 1 + masking.view_size((512 // 16) ** 2, config.spcl.mask_ratio)


# Pre-training's ViT-B/16 view (206), the odd count the issue names (205), the demo's view, and
# a whole demo image with CLS (fine-tuning's sequence, 257).
TOKEN_COUNTS = sorted({_vitb512_view_tokens(), 205, _demo_view_tokens(), 1 + 16 * 16})


def _qkv(length, batch=2, heads=2, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
               for _ in range(3))


@pytest.fixture
def kernel_calls(monkeypatch):
  """Records the (B, L, ...) shape and the masks of every call to jax's attention."""
  calls, real = [], jax.nn.dot_product_attention
  def spy(q, k, v, **kwargs):
    calls.append((q.shape, kwargs.get("key_value_seq_lengths") is not None))
    return real(q, k, v, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  return calls


@pytest.mark.parametrize("length, multiple",
                         [(n, 8) for n in TOKEN_COUNTS] + [(_vitb512_view_tokens(), 64)])
@pytest.mark.slow
def test_padded_and_masked_attention_equals_unpadded(length, multiple, kernel_calls):
  q, k, v = _qkv(length)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

  def loss(multiple):
    return lambda q, k, v: jnp.sum(
        attention.dot_product_attention(q, k, v, "xla", seq_multiple=multiple) * cotangent)

  want, want_grads = jax.jit(jax.value_and_grad(loss(1), argnums=(0, 1, 2)))(q, k, v)
  got, got_grads = jax.jit(jax.value_and_grad(loss(multiple), argnums=(0, 1, 2)))(q, k, v)
  padded = attention.padded_length(length, multiple)
  assert padded % multiple == 0 and padded >= length
  if padded != length:  # the kernel saw the padded sequence, with the padded keys masked
    assert (q.shape[0], padded) + q.shape[2:] in [shape for shape, _ in kernel_calls]
    assert all(masked for shape, masked in kernel_calls if shape[1] == padded)
  out = attention.dot_product_attention(q, k, v, "xla", seq_multiple=multiple)
  assert out.shape == q.shape
  np.testing.assert_allclose(
      out, attention.dot_product_attention(q, k, v, "xla"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_unmasked_padding_would_change_the_output():
  """The check above can fail: zero keys left unmasked take a share of every softmax."""
  length = 205
  q, k, v = _qkv(length)
  widths = ((0, 0), (0, 3), (0, 0), (0, 0))
  unmasked = jax.nn.dot_product_attention(*(jnp.pad(t, widths) for t in (q, k, v)))[:, :length]
  reference = attention.dot_product_attention(q, k, v, "xla")
  assert np.max(np.abs(unmasked - reference)) > 1e-3


def _model_config(**overrides):
  fields = dict(variant="pico/16", image_size=64, channels=1, dtype="float32",
                attention_impl="xla", attention_seq_multiple=0, remat="none")
  return ml_collections.ConfigDict({**fields, **overrides})


def _views(model, batch=3, seed=0):
  """(2, B, h, P*P) view patches and (2, B, h) positions from the real partition."""
  n = model.num_patches
  h = masking.view_size(n, 0.6)
  positions = masking.partition(jax.random.key(seed), batch, n, 0.6)
  positions = jnp.stack(positions)
  rng = np.random.default_rng(seed)
  views = jnp.asarray(rng.normal(size=(2, batch, h, model.patch_size ** 2)), jnp.float32)
  return views, positions


def _projected_z(model, params, views, positions):
  """A scalar with real gradients: z projected on fixed random directions. (A sum of z**2 after
  the final LayerNorm is nearly constant, so its gradients would be round-off.)"""
  z = encode_views(model, params, views, positions)
  directions = jax.random.normal(jax.random.key(7), z.shape, z.dtype)
  return jnp.sum(z * directions)


def _assert_gradients_close(got, want):
  # float32 round-off of sums over the tokens, relative to the gradient's scale (some leaves,
  # e.g. the key bias, which softmax ignores, are zero up to that round-off)
  scale = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def unpadded():
  """The plain encoder's value and gradients on the real partition: what the variants match."""
  model = vit.build_encoder(_model_config())
  views, positions = _views(model)
  params = model.init(jax.random.key(0), views[0], positions[0])["params"]
  loss = lambda m: functools.partial(_projected_z, m, views=views, positions=positions)
  value, grads = jax.jit(jax.value_and_grad(loss(model)))(params)
  return types.SimpleNamespace(params=params, views=views, loss=loss, value=value, grads=grads)


@pytest.mark.slow
def test_encoder_with_padded_attention_matches_unpadded_views_and_grads(unpadded):
  """The real encode_views path (vmap over the two views): z and every parameter's gradient."""
  padded = vit.build_encoder(_model_config(attention_seq_multiple=8))
  assert padded.seq_multiple == 8
  assert (1 + unpadded.views.shape[2]) % 8  # the views' token count really needs padding
  got, got_grads = jax.jit(jax.value_and_grad(unpadded.loss(padded)))(unpadded.params)
  np.testing.assert_allclose(got, unpadded.value, rtol=1e-5)
  _assert_gradients_close(got_grads, unpadded.grads)


def _device(platform, kind, version=""):
  return types.SimpleNamespace(platform=platform, device_kind=kind,
                               client=types.SimpleNamespace(platform_version=version))


def test_auto_picks_cudnn_on_nvidia_gpus_for_shapes_it_takes_and_xla_elsewhere():
  h100 = _device("gpu", "NVIDIA H100 80GB HBM3", "cuda 12080")
  resolve = attention.resolve_attention_impl
  assert resolve("auto", jnp.bfloat16, 64, h100) == "cudnn"
  assert resolve("auto", jnp.float16, 64, h100) == "cudnn"
  assert resolve("auto", jnp.float32, 64, h100) == "xla"  # the kernel is bf16/fp16 only
  assert resolve("auto", jnp.bfloat16, 12, h100) == "xla"  # head dim not a multiple of 8
  assert resolve("auto", jnp.bfloat16, 64, _device("gpu", "AMD Instinct MI300X", "rocm 6")) == "xla"
  assert resolve("auto", jnp.bfloat16, 64, _device("tpu", "TPU v5p")) == "xla"
  assert resolve("auto", jnp.bfloat16, 64, _device("cpu", "cpu")) == "xla"
  assert resolve("auto", jnp.bfloat16, 64) == "xla"  # this machine: CPU
  assert resolve("cudnn", jnp.float32, 64, _device("cpu", "cpu")) == "cudnn"  # asked for: kept
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    resolve("flash", jnp.bfloat16, 64)


def test_build_encoder_pads_to_the_kernel_s_multiple_unless_the_config_says():
  assert vit.build_encoder(_model_config(attention_impl="auto")).attention_impl == "xla"
  assert vit.build_encoder(_model_config()).seq_multiple == 1  # XLA takes any length
  cudnn = vit.build_encoder(_model_config(attention_impl="cudnn", dtype="bfloat16"))
  assert (cudnn.attention_impl, cudnn.seq_multiple) == ("cudnn", 8)
  assert vit.build_encoder(_model_config(attention_impl="cudnn",
                                         attention_seq_multiple=64)).seq_multiple == 64


@pytest.fixture
def cudnn_traceable(monkeypatch):
  """Lets jax trace (never run) its cuDNN attention on a machine without cuDNN.

  It stubs jax's private cuDNN checks. If a jax release renames them, this fails (it does not
  skip): the cuDNN path would otherwise lose its only CPU test unnoticed.
  """
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=g-import-not-at-top
  for name in ("check_cudnn_version", "check_compute_capability",
               "is_cuda_compute_capability_equal"):
    assert hasattr(fused, name), (
        f"jax {jax.__version__}'s cuDNN attention no longer has {name}: update this fixture")
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)


@pytest.mark.slow
def test_cudnn_path_traces_under_the_view_vmap_with_padding(cudnn_traceable, kernel_calls):
  """Forward and backward of encode_views with the cuDNN kernel, as the train step calls it.

  cuDNN's batching rule folds the view axis into the batch together with the sequence lengths;
  lengths made as a constant inside the vmapped model would fail here with a reshape error.
  """
  del cudnn_traceable
  model = vit.build_encoder(_model_config(attention_impl="cudnn", dtype="bfloat16"))
  views, positions = _views(model)
  params = vit.build_encoder(_model_config()).init(
      jax.random.key(0), views[0], positions[0])["params"]
  loss = lambda p: jnp.sum(encode_views(model, p, views, positions).astype(jnp.float32))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert "dot_product_attention" in jaxpr  # cuDNN's custom call, not XLA's einsums
  padded = attention.padded_length(1 + views.shape[2], 8)
  assert any(shape[1] == padded and masked for shape, masked in kernel_calls)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_policies_keep_values_and_gradients(policy, unpadded):
  remat = vit.build_encoder(_model_config(remat=policy))
  params, loss = unpadded.params, unpadded.loss
  got, got_grads = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(got, unpadded.value, rtol=1e-5)
  _assert_gradients_close(got_grads, unpadded.grads)
  # every block is rematerialised, under the policy its name stands for
  jaxpr = jax.make_jaxpr(loss(remat))(params).jaxpr
  policies = [eqn.params["policy"] for eqn in jaxpr.eqns if "policy" in eqn.params]
  assert len(policies) == remat.depth
  expected = {"full": jax.checkpoint_policies.nothing_saveable,
              "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
  assert all(p is expected for p in policies)


def test_remat_takes_only_the_policy_names():
  assert [vit.remat_policy_name(v) for v in ("none", "full", "save_dots")] == [
      "none", "full", "save_dots"]
  with pytest.raises(ValueError, match="config.model.remat=True must be one of"):
    vit.remat_policy_name(True)


def test_bad_attention_and_remat_settings_fail_with_the_field_named():
  for field, value, match in [("attention_impl", "flash", "attention_impl='flash'"),
                              ("remat", "some", "remat='some'"),
                              ("attention_seq_multiple", -8, "attention_seq_multiple=-8"),
                              ("attention_impl", "cudnn", "'cudnn' needs an NVIDIA GPU.*cpu")]:
    config = demo.get_config()
    config.model[field] = value
    with pytest.raises(ConfigError, match=match):
      validate_config(config, num_batch_shards=1, process_count=1)
