"""Cached-embedding accumulation (docs/method.md §5) on 8 virtual CPU devices: k micro-batches per
device give the loss and gradients of the whole batch; no image crosses devices; memory falls
with k; the scaling model's bytes are the compiled step's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spcl_jax.configs import demo
from spcl_jax import accumulation, masking, sharding, steps
from spcl_jax.bench import collectives, memory, scaling
from spcl_jax.configuration import ConfigError, resolve_batch_size, validate_config
from spcl_jax.models.vit import build_encoder

IMAGE_SIZE, BATCH = 64, 32  # 8 devices x 4 images: k = 4 leaves one image per micro-batch


def small_config(k=1, mode="cached"):
  config = demo.get_config()
  config.model.image_size = IMAGE_SIZE
  config.batch_size = BATCH
  config.grad_accum_steps = k
  config.accumulation = mode
  return config


def test_microbatches_regroup_rows_each_device_already_holds():
  rows = jnp.arange(16)  # 4 devices x 4 rows; device d holds rows 4d .. 4d + 3
  mbs = accumulation.to_microbatches(rows, num_shards=4, k=2)
  np.testing.assert_array_equal(mbs, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
  np.testing.assert_array_equal(accumulation.from_microbatches(mbs, num_shards=4), rows)
  two_views = jnp.stack([rows, rows + 100])  # the batch on axis 1, as positions and z
  mbs = accumulation.to_microbatches(two_views, num_shards=4, k=4, axis=1)
  assert mbs.shape == (4, 2, 4)
  np.testing.assert_array_equal(mbs[3], [[3, 7, 11, 15], [103, 107, 111, 115]])
  np.testing.assert_array_equal(accumulation.from_microbatches(mbs, 4, axis=1), two_views)
  with pytest.raises(ValueError, match="4 devices x 3 micro-batches"):
    accumulation.to_microbatches(rows, num_shards=4, k=3)


@pytest.mark.slow
def test_each_microbatch_row_gets_the_partition_of_its_global_example():
  config = small_config()
  mesh = sharding.make_mesh(config)
  key = jax.random.key(7)
  positions = steps.view_positions(key, BATCH, build_encoder(config.model), config,
                                   sharding.batch_sharding(mesh, config, 2))
  num_patches = (IMAGE_SIZE // 16) ** 2
  for k in (1, 2, 4):
    mbs = np.asarray(accumulation.to_microbatches(positions, 8, k, axis=1))  # (k, 2, 8m, h)
    m = BATCH // 8 // k
    for j in range(k):
      for d in (0, 5):
        example = d * (BATCH // 8) + j * m  # global index of device d's first row in mb j
        idx1, idx2 = masking.partition(key, m, num_patches, config.spcl.mask_ratio,
                                       first_example=example)
        np.testing.assert_array_equal(mbs[j, 0, d * m:(d + 1) * m], idx1)
        np.testing.assert_array_equal(mbs[j, 1, d * m:(d + 1) * m], idx2)


@pytest.fixture(scope="module")
def gradients():
  """loss_and_gradients on one global batch for k = 1, 2, 4 (cached) and 2 (plain).

  k = 4 runs with FSDP (parameters split over 2 devices), the others data-parallel.
  """
  images = np.random.default_rng(0).integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  out = {}
  for k, mode in ((1, "cached"), (2, "cached"), (4, "cached"), (2, "plain")):
    config = small_config(k, mode)
    config.sharding.fsdp = 2 if k == 4 else 1
    mesh = sharding.make_mesh(config)
    training = steps.build_training(config, mesh)
    if k in (1, 4):  # FSDP needs its own layout; init gives the same values in any layout
      params = training.init_state(jax.random.key(0)).params
    step = jax.jit(functools.partial(steps.loss_and_gradients, model=training.model,
                                     config=config, mesh=mesh))
    metrics, grads = step(params, steps.global_batch(images, mesh, config), jax.random.key(3))
    out[k, mode] = jax.device_get((metrics, grads))
  return out


def max_relative_difference(grads, reference):
  leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(reference)
  scale = max(float(np.max(np.abs(r))) for r in ref_leaves)
  return max(float(np.max(np.abs(g - r))) for g, r in zip(leaves, ref_leaves)) / scale


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_cached_accumulation_equals_one_pass_on_the_whole_batch(gradients, k):
  metrics1, grads1 = gradients[1, "cached"]
  metrics_k, grads_k = gradients[k, "cached"]
  np.testing.assert_allclose(metrics_k["loss"], metrics1["loss"], rtol=1e-6)
  assert metrics_k["retrieval_top1"] == metrics1["retrieval_top1"]
  assert max_relative_difference(grads_k, grads1) <= 1e-5
  # log_scale's gradient comes from the loss pass, the encoder's from the k VJPs: both checked
  np.testing.assert_allclose(grads_k["log_scale"], grads1["log_scale"], rtol=1e-5)
  assert abs(float(grads1["log_scale"])) > 0


@pytest.mark.slow
def test_plain_accumulation_contrasts_within_each_microbatch(gradients):
  metrics1, grads1 = gradients[1, "cached"]
  metrics_p, grads_p = gradients[2, "plain"]
  # The logged loss is still the whole batch's; the optimised one has half the negatives.
  np.testing.assert_allclose(metrics_p["loss"], metrics1["loss"], rtol=1e-6)
  assert metrics_p["microbatch_loss"] < metrics1["loss"] - 0.1
  assert max_relative_difference(grads_p, grads1) > 1e-2


def image_collectives(found, image_size, patch_size):
  """Collectives with a uint8 payload, or one shaped like images, patches or a view's patches."""
  num_patches = (image_size // patch_size) ** 2
  per_view = masking.view_size(num_patches, 0.6)
  pixels = patch_size * patch_size
  image_like = {(image_size, image_size), (num_patches, pixels), (per_view, pixels)}
  return [c for c in found for dtype, dims in c.shapes if dtype == "u8" or dims[-2:] in image_like]


@pytest.fixture(scope="module")
def compiled_k2():
  config = small_config(2)
  mesh = sharding.make_mesh(config)
  return config, mesh, memory.compile_train_step(config, mesh)


@pytest.mark.slow
def test_compiled_step_moves_no_image_between_devices(compiled_k2):
  config, mesh, compiled = compiled_k2
  found = collectives.collectives(compiled.as_text())
  assert found, "the step has collectives (gradients, embeddings): the parser must see them"
  assert image_collectives(found, IMAGE_SIZE, 16) == []

  # The detector catches a layout that does move images: micro-batches as contiguous halves
  # of the GLOBAL batch put device 0's second half on other devices.
  axes = sharding.batch_axes(config)

  def naive(images):
    halves = images.reshape(2, BATCH // 2, IMAGE_SIZE, IMAGE_SIZE)
    return jax.lax.with_sharding_constraint(halves, NamedSharding(mesh, P(None, axes)))
  moved = jax.jit(naive, in_shardings=sharding.batch_sharding(mesh, config, 3)).lower(
      jax.ShapeDtypeStruct((BATCH, IMAGE_SIZE, IMAGE_SIZE), np.uint8)).compile()
  assert image_collectives(collectives.collectives(moved.as_text()), IMAGE_SIZE, 16)


@pytest.mark.slow
def test_scaling_model_bytes_are_the_compiled_steps(compiled_k2):
  config, mesh, compiled = compiled_k2
  rows = {kind: (modelled, found) for kind, modelled, found in
          scaling.check_collectives(config, mesh, compiled)}
  # One gradient all-reduce per step although k = 2 (plus a few scalars: loss, hits).
  modelled, found = rows["all-reduce"]
  assert modelled <= found <= modelled + 64
  assert rows["all-gather"][0] == rows["all-gather"][1] > 0      # z of both views
  assert rows["reduce-scatter"][0] == rows["reduce-scatter"][1] > 0  # its transpose
  assert rows["all-to-all"] == rows["collective-permute"] == (0, 0)


def test_loop_trip_counts_multiply_collectives():
  hlo = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={{0,1,2,3}}, to_apply=%add
}
%add (a: f32[], b: f32[]) -> f32[] {
  %s = f32[] add(%a, %b)
}
ENTRY %main (x: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = bf16[2,4]{1,0} reduce-scatter(bf16[8,4]{1,0} %y), replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  %ag = f32[4]{0} all-gather(f32[2]{0} %z), replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}, dimensions={0}
}
"""
  found = collectives.collectives(hlo)
  by_kind = {c.kind: c for c in found}
  assert by_kind["all-reduce"].executions == 3 and by_kind["all-reduce"].bytes_per_step == 96
  assert by_kind["reduce-scatter"].group_size == 4
  assert by_kind["reduce-scatter"].payload_bytes == 2 * 4 * 2 * 4  # the input: 4 x the output
  assert by_kind["all-gather"].group_size == 2 and by_kind["all-gather"].bytes_per_step == 16


@pytest.mark.slow
def test_peak_memory_falls_with_k_at_a_fixed_global_batch():
  config = demo.get_config()
  config.model.image_size, config.batch_size = 128, 32  # activations outweigh the state
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  peaks = [memory.train_step_memory(memory.with_batch(config, grad_accum_steps=k), mesh).peak
           for k in (1, 2, 4)]
  assert peaks[0] > peaks[1] > peaks[2]
  assert peaks[2] < 0.6 * peaks[0]


def test_per_device_batch_and_microbatches_are_checked():
  config = small_config()
  config.batch_size_per_device = 6
  resolved = resolve_batch_size(config, 8)
  assert resolved.batch_size == 48 and config.batch_size == BATCH  # a copy: input untouched
  resolved.grad_accum_steps = 4
  with pytest.raises(ConfigError, match=r"config.grad_accum_steps=4: the 6 images per device"):
    validate_config(resolved, num_batch_shards=8)
  resolved.grad_accum_steps = 0
  with pytest.raises(ConfigError, match="config.grad_accum_steps=0 must be a positive integer"):
    validate_config(resolved, num_batch_shards=8)
  config.batch_size_per_device = 0
  with pytest.raises(ConfigError, match="config.batch_size_per_device=0"):
    resolve_batch_size(config, 8)


def test_largest_batch_search_finds_the_last_batch_under_the_budget(monkeypatch):
  # A made-up, slightly convex memory curve: the search must not trust one straight line.
  def fake_memory(config, mesh):
    b = config.batch_size
    return memory.StepMemory(arguments=1000, outputs=0, aliased=0,
                             temporaries=int(37 * b + 0.05 * b * b), platform="cpu")
  monkeypatch.setattr(memory, "train_step_memory", fake_memory)
  monkeypatch.setattr(memory.sharding, "num_batch_shards", lambda config, mesh: 1)
  config = small_config(k=2)
  found, figures = memory.largest_batch_per_device(config, None, 100_000, log=lambda _: None)
  assert found == 1084 and figures.peak <= 100_000  # 1086 would need 100_164 bytes
  assert memory.largest_batch_per_device(config, None, 500, log=lambda _: None) is None


def _toy_embed(encoder, images, positions):
  """(B, 3) images, (2, B, 1) positions -> z (2, B, 2): two 'views' of a tanh layer."""
  shift = positions[..., 0, None].astype(jnp.float32) * 0.1
  return jnp.stack([jnp.tanh(images @ encoder["w"] + shift[0]),
                    jnp.tanh(images @ encoder["w"] * 2.0 + shift[1])])


def _toy_contrastive(z, log_scale):
  """InfoNCE over the rows it is given (each row's softmax runs over them all)."""
  logits = z[0] @ z[1].T * jnp.exp(log_scale)
  return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=1))), jnp.float32(0)


@pytest.fixture(scope="module")
def toy_batch():
  rng = np.random.default_rng(5)
  params = {"encoder": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
            "log_scale": jnp.float32(0.7)}
  images = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  positions = jnp.asarray(rng.integers(0, 4, (2, 8, 1)), jnp.int32)
  return params, images, positions


def _toy_gradients(params, images, positions, rows):
  def objective(p):
    return _toy_contrastive(_toy_embed(p["encoder"], images[rows], positions[:, rows]),
                            p["log_scale"])[0]
  return jax.grad(objective)(params)


def test_plain_gradients_are_the_mean_of_the_microbatch_gradients(toy_batch):
  # 2 devices x 4 rows, k = 2: micro-batch j is rows 2j, 2j + 1 of each device. A sum instead
  # of the mean would hide from an AdamW step (scale-invariant), not from the raw gradients.
  params, images, positions = toy_batch
  (_, _, mb_loss), grads = accumulation.plain_gradients(
      params, images, positions, embed=_toy_embed, loss=_toy_contrastive, num_shards=2, k=2)
  per_microbatch = [_toy_gradients(params, images, positions, np.array(rows))
                    for rows in ([0, 1, 4, 5], [2, 3, 6, 7])]
  reference = jax.tree.map(lambda a, b: (a + b) / 2, *per_microbatch)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(optax.tree.norm(grads), optax.tree.norm(reference), rtol=1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_cached_gradients_are_the_whole_batch_gradient(toy_batch, k):
  params, images, positions = toy_batch
  (value, _), grads = accumulation.cached_gradients(
      params, images, positions, embed=_toy_embed, embed_on_device=_toy_embed,
      loss=_toy_contrastive, num_shards=2, k=k, batch_axes=None)
  reference = _toy_gradients(params, images, positions, np.arange(8))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(optax.tree.norm(grads), optax.tree.norm(reference), rtol=1e-5)
