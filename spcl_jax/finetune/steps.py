"""The fine-tuning train state and jitted steps, built for one device mesh.

A step: uint8 global batch (sharded over the batch axes) -> normalise -> the workload's model with
drop path (rng: the step key) -> the workload's loss (`workloads`: classification's BCE with logits,
Medical MAE's; segmentation's Dice + BCE) -> gradients -> AdamW with layer-wise lr decay. With
config.optim.freeze_encoder the encoder's gradients are stopped (and its lr multiplier is 0).
State, shardings and batches are the pre-training ones (`spcl_jax.steps.TrainState`,
`spcl_jax.sharding`), so checkpoints, resume and multi-host behave the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from spcl_jax import sharding
from spcl_jax.data.normalize import normalize_uint8
from spcl_jax.finetune import optimizer, workloads
from spcl_jax.steps import TrainState


def _boxed_params(model: nn.Module, key: jax.Array) -> Any:
  e = model.encoder
  dummy = jnp.zeros((1, e.image_size, e.image_size, e.channels), jnp.float32)
  return model.init(key, dummy)["params"]


@dataclasses.dataclass(frozen=True)
class FineTuning:
  """What fine-tuning on one mesh needs, built once from the config (trainer, bench, tests)."""

  model: nn.Module  # model.Classifier or decoders.Segmenter
  workload: Any  # workloads.Classification | workloads.Segmentation
  tx: optax.GradientTransformation
  abstract_state: TrainState  # shapes with shardings attached: the checkpoint restore target
  shardings: Any
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  mesh: Any
  config: ml_collections.ConfigDict

  def init_state(self, key: jax.Array, encoder_params: Any | None = None) -> TrainState:
    """Fresh head (and encoder, unless pre-trained encoder params are given), sharded."""
    model, tx = self.model, self.tx

    def init(key, encoder_params):
      params = nn.unbox(_boxed_params(model, key))
      if encoder_params is not None:
        params = {**params, "encoder": encoder_params}
      return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    return jax.jit(init, out_shardings=self.shardings)(key, encoder_params)


def build_finetuning(config: ml_collections.ConfigDict, mesh: Any, num_classes: int,
                     steps_per_epoch: int) -> FineTuning:
  workload = workloads.workload_for(config)
  model = workload.build_model(config, num_classes)
  frozen = bool(config.optim.get("freeze_encoder", False))
  boxed = jax.eval_shape(lambda k: _boxed_params(model, k), jax.random.key(0))
  param_shardings = sharding.logical_shardings(boxed, mesh, config)
  abstract_params = nn.unbox(boxed)
  tx = optimizer.make_optimizer(config, abstract_params, model.encoder.depth, steps_per_epoch)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, opt_state, param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh))
  shardings = TrainState(step=sharding.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=opt_state)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  schedule = optimizer.learning_rate_schedule(config, steps_per_epoch)
  mean, std = float(config.data.mean), float(config.data.std)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    x = normalize_uint8(images, mean, std)

    def loss_fn(params):
      if frozen:  # no backward pass through the encoder at all
        params = {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}
      logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
      return workload.loss(logits, labels)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(state.params)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_step(params: Any, images: jax.Array) -> jax.Array:
    return workload.eval_outputs(
        model.apply({"params": params}, normalize_uint8(images, mean, std), train=False))

  batch3 = sharding.batch_sharding(mesh, config, 3)
  # targets: labels (B, K) or masks (B, S, S)
  batch2 = sharding.batch_sharding(mesh, config, 3 if workload.target == "mask" else 2)
  replicated = sharding.replicated(mesh)
  jit_train = jax.jit(train_step, in_shardings=(shardings, batch3, batch2, replicated),
                      out_shardings=(shardings, replicated), donate_argnums=(0,))
  # Outputs (logits, or mask probabilities) come back replicated: every process scores them.
  jit_eval = jax.jit(eval_step, in_shardings=(param_shardings, batch3),
                     out_shardings=replicated)
  return FineTuning(model, workload, tx, abstract, shardings, jit_train, jit_eval, mesh, config)
