"""The train state and the jitted S-PCL step (and its eval twin), built for one device mesh.

One step, in order (ARCHITECTURE.md "Data through a step"): uint8 global batch (sharded over the
batch axes) -> normalise -> patchify -> per-example partition from the step key -> gather each
view's patches -> the one shared ViT, vmapped over the 2 views -> CLS z1, z2 -> T-SP InfoNCE in
shard_map (local rows x all-gathered columns) -> gradients -> AdamW.
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

from spcl_jax import losses, masking, optimizer, sharding
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


def create_train_state(model: VisionTransformer, tx: optax.GradientTransformation, mesh: Mesh,
                       config: ml_collections.ConfigDict, key: jax.Array,
                       shardings: Any) -> TrainState:
  """Initialises directly into the sharded layout (no full copy on one device first)."""
  def init(key):
    params = nn.unbox(_init_params(model, config, key))
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(key)


def partitioned_views(images: jax.Array, key: jax.Array, model: VisionTransformer,
                      config: ml_collections.ConfigDict, batch_spec: NamedSharding | None
                      ) -> tuple[jax.Array, jax.Array]:
  """(2, B, h, P*P*C) view patches and their (2, B, h) grid positions."""
  x = normalize_uint8(images, config.data.mean, config.data.std)
  patches = patchify(x, model.patch_size)                                     # (B, N, PPC)
  batch, num_patches = patches.shape[:2]
  idx1, idx2 = masking.partition(key, batch, num_patches, config.spcl.mask_ratio)
  positions = jnp.stack([idx1, idx2])                                         # (2, B, h)
  if batch_spec is not None:
    positions = jax.lax.with_sharding_constraint(
        positions, NamedSharding(batch_spec.mesh, P(None, *batch_spec.spec)))
  views = jax.vmap(lambda idx: jnp.take_along_axis(patches, idx[..., None], axis=1))(positions)
  return views, positions


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


def _forward(params: Any, images: jax.Array, key: jax.Array, model: VisionTransformer,
             config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[jax.Array, jax.Array]:
  batch_spec = sharding.batch_sharding(mesh, config, 2)
  views, positions = partitioned_views(images, key, model, config, batch_spec)
  z = encode_views(model, params["encoder"], views, positions)
  log_scale = params["log_scale"]
  if not config.spcl.learn_temperature:
    log_scale = jax.lax.stop_gradient(log_scale)
  return sharded_loss_fn(mesh, config)(z[0], z[1], log_scale)


def make_train_step(model: VisionTransformer, tx: optax.GradientTransformation, mesh: Mesh,
                    config: ml_collections.ConfigDict, shardings: Any,
                    schedule: optax.Schedule) -> Callable[..., Any]:
  """jit(state, uint8 images (B, H, W), step key) -> (new state, metrics); state donated."""

  def train_step(state: TrainState, images: jax.Array, key: jax.Array):
    forward = functools.partial(_forward, images=images, key=key, model=model, config=config,
                                mesh=mesh)
    (loss, retrieval), grads = jax.value_and_grad(forward, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["log_scale"] = losses.clamp_log_scale(params["log_scale"], config.spcl.max_scale)
    log_scale = state.params["log_scale"]  # what this step's loss used
    scale = losses.logit_scale(log_scale, config.spcl.max_scale)
    metrics = {
        "loss": loss,
        "retrieval_top1": retrieval,
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

  def eval_step(params: Any, images: jax.Array, key: jax.Array):
    return _forward(params, images, key, model, config, mesh)

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
    return create_train_state(self.model, self.tx, self.mesh, self.config, key, self.shardings)


def build_training(config: ml_collections.ConfigDict, mesh: Mesh) -> Training:
  model = build_encoder(config.model)
  tx = optimizer.make_optimizer(config)
  abstract_state, shardings = state_shardings(model, tx, mesh, config)
  train_step = make_train_step(model, tx, mesh, config, shardings,
                               optimizer.learning_rate_schedule(config))
  eval_step = make_eval_step(model, mesh, config, shardings.params)
  return Training(model, tx, abstract_state, shardings, train_step, eval_step, mesh, config)
