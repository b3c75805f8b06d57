"""The train state and the jitted S-PCL step (and its eval twin), built for one device mesh.

One step, in order: uint8 global batch (sharded over the
batch axes) -> normalise -> patchify -> per-example partition from the step key -> gather each
view's patches -> the one shared ViT, vmapped over the 2 views -> CLS z1, z2 -> T-SP InfoNCE in
shard_map (local rows x all-gathered columns) -> gradients -> AdamW. With
config.grad_accum_steps = k > 1 the gradients come from k micro-batches per device
(accumulation.py); the update after them is the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spcl_jax import accumulation, losses, masking, optimizer, sharding
from spcl_jax.data.normalize import normalize_uint8
from spcl_jax.models.vit import VisionTransformer, build_encoder, patchify


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any      # {'encoder': ViT params, 'log_scale': scalar}
  opt_state: Any


def _init_params(model: VisionTransformer, config: ml_collections.ConfigDict,
                 key: jax.Array) -> Any:
  """Boxed (logically named) params; log_scale starts at log(1 / init_temperature)."""
  p, c = model.patch_size, model.channels
  dummy = jnp.zeros((1, 2, p * p * c), jnp.float32)
  encoder = model.init(key, dummy, jnp.zeros((1, 2), jnp.int32))["params"]
  log_scale = jnp.asarray(math.log(1.0 / config.spcl.init_temperature), jnp.float32)
  return {"encoder": encoder, "log_scale": log_scale}


def state_shardings(model: VisionTransformer, tx: optax.GradientTransformation,
                    mesh: Mesh, config: ml_collections.ConfigDict) -> tuple[TrainState, Any]:
  """(abstract state with shardings attached, the sharding tree), from the logical rules."""
  key = jax.random.key(0)
  boxed = jax.eval_shape(functools.partial(_init_params, model, config), key)
  param_shardings = sharding.logical_shardings(boxed, mesh, config)
  params = nn.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_state, param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))
  shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def create_train_state(model: VisionTransformer, tx: optax.GradientTransformation,
                       config: ml_collections.ConfigDict, key: jax.Array,
                       shardings: Any) -> TrainState:
  """Initialises directly into the sharded layout (no full copy on one device first)."""
  def init(key):
    params = nn.unbox(_init_params(model, config, key))
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(key)


def view_positions(key: jax.Array, batch: int, model: VisionTransformer,
                   config: ml_collections.ConfigDict, batch_spec: NamedSharding | None
                   ) -> jax.Array:
  """(2, B, h) grid positions of both views of every example of the GLOBAL batch."""
  num_patches = (config.model.image_size // model.patch_size) ** 2
  idx1, idx2 = masking.partition(key, batch, num_patches, config.spcl.mask_ratio)
  positions = jnp.stack([idx1, idx2])
  if batch_spec is not None:
    positions = jax.lax.with_sharding_constraint(
        positions, NamedSharding(batch_spec.mesh, P(None, *batch_spec.spec)))
  return positions


def gather_views(images: jax.Array, positions: jax.Array, model: VisionTransformer,
                 config: ml_collections.ConfigDict) -> jax.Array:
  """uint8 (B, H, W) + (2, B, h) positions -> (2, B, h, P*P*C) normalised view patches."""
  x = normalize_uint8(images, config.data.mean, config.data.std)
  patches = patchify(x, model.patch_size)                                     # (B, N, PPC)
  return jax.vmap(lambda idx: jnp.take_along_axis(patches, idx[..., None], axis=1))(positions)


def partitioned_views(images: jax.Array, key: jax.Array, model: VisionTransformer,
                      config: ml_collections.ConfigDict, batch_spec: NamedSharding | None
                      ) -> tuple[jax.Array, jax.Array]:
  """(2, B, h, P*P*C) view patches and their (2, B, h) grid positions."""
  positions = view_positions(key, images.shape[0], model, config, batch_spec)
  return gather_views(images, positions, model, config), positions


def encode_views(model: VisionTransformer, encoder_params: Any, views: jax.Array,
                 positions: jax.Array) -> jax.Array:
  """The shared ViT on both views (vmap over the leading view axis) -> CLS z: (2, B, D)."""
  def encode(patches, pos):
    return model.apply({"params": encoder_params}, patches, pos)[:, 0]
  return jax.vmap(encode)(views, positions)


def sharded_loss_fn(mesh: Mesh, config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """spcl_loss_and_retrieval under shard_map: local z rows, negatives from every device."""
  axes = sharding.batch_axes(config)
  loss = functools.partial(
      losses.spcl_loss_and_retrieval, similarity=losses.similarity_from_config(config.spcl),
      negatives=config.spcl.negatives, axis_name=axes, max_scale=config.spcl.max_scale)
  return jax.shard_map(loss, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                       out_specs=(P(), P()))


def _embed_fn(model: VisionTransformer, config: ml_collections.ConfigDict,
              mesh: Mesh) -> accumulation.Embed:
  """(encoder params, uint8 images (b, H, W), positions (2, b, h)) -> z (2, b, D).

  The constraints keep every (micro-)batch split over the batch axes, each device on its rows.
  """
  images_spec = sharding.batch_sharding(mesh, config, 3)
  positions_spec = NamedSharding(mesh, P(None, *images_spec.spec[:2]))
  embed_on_device = _embed_on_device_fn(model, config)

  def embed(encoder_params, images, positions):
    images = jax.lax.with_sharding_constraint(images, images_spec)
    positions = jax.lax.with_sharding_constraint(positions, positions_spec)
    return embed_on_device(encoder_params, images, positions)
  return embed


def _embed_on_device_fn(model: VisionTransformer,
                        config: ml_collections.ConfigDict) -> accumulation.Embed:
  """The same without sharding constraints (for use under vmap over a device axis)."""
  def embed(encoder_params, images, positions):
    views = gather_views(images, positions, model, config)
    return encode_views(model, encoder_params, views, positions)
  return embed


def _loss_fn(mesh: Mesh, config: ml_collections.ConfigDict) -> accumulation.Loss:
  """(z (2, B, D), log_s) -> (loss, retrieval) over the batch z holds, negatives from all."""
  loss = sharded_loss_fn(mesh, config)

  def loss_of_embeddings(z, log_scale):
    if not config.spcl.learn_temperature:
      log_scale = jax.lax.stop_gradient(log_scale)
    return loss(z[0], z[1], log_scale)
  return loss_of_embeddings


def loss_and_gradients(params: Any, images: jax.Array, key: jax.Array,
                       model: VisionTransformer, config: ml_collections.ConfigDict,
                       mesh: Mesh) -> tuple[dict[str, jax.Array], Any]:
  """({'loss', 'retrieval_top1'[, 'microbatch_loss']} of the whole batch, gradients).

  k = config.grad_accum_steps micro-batches per device: 'cached' gives the full-batch gradient,
  'plain' the mean of the micro-batches' own gradients (accumulation.py); k = 1 is one pass.
  """
  embed, loss = _embed_fn(model, config, mesh), _loss_fn(mesh, config)
  positions = view_positions(key, images.shape[0], model, config,
                             sharding.batch_sharding(mesh, config, 2))
  k = config.grad_accum_steps
  if k == 1:
    def objective(p):
      return loss(embed(p["encoder"], images, positions), p["log_scale"])
    (value, retrieval), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return {"loss": value, "retrieval_top1": retrieval}, grads
  split = dict(embed=embed, loss=loss, num_shards=sharding.num_batch_shards(config, mesh), k=k)
  if config.accumulation == "cached":
    (value, retrieval), grads = accumulation.cached_gradients(
        params, images, positions, embed_on_device=_embed_on_device_fn(model, config),
        batch_axes=sharding.batch_axes(config), **split)
    return {"loss": value, "retrieval_top1": retrieval}, grads
  (value, retrieval, mb_loss), grads = accumulation.plain_gradients(
      params, images, positions, **split)
  return {"loss": value, "retrieval_top1": retrieval, "microbatch_loss": mb_loss}, grads


def make_train_step(model: VisionTransformer, tx: optax.GradientTransformation, mesh: Mesh,
                    config: ml_collections.ConfigDict, shardings: Any,
                    schedule: optax.Schedule) -> Callable[..., Any]:
  """jit(state, uint8 images (B, H, W), step key) -> (new state, metrics); state donated."""

  def train_step(state: TrainState, images: jax.Array, key: jax.Array):
    batch_metrics, grads = loss_and_gradients(state.params, images, key, model, config, mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["log_scale"] = losses.clamp_log_scale(params["log_scale"], config.spcl.max_scale)
    log_scale = state.params["log_scale"]  # what this step's loss used
    scale = losses.logit_scale(log_scale, config.spcl.max_scale)
    metrics = {
        **batch_metrics,
        "log_scale": log_scale,
        "scale": scale,
        "temperature": 1.0 / scale,
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params["encoder"]),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch = sharding.batch_sharding(mesh, config, 3)
  return jax.jit(train_step, in_shardings=(shardings, batch, sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model: VisionTransformer, mesh: Mesh, config: ml_collections.ConfigDict,
                   param_shardings: Any) -> Callable[..., Any]:
  """jit(params, images, key) -> (loss, retrieval_top1), no gradients, params not donated."""

  embed, loss = _embed_fn(model, config, mesh), _loss_fn(mesh, config)

  def eval_step(params: Any, images: jax.Array, key: jax.Array):
    # Forward only, a micro-batch at a time: the memory of the train step, never more.
    positions = view_positions(key, images.shape[0], model, config,
                               sharding.batch_sharding(mesh, config, 2))
    z = accumulation.embed_in_microbatches(
        params["encoder"], images, positions, embed=embed,
        num_shards=sharding.num_batch_shards(config, mesh), k=config.grad_accum_steps)
    return loss(z, params["log_scale"])

  batch = sharding.batch_sharding(mesh, config, 3)
  return jax.jit(eval_step, in_shardings=(param_shardings, batch, sharding.replicated(mesh)),
                 out_shardings=(sharding.replicated(mesh),) * 2)


def global_batch(images: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> jax.Array:
  """This process's uint8 block -> the global (B, H, W) array sharded over the batch axes."""
  batch_sharding = sharding.batch_sharding(mesh, config, images.ndim)
  global_shape = (config.batch_size, *images.shape[1:])
  return jax.make_array_from_process_local_data(batch_sharding, images, global_shape)


@dataclasses.dataclass(frozen=True)
class Training:
  """What training on one mesh needs, built once from the config (trainer, benchmark, tests)."""

  model: VisionTransformer
  tx: optax.GradientTransformation
  abstract_state: TrainState  # shapes with shardings attached: the checkpoint restore target
  shardings: Any
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  mesh: Mesh
  config: ml_collections.ConfigDict

  def init_state(self, key: jax.Array) -> TrainState:
    return create_train_state(self.model, self.tx, self.config, key, self.shardings)


def build_training(config: ml_collections.ConfigDict, mesh: Mesh) -> Training:
  model = build_encoder(config.model)
  tx = optimizer.make_optimizer(config)
  abstract_state, shardings = state_shardings(model, tx, mesh, config)
  train_step = make_train_step(model, tx, mesh, config, shardings,
                               optimizer.learning_rate_schedule(config))
  eval_step = make_eval_step(model, mesh, config, shardings.params)
  return Training(model, tx, abstract_state, shardings, train_step, eval_step, mesh, config)
