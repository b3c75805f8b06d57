"""The PyTorch reference step (spcl_jax/bench/torch_reference.py) against our train step.

CPU, float32, pico/16 at 64x64, batch 8 on the 8 virtual devices. Both frameworks get the same
weights (copied through the timm export) and the same view positions (drawn once by our
masking from the step key our train step uses), so loss, gradient norm and the AdamW update
must agree to float32 round-off: a cross-framework check of the objective and the optimiser.
"""

import copy
import json
import pathlib

import jax
import numpy as np
import pytest
import torch  # the suite needs the torch extra (pip install -e '.[test,torch]'): never skip

from spcl_jax import losses, optimizer, sharding, steps
from spcl_jax.bench import torch_reference
from spcl_jax.configs import demo
from spcl_jax.export.layout import timm_state_dict

BATCH, SIZE = 8, 64


def _config():
  config = demo.get_config()
  config.model.image_size = SIZE   # 4 x 4 = 16 patches, 6 visible, 3 per view
  config.batch_size = BATCH
  config.optim.warmup_fraction = 0.0  # a non-zero learning rate at step 0: the update shows
  config.optim.grad_clip_norm = 0.0
  return config


@pytest.fixture(scope="module")
def one_step():
  """Our jitted train step once, from a fixed key, and what it started from."""
  config = _config()
  mesh = sharding.make_mesh(config)
  training = steps.build_training(config, mesh)
  state = training.init_state(jax.random.key(0))
  start = jax.device_get(state.params)
  images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE), dtype=np.uint8)
  key = jax.random.key(3)
  # The positions the step draws from `key` (masking is a pure function of key and example).
  positions = np.asarray(steps.view_positions(key, BATCH, training.model, config, None))
  state, metrics = training.train_step(state, steps.global_batch(images, mesh, config), key)
  return dict(config=config, start=start, images=images, positions=positions,
              metrics=jax.device_get(metrics), after=jax.device_get(state.params))


def _torch_loss(case, config=None, positions=None):
  reference = torch_reference.TorchStep(config or case["config"], params=case["start"])
  positions = case["positions"] if positions is None else positions
  loss = reference.loss_and_gradients(torch.from_numpy(case["images"]),
                                      torch.from_numpy(np.array(positions, np.int64)))
  return reference, float(loss)


def _as_timm_layout(encoder):
  """The torch encoder's weights under timm's names (its Linear patch embedding as the conv)."""
  state = {k: v.detach().numpy() for k, v in encoder.state_dict().items()}
  linear = state.pop("patch_embed.weight")                          # (D, P*P*C), (py, px, c)
  p, c = encoder.patch_size, encoder.channels
  state["patch_embed.proj.weight"] = linear.reshape(-1, p, p, c).transpose(0, 3, 1, 2)
  state["patch_embed.proj.bias"] = state.pop("patch_embed.bias")
  return state


@pytest.mark.slow
def test_loss_and_gradient_norm_equal_our_train_step(one_step):
  reference, loss = _torch_loss(one_step)
  ours = one_step["metrics"]
  np.testing.assert_allclose(loss, ours["loss"], rtol=1e-5)
  # Our step logs optax.tree.norm over every gradient, log-scale included: so does this one.
  np.testing.assert_allclose(torch_reference.gradient_norm(reference.parameters()),
                             ours["grad_norm"], rtol=1e-5)
  assert reference.log_scale.grad is not None and float(reference.log_scale.grad) != 0.0


@pytest.mark.slow
def test_adamw_update_equals_ours(one_step):
  reference, _ = _torch_loss(one_step)
  lr = float(optimizer.learning_rate_schedule(one_step["config"])(0))
  reference.apply_gradients(lr)
  ours = timm_state_dict(one_step["after"]["encoder"], reference.encoder.grid_size, 1)
  theirs = _as_timm_layout(reference.encoder)
  width = reference.encoder.cls_token.shape[-1]
  before = timm_state_dict(one_step["start"]["encoder"], reference.encoder.grid_size, 1)
  moved = False
  for name, value in theirs.items():
    expected = ours[name]
    if name.endswith("attn.qkv.bias"):
      # The key bias adds the same number to every logit of a query: its exact gradient is 0,
      # so Adam's first step, about lr x sign(g), moves it by the sign of round-off. Skip it.
      value, expected = np.delete(value, np.s_[width:2 * width]), np.delete(
          expected, np.s_[width:2 * width])
    # Adam's first step is about lr x sign(g): tolerance a small fraction of the step.
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-2 * lr, err_msg=name)
    moved |= not np.allclose(value, before[name][:value.size].reshape(value.shape)
                             if name.endswith("attn.qkv.bias") else before[name])
  assert moved
  np.testing.assert_allclose(float(reference.log_scale.detach()),
                             one_step["after"]["log_scale"], rtol=1e-6)


@pytest.mark.slow
def test_the_comparison_sees_a_wrong_positive_or_kappa(one_step):
  ours = float(one_step["metrics"]["loss"])
  # View 2 of image i paired with view 1 of image i + 1: the positives are wrong.
  shifted = one_step["positions"].copy()
  shifted[1] = np.roll(shifted[1], 1, axis=0)
  _, wrong_pairs = _torch_loss(one_step, positions=shifted)
  config = copy.deepcopy(one_step["config"])
  config.spcl.kappa *= 2
  _, wrong_kappa = _torch_loss(one_step, config=config)
  config.spcl.kappa, config.spcl.similarity = one_step["config"].spcl.kappa, "cosine"
  _, wrong_similarity = _torch_loss(one_step, config=config)
  for mutant in (wrong_pairs, wrong_kappa, wrong_similarity):
    assert abs(mutant - ours) > 1e-3 * abs(ours)


@pytest.mark.slow
def test_cross_negatives_and_cosine_equal_our_loss(one_step):
  """The other objectives of the table (OCL's cross negatives, plain cosine) agree too."""
  rng = np.random.default_rng(1)
  z1, z2 = rng.normal(size=(2, 6, 16)).astype(np.float32)
  for name, negatives in (("tsp", "cross"), ("cosine", "all"), ("cosine", "cross")):
    ours = losses.spcl_loss(z1, z2, np.float32(2.0), negatives=negatives,
                            similarity=losses.make_similarity(name, {"kappa": 0.1}))
    theirs = torch_reference.spcl_loss(
        torch.from_numpy(np.concatenate([z1, z2])), torch.tensor(2.0), similarity_name=name,
        kappa=0.1, negatives=negatives)
    np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5, err_msg=name + negatives)


def test_log_scale_gradient_at_the_cap_equals_ours():
  """At log_s = log max_scale exactly (where the parameter clamp leaves it) both split the
  gradient of min(log_s, cap) at the tie; below the cap it is the whole gradient."""
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(2, 4, 8)).astype(np.float32)
  similarity = losses.make_similarity("tsp", {"kappa": 1 / 64})
  for log_scale in (np.log(np.float32(10.0)), np.log(np.float32(100.0))):
    ours = jax.grad(lambda s: losses.spcl_loss(z1, z2, s, similarity=similarity))(log_scale)
    theirs = torch.tensor(float(log_scale), requires_grad=True)
    torch_reference.spcl_loss(torch.from_numpy(np.concatenate([z1, z2])), theirs).backward()
    np.testing.assert_allclose(float(theirs.grad), float(ours), rtol=1e-5)


def test_random_views_are_disjoint_and_the_right_size():
  positions = torch_reference.random_view_positions(5, 16, 3, torch.device("cpu"))
  assert positions.shape == (2, 5, 3)
  for image in range(5):
    both = positions[:, image].reshape(-1).tolist()
    assert len(set(both)) == 6 and all(0 <= i < 16 for i in both)


@pytest.mark.slow
def test_bench_train_prints_one_json_line_per_variant(capsys, monkeypatch, tmp_path):
  """`bench train --reference torch` on CPU: ours, torch eager, torch.compile, each one line.

  torch.compile runs with the aot_eager backend here (traced and compiled by dynamo and
  AOTAutograd, no generated C++: inductor's cold compile would take half a minute on 2 cores).
  """
  from spcl_jax.bench import train as bench_train  # pylint: disable=g-import-not-at-top
  demo_file = pathlib.Path(demo.__file__).resolve()  # whatever the working directory
  args = [f"--config={demo_file}", f"--config.model.image_size={SIZE}",
          "--steps=1", "--warmup_steps=0", "--memory_k=", "--memory_gb=0", "--reference=torch",
          "--torch_compile_backend=aot_eager", f"--profile_dir={tmp_path / 'profile'}",
          "--profile_steps=1"]
  # ml_collections finds the --config.x overrides in sys.argv, as a real command line has them.
  monkeypatch.setattr("sys.argv", ["python -m spcl_jax.bench", "train", *args])
  assert bench_train.main(args) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
           if line.startswith("{")]
  assert [r["variant"] for r in lines] == ["jax", "torch-eager", "torch-compile"]
  # --profile_dir traced our step; bench profile reads it (on CPU: the host's operations)
  from spcl_jax.bench import profile  # pylint: disable=g-import-not-at-top
  assert profile.main([str(tmp_path / "profile"), "--steps=1"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["variant"] == "profile" and summary["busy_ms_per_step"] > 0
  assert summary["where"] == "/host:CPU" and summary["top"]
  jax_line, eager, compiled = lines
  assert jax_line["batch"] == 16 and jax_line["devices"] == 8  # the demo's batch, 8 CPU devices
  assert eager["batch"] == compiled["batch"] == 16  # one host: torch runs the whole batch
  assert eager["compile"] is None and compiled["compile"] == "aot_eager/default"
  for record in lines:
    assert record["images_per_s"] > 0 and np.isfinite(record["loss"])
    assert record["step_ms"] > 0 and record["dtype"] == "float32"
  for record in (eager, compiled):
    assert record["attention"] == "sdpa"
    np.testing.assert_allclose(record["jax_over_torch"],
                               jax_line["images_per_s"] / record["images_per_s"], rtol=1e-3)
