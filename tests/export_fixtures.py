"""Pre-training workdirs for the export and extraction tests, built without the trainer.

A workdir is config.json (`write_run_info`) plus one orbax checkpoint whose `params` item holds
random encoder weights. Biases, LayerNorm scales and CLS are perturbed away from their init
values (zeros / ones), so a swapped key, a dropped bias or a transposed kernel changes the
features and cannot hide behind an all-zero parameter. The images are the bundled real CXRs.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from configs.default import get_config
from spcl_jax import checkpoint
from spcl_jax.data.decode import decode_image
from spcl_jax.data.sources import SAMPLE_DIR, FolderSource
from spcl_jax.models.vit import build_encoder, encode_images
from spcl_jax.pretrained import normalize_uint8
from spcl_jax.run_info import write_run_info

# Parity is checked in float32 on CPU on both sides; accelerator defaults round matmuls.
TOLERANCE = 1e-4


def make_config(variant: str, image_size: int):
  config = get_config()
  config.model.variant = variant
  config.model.image_size = image_size
  config.model.dtype = "float32"
  return config


def random_encoder_params(config, seed: int = 0) -> dict[str, Any]:
  model = build_encoder(config.model)
  n = model.num_patches
  variables = model.init(jax.random.key(seed), jnp.zeros((1, n, model.patch_size ** 2)),
                         jnp.zeros((1, n), jnp.int32))
  params = flax.core.meta.unbox(variables["params"])
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  rng = np.random.default_rng(seed)
  out = {}
  for name, value in flat.items():
    value = np.asarray(value, np.float32)
    if name.endswith("bias") or name == "cls":
      value = value + rng.normal(0.0, 0.1, value.shape).astype(np.float32)
    elif name.endswith("scale"):
      value = value * rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    out[name] = value
  return flax.traverse_util.unflatten_dict(out, sep="/")


def make_workdir(path: pathlib.Path, variant: str, image_size: int, *, step: int = 7,
                 seed: int = 0) -> tuple[pathlib.Path, dict[str, Any]]:
  """Writes a workdir with one checkpoint at `step`; returns it and the encoder params."""
  config = make_config(variant, image_size)
  write_run_info(path, config)
  params = random_encoder_params(config, seed)
  manager = checkpoint.make_manager(path)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(
      {"encoder": params, "log_scale": jnp.float32(2.0)})))
  manager.wait_until_finished()
  manager.close()
  return path, params


def sample_images(image_size: int, count: int, resize_filter: str = "bilinear"
                  ) -> tuple[list[str], np.ndarray]:
  """The first `count` bundled CXRs, decoded as pre-training decodes them: names, uint8."""
  source = FolderSource(SAMPLE_DIR)
  records = [source[i] for i in range(count)]
  images = np.stack([decode_image(r, image_size, resize_filter) for r in records])
  return [r["name"] for r in records], images


def jax_cls_features(variant: str, image_size: int, params: dict[str, Any],
                     images_u8: np.ndarray, channels: int = 1) -> np.ndarray:
  """The reference: the JAX encoder's CLS output on whole normalised images, float32."""
  config = make_config(variant, image_size)
  config.model.channels = channels
  model = build_encoder(config.model)
  x = normalize_uint8(jnp.asarray(images_u8), config.data.mean, config.data.std)
  with jax.default_matmul_precision("highest"):
    tokens = encode_images(model, params, x)
  return np.asarray(tokens[:, 0])


def torch_input(images_u8: np.ndarray, in_chans: int, mean: float, std: float):
  """(B, S, S) uint8 -> torch (B, in_chans, S, S) float32, the grayscale copied to channels."""
  import torch  # pylint: disable=g-import-not-at-top
  x = (images_u8.astype(np.float32) / np.float32(255.0) - np.float32(mean)) / np.float32(std)
  x = np.repeat(x[:, None], in_chans, axis=1)
  return torch.from_numpy(np.ascontiguousarray(x, np.float32))


def max_abs_diff(a: Any, b: Any) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
