"""The jitted train step against a reference built by hand, the logit-scale clamp, the loss's
matmul precision, and the optimiser against a reference optax chain.

Each test here was written to kill a one-line bug that once passed every other test (the
mutants in tests/mutants/): one view fed twice, positions not passed, mean and std swapped,
`learn_temperature` ignored, the logged lr one step ahead, the optimiser's mask, warmup,
scaling, clipping and betas.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spcl_jax.configs import demo
from spcl_jax import losses, masking, optimizer, sharding, steps

BATCH, SIZE, PATCH = 8, 64, 16


def tiny_config(**overrides):
  config = demo.get_config()
  config.model.image_size = SIZE
  config.batch_size = BATCH
  config.total_steps = 20
  config.data.mean, config.data.std = 0.3, 0.2  # far from 0.5 / 0.25: a swap shows
  config.update(overrides)
  return config


def one_device_training(config):
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  return steps.build_training(config, mesh), mesh


@pytest.fixture(scope="module")
def shared():
  """One compiled step for most tests here (compiling is what costs time)."""
  config = tiny_config(optim=dict(warmup_fraction=0.0))
  training, mesh = one_device_training(config)
  return config, training, mesh


def images_u8(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (BATCH, SIZE, SIZE), dtype=np.uint8)


def reference_loss(config, model, params, images, key):
  """docs/method.md §2-4 written out: normalise, patchify, partition, gather, ViT per view, loss."""
  x = (images.astype(np.float32) / 255.0 - config.data.mean) / config.data.std
  g = SIZE // PATCH
  patches = x.reshape(BATCH, g, PATCH, g, PATCH).transpose(0, 1, 3, 2, 4).reshape(
      BATCH, g * g, PATCH * PATCH)
  idx1, idx2 = masking.partition(key, BATCH, g * g, config.spcl.mask_ratio)
  apply = jax.jit(model.apply)
  z = []
  for idx in (np.asarray(idx1), np.asarray(idx2)):
    view = np.take_along_axis(patches, idx[..., None], axis=1)
    z.append(apply({"params": params["encoder"]}, view, idx)[:, 0])
  return losses.spcl_loss_and_retrieval(
      z[0], z[1], params["log_scale"], similarity=losses.similarity_from_config(config.spcl),
      negatives=config.spcl.negatives, max_scale=config.spcl.max_scale)


@pytest.mark.slow
def test_train_step_loss_equals_the_method_built_by_hand(shared):
  config, training, mesh = shared
  state = training.init_state(jax.random.key(0))
  params = jax.device_get(state.params)
  images, key = images_u8(), jax.random.key(7)
  want_loss, want_retrieval = reference_loss(config, training.model, params, images, key)
  _, metrics = training.train_step(state, steps.global_batch(images, mesh, config), key)
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-6)
  assert float(metrics["retrieval_top1"]) == pytest.approx(float(want_retrieval))
  # The logged lr is the one this update used: schedule(0) for the first step.
  schedule = optimizer.learning_rate_schedule(config)
  assert float(metrics["lr"]) == pytest.approx(float(schedule(0)), rel=1e-6)
  assert float(schedule(0)) != pytest.approx(float(schedule(1)), rel=1e-4)


@pytest.mark.slow
def test_partitioned_views_are_the_partition_and_disjoint(shared):
  config, training, _ = shared
  model = training.model
  key = jax.random.key(3)
  views, positions = steps.partitioned_views(jnp.asarray(images_u8()), key, model, config, None)
  idx1, idx2 = masking.partition(key, BATCH, (SIZE // PATCH) ** 2, config.spcl.mask_ratio)
  np.testing.assert_array_equal(positions[0], idx1)
  np.testing.assert_array_equal(positions[1], idx2)
  for a, b in zip(np.asarray(positions[0]), np.asarray(positions[1])):
    assert not set(a) & set(b)
  assert views.shape == (2, BATCH, idx1.shape[1], PATCH * PATCH)


@pytest.mark.slow
@pytest.mark.parametrize("learn", [True, False])
def test_learn_temperature_switches_the_scale_update(shared, learn):
  config, training, mesh = shared
  assert config.spcl.learn_temperature
  if not learn:
    config = tiny_config(spcl=dict(learn_temperature=False), optim=dict(warmup_fraction=0.0))
    training, mesh = one_device_training(config)
  state = training.init_state(jax.random.key(0))
  before = float(state.params["log_scale"])
  state, _ = training.train_step(state, steps.global_batch(images_u8(), mesh, config),
                                 jax.random.key(1))
  after = float(state.params["log_scale"])
  assert (after != before) == learn


@pytest.mark.slow
def test_log_scale_above_the_cap_is_brought_back_and_logged_raw(shared):
  config, training, mesh = shared
  state = training.init_state(jax.random.key(0))
  start = math.log(200.0)
  log_scale = jax.device_put(jnp.float32(start), state.params["log_scale"].sharding)
  state = state.replace(params={**state.params, "log_scale": log_scale})
  cap = math.log(config.spcl.max_scale)
  logged = []
  for i in range(3):
    state, metrics = training.train_step(
        state, steps.global_batch(images_u8(i), mesh, config), jax.random.key(i))
    logged.append(float(metrics["log_scale"]))
    assert float(state.params["log_scale"]) <= cap + 1e-6
  assert logged[0] == pytest.approx(start)          # the raw parameter, not the clamped scale
  assert logged[1] <= cap + 1e-6
  assert float(metrics["scale"]) == pytest.approx(math.exp(min(logged[-1], cap)), rel=1e-5)


def test_clamp_log_scale_keeps_the_scale_in_one_to_max():
  got = losses.clamp_log_scale(jnp.array([-1.0, 0.5, 9.0]), 100.0)
  np.testing.assert_allclose(got, [0.0, 0.5, math.log(100.0)], rtol=1e-6)


def test_loss_cosine_matmul_asks_for_highest_precision():
  # conftest sets HIGHEST globally for parity tests; under the default the loss must still ask
  # for it itself (TF32 / one bf16 pass put self-cosines above 1 on accelerators).
  z = jnp.ones((4, 8))
  with jax.default_matmul_precision("default"):
    jaxpr = jax.make_jaxpr(lambda a, b: losses.spcl_loss(
        a, b, jnp.float32(1.0), similarity=losses.cosine_similarity))(z, z)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots)


# --- the optimiser ----------------------------------------------------------------------------

@pytest.mark.slow
def test_weight_decay_only_on_kernels(shared):
  _, training, _ = shared
  params = training.abstract_state.params
  mask = optimizer.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['encoder']['embedding']['kernel']"] is True
  assert flat["['encoder']['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']"]
  for name, decays in flat.items():
    assert decays == name.endswith("['kernel']"), name
  assert flat["['log_scale']"] is False and flat["['encoder']['cls']"] is False


def test_peak_lr_scales_with_the_batch_and_warms_up_linearly():
  config = tiny_config(batch_size=512, total_steps=100,
                       optim=dict(learning_rate=0.0, base_learning_rate=1e-4,
                                  warmup_fraction=0.1))
  assert optimizer.peak_learning_rate(config) == pytest.approx(2e-4)  # 1e-4 * 512 / 256
  schedule = optimizer.learning_rate_schedule(config)
  values = [float(schedule(s)) for s in range(11)]
  assert values[0] == 0.0 and values[10] == pytest.approx(2e-4)
  assert values[5] == pytest.approx(1e-4)
  assert all(a < b for a, b in zip(values, values[1:]))
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_optimizer_equals_a_reference_optax_chain_with_clipping():
  config = tiny_config(total_steps=10, optim=dict(learning_rate=1e-2, warmup_fraction=0.2,
                                                 grad_clip_norm=0.5))
  params = {"w": {"kernel": jnp.ones((3, 2))}, "b": {"bias": jnp.full((2,), 0.5)}}
  reference = optax.chain(
      optax.clip_by_global_norm(0.5),
      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, 0.0), b1=0.9, b2=0.95,
                  weight_decay=0.05, mask={"w": {"kernel": True}, "b": {"bias": False}}))
  ours = optimizer.make_optimizer(config)
  rng = np.random.default_rng(0)
  p_ref, p_ours = params, params
  s_ref, s_ours = reference.init(params), ours.init(params)
  for step in range(4):  # the gradients' norm (~10) is far above the clip norm
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 5, jnp.float32), params)
    u_ref, s_ref = reference.update(grads, s_ref, p_ref)
    u_ours, s_ours = ours.update(grads, s_ours, p_ours)
    p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f"update {step}")


@pytest.mark.slow
def test_bfloat16_step_keeps_the_float32_step_s_loss_and_gradient_norm(shared):
  """The speed settings keep the numerics: one step in bf16 (what accelerators run) against the
  same step in float32, from the same parameters, batch and key."""
  config, training, mesh = shared
  bf16 = one_device_training(tiny_config(optim=dict(warmup_fraction=0.0),
                                         model=dict(dtype="bfloat16")))[0]
  batch, key = steps.global_batch(images_u8(), mesh, config), jax.random.key(7)
  # each step donates its state: one fresh state per step, both from the same key
  _, want = training.train_step(training.init_state(jax.random.key(0)), batch, key)
  _, got = bf16.train_step(training.init_state(jax.random.key(0)), batch, key)
  assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=2e-2)
  assert float(got["grad_norm"]) == pytest.approx(float(want["grad_norm"]), rel=5e-2)
  assert float(got["loss"]) != float(want["loss"])  # it really computed in bf16
