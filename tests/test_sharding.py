"""Sharded computations equal the single-device result (8 virtual CPU devices, float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from spcl_jax.configs import demo
from spcl_jax import losses, optimizer, sharding, steps
from spcl_jax.models.vit import build_encoder, encode_images


def tsp(kappa):
  return losses.make_similarity("tsp", {"kappa": kappa})

AXES = ("data", "fsdp")


def mesh_4x2():
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  return Mesh(np.asarray(jax.devices()).reshape(4, 2), AXES, axis_types=(AxisType.Auto,) * 2)


def rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.slow
@pytest.mark.parametrize("negatives", ["all", "cross"])
def test_loss_and_gradients_equal_single_device(negatives):
  rng = np.random.default_rng(0)
  z1 = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
  z2 = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
  log_s = jnp.float32(2.5)
  single = functools.partial(losses.spcl_loss, similarity=tsp(1 / 64), negatives=negatives)
  sharded = jax.shard_map(
      functools.partial(losses.spcl_loss, similarity=tsp(1 / 64), negatives=negatives,
                        axis_name=AXES),
      mesh=mesh_4x2(), in_specs=(P(AXES), P(AXES), P()), out_specs=P())
  loss1, g1 = jax.value_and_grad(single, argnums=(0, 1, 2))(z1, z2, log_s)
  loss8, g8 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(z1, z2, log_s)
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
  for a, b in zip(g8, g1):
    assert rel_err(a, b) <= 1e-5
  # the gradient is not scaled by the device count (the varying-axes check is on)
  assert float(jnp.abs(g1[2])) > 0


def test_each_device_computes_local_rows_by_global_columns():
  z = jnp.asarray(np.random.default_rng(1).normal(size=(16, 8)), jnp.float32)

  def local_logits(z1, z2):
    pl = losses.spcl_logits(z1, z2, jnp.float32(1.0), similarity=tsp(0.1), axis_name=AXES)
    return pl.logits, pl.positive

  logits, positive = jax.jit(jax.shard_map(
      local_logits, mesh=mesh_4x2(), in_specs=(P(AXES), P(AXES)),
      out_specs=(P(AXES), P(AXES))))(z, z[::-1])
  # 8 devices x (2 * 2 local rows) stacked; each block has all 2 * 16 columns.
  assert logits.shape == (8 * 4, 32)
  assert logits.addressable_shards[0].data.shape == (4, 32)
  full = losses.spcl_logits(z, z[::-1], jnp.float32(1.0), similarity=tsp(0.1))
  # Device d's rows are its 2 view-1 rows then its 2 view-2 rows.
  for d in range(8):
    rows = np.r_[2 * d:2 * d + 2, 16 + 2 * d:16 + 2 * d + 2]
    np.testing.assert_allclose(np.asarray(logits)[4 * d:4 * d + 4], np.asarray(full.logits)[rows],
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(positive)[4 * d:4 * d + 4],
                                  np.asarray(full.positive)[rows])


def run_three_steps(config, devices):
  mesh = sharding.make_mesh(config, devices)
  training = steps.build_training(config, mesh)
  state = training.init_state(jax.random.key(0))
  train_step = training.train_step
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 64, 64), dtype=np.uint8)
  step_losses = []
  for i in range(3):
    batch = steps.global_batch(images[i], mesh, config)
    state, metrics = train_step(state, batch, jax.random.fold_in(jax.random.key(1), i))
    step_losses.append(float(metrics["loss"]))
  return step_losses, jax.device_get(state.params), mesh


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [1, 2])
def test_train_step_on_8_devices_equals_1_device(fsdp):
  config = demo.get_config()
  config.model.image_size = 64
  config.total_steps = 10
  config.optim.warmup_fraction = 0.0
  losses1, params1, _ = run_three_steps(config, jax.devices()[:1])
  config.sharding.fsdp = fsdp
  losses8, params8, mesh = run_three_steps(config, jax.devices())
  assert dict(mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert losses1[0] != losses1[1]  # different masks and updated params each step
  # The attention KEY bias adds the same q.b_k to every logit of a softmax row: its exact
  # gradient is 0, so the computed one is round-off, and Adam (g / sqrt(v)) turns round-off of
  # either sign into lr-sized steps. Its value is irrelevant to the output (checked below);
  # every other parameter must agree to the tolerance.
  def is_key_bias(path):
    return "['key']['bias']" in jax.tree_util.keystr(path)
  pairs = zip(jax.tree_util.tree_leaves_with_path(params1), jax.tree.leaves(params8))
  compared = [(a, b) for (path, a), b in pairs if not is_key_bias(path)]
  scale = max(float(np.max(np.abs(a))) for a, _ in compared)
  worst = max(float(np.max(np.abs(a - b))) for a, b in compared)
  assert worst / scale <= 1e-5
  swapped = jax.tree_util.tree_map_with_path(
      lambda path, a, b: b if is_key_bias(path) else a, params1, params8)
  model = build_encoder(config.model)
  images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 64, 64)), jnp.float32)
  np.testing.assert_allclose(encode_images(model, swapped["encoder"], images),
                             encode_images(model, params1["encoder"], images), atol=2e-5)


def test_fsdp_rule_shards_parameters_over_the_fsdp_axis():
  config = demo.get_config()
  config.sharding.fsdp = 2
  mesh = sharding.make_mesh(config)
  model = build_encoder(config.model)
  _, shardings = steps.state_shardings(model, optimizer.make_optimizer(config), mesh, config)
  kernel = shardings.params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
  assert kernel["kernel"].spec == P("fsdp", None)
  assert shardings.params["log_scale"].spec == P()
  with pytest.raises(ValueError, match="config.sharding"):
    config.sharding.fsdp = 3
    sharding.make_mesh(config)
