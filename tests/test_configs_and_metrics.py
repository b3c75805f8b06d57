"""Every shipped config validates; the analytic FLOPs agree with XLA's own count."""

import importlib
import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from spcl_jax.configs import default
from spcl_jax import metrics
from spcl_jax.configuration import resolve_batch_size, validate_config
from spcl_jax.masking import view_size
from spcl_jax.models.vit import build_encoder


@pytest.mark.parametrize("name", ["default", "demo", "vits512", "vitb512", "vitl512"])
def test_shipped_configs_validate(name):
  config = resolve_batch_size(importlib.import_module(f"configs.{name}").get_config(), 8)
  validate_config(config, num_batch_shards=8, process_count=1)
  json.loads(config.to_json_best_effort())


def test_paper_config_is_the_paper():
  config = importlib.import_module("configs.vitb512").get_config()
  assert (config.model.variant, config.model.image_size, config.spcl.mask_ratio) == (
      "B/16", 512, 0.6)
  assert view_size((512 // 16) ** 2, config.spcl.mask_ratio) == 204
  # 600 per GPU x accumulation 2, every negative kept: 1200 per device and step.
  assert (config.batch_size_per_device, config.grad_accum_steps, config.accumulation) == (
      1200, 2, "cached")
  assert resolve_batch_size(config, 8).batch_size == 9600


@pytest.mark.slow
def test_analytic_flops_match_xla_cost_analysis():
  config = default.get_config()
  config.model.variant = "Ti/16"
  config.model.image_size = 128
  config.model.dtype = "float32"
  model = build_encoder(config.model)
  h = view_size(64, config.spcl.mask_ratio)
  patches = jnp.zeros((1, h, 256))
  positions = jnp.zeros((1, h), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), patches, positions))
  compiled = jax.jit(model.apply).lower(params, patches, positions).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  xla_forward = analysis["flops"]
  ours_forward = metrics.view_forward_flops(config)
  assert metrics.train_flops_per_image(config) == 6 * ours_forward  # (fwd + bwd) x 2 views
  # XLA also counts LayerNorm, softmax, GELU and adds: a few percent on top of the matmuls.
  assert 0.9 * xla_forward <= ours_forward <= 1.02 * xla_forward

  # A whole image (all 64 patches) through the same encoder: what fine-tuning's config.json records.
  patches = jnp.zeros((1, 64, 256))
  positions = jnp.arange(64, dtype=jnp.int32)[None]
  analysis = jax.jit(model.apply).lower(params, patches, positions).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  ours_image = metrics.image_forward_flops(config)
  assert 0.9 * analysis["flops"] <= ours_image <= 1.02 * analysis["flops"]


def test_config_json_records_the_flops_of_its_kind_of_run():
  pretraining = default.get_config()
  assert metrics.flops_record(pretraining) == {
      "image_forward": metrics.image_forward_flops(pretraining),
      "train_per_image": metrics.train_flops_per_image(pretraining),
      "view_forward": metrics.view_forward_flops(pretraining)}
  finetuning = importlib.import_module("configs.finetune.nih14").get_config()
  assert set(metrics.flops_record(finetuning)) == {"image_forward"}
  # ViT-B/16 at 224: 196 patches + CLS, 12 blocks of width 768.
  assert metrics.flops_record(finetuning)["image_forward"] == pytest.approx(34.97e9, rel=1e-3)


def test_peak_table_and_override():
  config = default.get_config()

  class FakeDevice:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert metrics.peak_flops_per_device(config, FakeDevice()) == 989e12
  FakeDevice.device_kind = "cpu"
  assert metrics.peak_flops_per_device(config, FakeDevice()) is None
  config.peak_flops_per_device = 1e12
  assert metrics.peak_flops_per_device(config, FakeDevice()) == 1e12


def test_metrics_file_is_valid_json_lines_with_nulls_for_missing_numbers(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, total_steps=10)
  writer.write(1, {"loss": 1.5, "mfu": None, "images_per_sec": float("nan")})
  writer.close()
  (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(line) == {"step": 1, "loss": 1.5, "mfu": None, "images_per_sec": None}
  assert np.isclose(metrics.encoder_forward_flops(10, 8, 1, 32),
                    2 * 10 * 8 * 24 + 4 * 100 * 8 + 2 * 10 * 8 * 8 + 4 * 10 * 8 * 32)
