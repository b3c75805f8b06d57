"""Fine-tuning model pieces: timm parity of the exported classifier, LLRD table, drop path."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spcl_jax.configs.finetune import nih14
from export_fixtures import max_abs_diff, random_encoder_params, sample_images, torch_input
from spcl_jax import checkpoint, run_info
from spcl_jax.data.normalize import normalize_uint8
from spcl_jax.export import export_checkpoint
from spcl_jax.finetune import optimizer
from spcl_jax.finetune.model import build_classifier
from spcl_jax.finetune.trainer import run_info_extra
from spcl_jax.models.vit import DropPath, drop_path_rates

CLASSES = ["a", "b", "c"]


def small_config(pool: str, image_size: int = 64):
  config = nih14.get_config()
  config.model.variant = "pico/16"
  config.model.image_size = image_size
  config.model.dtype = "float32"
  config.model.pool = pool
  return config


def random_classifier_params(config, seed: int = 0):
  """Encoder weights off their init values (export_fixtures), a random fc_norm and head."""
  encoder = random_encoder_params(config, seed)
  rng = np.random.default_rng(seed + 1)
  width = encoder["cls"].shape[-1]
  params = {"encoder": encoder,
            "head": {"kernel": rng.normal(0, width ** -0.5, (width, len(CLASSES))),
                     "bias": rng.normal(0, 0.1, (len(CLASSES),))}}
  if config.model.pool == "avg":
    del encoder["Transformer"]["encoder_norm"]
    params["fc_norm"] = {"scale": rng.uniform(0.5, 1.5, (width,)),
                         "bias": rng.normal(0, 0.1, (width,))}
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_exported_classifier_matches_jax_logits_in_timm(tmp_path, pool):
  import torch
  from safetensors.torch import load_file
  from timm.models.vision_transformer import VisionTransformer
  config = small_config(pool)
  params = random_classifier_params(config)
  init = {"kind": "random", "path": None, "step": None}
  run_info.write_run_info(tmp_path, config, run_info_extra(config, CLASSES, init))
  manager = checkpoint.make_manager(tmp_path / "best")
  manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  manager.close()
  paths = export_checkpoint(tmp_path, "timm", tmp_path / "clf.safetensors")
  import json
  described = json.loads(paths[1].read_text())
  assert described["classes"] == CLASSES and described["source"]["step"] == 5
  model = VisionTransformer(**described["timm_kwargs"])
  model.load_state_dict(load_file(str(paths[0])), strict=True)
  model.eval()

  _, images = sample_images(64, 4)
  x = normalize_uint8(jnp.asarray(images), config.data.mean, config.data.std)
  jax_logits = jax.jit(build_classifier(config, len(CLASSES)).apply)({"params": params}, x)
  # The torch side preprocesses raw pixels as the sidecar tells a timm user to.
  mean = np.asarray(described["mean"], np.float32)[None, :, None, None]
  std = np.asarray(described["std"], np.float32)[None, :, None, None]
  assert mean.shape[1] == described["in_chans"] == model.patch_embed.proj.in_channels
  pixels = np.repeat(images[:, None].astype(np.float32) / np.float32(255.0), mean.shape[1], 1)
  with torch.no_grad():
    torch_logits = model(torch.from_numpy((pixels - mean) / std)).numpy()
  assert np.abs(jax_logits).max() > 0.1  # a real signal, not two near-zero outputs
  assert max_abs_diff(jax_logits, torch_logits) <= 1e-4


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def test_layer_decay_and_weight_decay_table_for_depth_12():
  config = nih14.get_config()  # B/16: depth 12
  config.model.pool = "avg"  # the table with fc_norm ('auto' resolves at start, from the init)
  model = build_classifier(config, 14)
  shapes = jax.eval_shape(
      lambda k: flax.linen.unbox(model.init(k, jnp.zeros((1, 224, 224, 1))))["params"],
      jax.random.key(0))
  multipliers = _flat(optimizer.lr_multipliers(shapes, 12, 0.55))
  decay = _flat(optimizer.weight_decay_mask(shapes))
  # Hand-written: embedding and CLS at layer 0 -> 0.55**13; block i -> 0.55**(12 - i);
  # fc_norm and head -> 1. Decay: kernels only.
  expected_scale = {
      "encoder/embedding/kernel": 0.55 ** 13, "encoder/embedding/bias": 0.55 ** 13,
      "encoder/cls": 0.55 ** 13,
      "encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": 0.55 ** 12,
      "encoder/Transformer/encoderblock_0/LayerNorm_0/scale": 0.55 ** 12,
      "encoder/Transformer/encoderblock_5/MultiHeadDotProductAttention_0/query/bias": 0.55 ** 7,
      "encoder/Transformer/encoderblock_11/MultiHeadDotProductAttention_0/out/kernel": 0.55,
      "encoder/Transformer/encoderblock_11/LayerNorm_1/bias": 0.55,
      "fc_norm/scale": 1.0, "fc_norm/bias": 1.0, "head/kernel": 1.0, "head/bias": 1.0,
  }
  for name, value in expected_scale.items():
    assert multipliers[name] == pytest.approx(value, rel=1e-12), name
  assert len(multipliers) == 3 + 12 * 16 + 4  # embedding (2), CLS, 12 blocks, fc_norm, head
  expected_decay = {
      "encoder/embedding/kernel": True, "encoder/embedding/bias": False, "encoder/cls": False,
      "encoder/Transformer/encoderblock_3/MultiHeadDotProductAttention_0/key/kernel": True,
      "encoder/Transformer/encoderblock_3/MultiHeadDotProductAttention_0/key/bias": False,
      "encoder/Transformer/encoderblock_3/MlpBlock_0/Dense_1/kernel": True,
      "encoder/Transformer/encoderblock_3/LayerNorm_0/scale": False,
      "fc_norm/scale": False, "head/kernel": True, "head/bias": False,
  }
  for name, value in expected_decay.items():
    assert decay[name] is value, name
  # The cls pool keeps the encoder's final norm: it sits after the blocks (scale 1).
  assert optimizer.layer_id(("encoder", "Transformer", "encoder_norm", "scale"), 12) == 13


def test_optimizer_scales_adamw_and_weight_decay_by_layer_and_follows_the_schedule():
  config = nih14.get_config()
  config.batch_size = 256
  config.epochs, config.optim.warmup_epochs = 10, 2
  params = {"encoder": {"embedding": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}},
            "head": {"kernel": jnp.ones((2,))}}
  tx = optimizer.make_optimizer(config, params, depth=12, steps_per_epoch=5)
  state = tx.init(params)
  update = jax.jit(tx.update)
  zero = jax.tree.map(jnp.zeros_like, params)
  for _ in range(10):  # to the end of warmup: lr = the peak 2.5e-4
    updates, state = update(zero, state, params)
  # Zero gradients: the update is weight decay alone, lr * multiplier * wd * param.
  lr = optimizer.learning_rate_schedule(config, 5)(9)
  np.testing.assert_allclose(updates["head"]["kernel"], -lr * 0.05, rtol=1e-5)
  np.testing.assert_allclose(updates["encoder"]["embedding"]["kernel"],
                             -lr * 0.55 ** 13 * 0.05, rtol=1e-5)
  np.testing.assert_array_equal(updates["encoder"]["embedding"]["bias"], 0.0)
  schedule = optimizer.learning_rate_schedule(config, 5)
  peak, floor = 2.5e-4, 1e-5
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(peak)
  t = 30  # half-cycle cosine: floor + (peak - floor) / 2 * (1 + cos(pi * (t - 10) / 40))
  assert float(schedule(t)) == pytest.approx(floor + (peak - floor) / 2 * (1 + np.cos(np.pi / 2)))
  assert float(schedule(50)) == pytest.approx(floor)


def test_drop_path_is_identity_at_eval_and_drops_whole_branches_per_example():
  branch = jnp.asarray(np.random.default_rng(0).normal(size=(256, 5, 8)), jnp.float32)
  module = DropPath(rate=0.25)
  np.testing.assert_array_equal(module.apply({}, branch, deterministic=True), branch)
  out = np.asarray(module.apply({}, branch, deterministic=False,
                                rngs={"dropout": jax.random.key(3)}))
  kept = np.all(np.isclose(out, np.asarray(branch) / 0.75, rtol=1e-6), axis=(1, 2))
  dropped = np.all(out == 0, axis=(1, 2))
  assert np.all(kept ^ dropped)  # each example: the whole branch kept (rescaled) or dropped
  assert 0.6 < kept.mean() < 0.9
  assert drop_path_rates(12, 0.2)[0] == 0.0 and drop_path_rates(12, 0.2)[-1] == 0.2


@pytest.mark.slow
def test_classifier_with_drop_path_equals_without_at_eval_and_differs_in_training():
  config = small_config("avg", 32)
  params = random_classifier_params(config)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32)), jnp.float32)
  config.model.drop_path_rate = 0.0
  plain = jax.jit(build_classifier(config, len(CLASSES)).apply)({"params": params}, x)
  config.model.drop_path_rate = 0.5
  apply = jax.jit(build_classifier(config, len(CLASSES)).apply, static_argnames="train")
  np.testing.assert_allclose(apply({"params": params}, x), plain, atol=1e-6)
  trained = apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})
  assert max_abs_diff(trained, plain) > 1e-3


def test_init_from_a_timm_export_round_trips_into_the_classifier(tmp_path):
  from export_fixtures import make_workdir
  from spcl_jax.finetune.initialization import encoder_for_classifier, load_init
  workdir, params = make_workdir(tmp_path / "pretrain", "pico/16", 64)
  export_checkpoint(workdir, "timm", tmp_path / "vit.safetensors")
  init = load_init(str(tmp_path / "vit.safetensors"), image_size=32)
  assert (init.kind, init.step) == ("timm", None)
  from_workdir = load_init(str(workdir))
  assert (from_workdir.kind, from_workdir.step) == ("spcl", 7)
  config = small_config("avg", 32)
  model = build_classifier(config, len(CLASSES))
  expected = jax.eval_shape(
      lambda k: flax.linen.unbox(model.init(k, jnp.zeros((1, 32, 32, 1))))["params"],
      jax.random.key(0))["encoder"]
  for loaded in (init, from_workdir):
    encoder = _flat(encoder_for_classifier(loaded.encoder_params, expected, "test"))
    reference = {k: v for k, v in _flat(params).items() if "encoder_norm" not in k}
    assert sorted(encoder) == sorted(reference)  # avg pool: the final norm is left out
    for name, value in reference.items():
      np.testing.assert_allclose(encoder[name], value, atol=1e-6, err_msg=name)
  config.model.variant = "Ti/16"
  with pytest.raises(ValueError, match="config.model"):
    other = build_classifier(config, len(CLASSES))
    shapes = jax.eval_shape(
        lambda k: flax.linen.unbox(other.init(k, jnp.zeros((1, 32, 32, 1))))["params"],
        jax.random.key(0))["encoder"]
    encoder_for_classifier(init.encoder_params, shapes, "config.init")


def test_init_from_a_checkpoint_with_learnt_position_embeddings_is_refused(tmp_path):
  from safetensors.numpy import load_file, save_file
  from export_fixtures import make_workdir
  from spcl_jax.finetune.initialization import load_init
  workdir, _ = make_workdir(tmp_path / "pretrain", "pico/16", 64)
  export_checkpoint(workdir, "timm", tmp_path / "vit.safetensors")
  state = load_file(str(tmp_path / "vit.safetensors"))
  assert load_init(str(tmp_path / "vit.safetensors"), image_size=32).kind == "timm"
  learnt = np.random.default_rng(0).normal(0, 0.02, state["pos_embed"].shape)
  save_file({**state, "pos_embed": learnt.astype(np.float32)}, str(tmp_path / "learnt.safetensors"))
  with pytest.raises(ValueError, match="learnt position embeddings"):
    load_init(str(tmp_path / "learnt.safetensors"), image_size=32)


@pytest.mark.slow
def test_fine_tuning_train_step_applies_drop_path():
  # Two step keys on one state: drop path draws other branches, so the gradients differ (the
  # loss barely does: the fresh head's logits are near zero). Without it they would agree.
  from spcl_jax import sharding, steps
  from spcl_jax.finetune.steps import build_finetuning
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 32, 32), np.uint8)
  labels = rng.integers(0, 2, (8, len(CLASSES))).astype(np.float32)
  config = small_config("avg", 32)
  config.batch_size = 8
  config.model.drop_path_rate = 0.5
  mesh = sharding.make_mesh(config)
  ft = build_finetuning(config, mesh, len(CLASSES), steps_per_epoch=1)
  x, y = steps.global_batch(images, mesh, config), steps.global_batch(labels, mesh, config)
  norms = [float(ft.train_step(ft.init_state(jax.random.key(0)), x, y,
                               jax.random.key(seed))[1]["grad_norm"]) for seed in (1, 2)]
  assert abs(norms[0] - norms[1]) > 1e-3 * norms[0]
