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

from spcl_jax.configs.default import get_config
from spcl_jax import checkpoint
from spcl_jax.data.decode import decode_image
from spcl_jax.data.sources import SAMPLE_DIR, FolderSource
from spcl_jax.models.vit import abstract_params, build_encoder, encode_images
from spcl_jax.data.normalize import normalize_uint8
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
  """Random weights of the right shapes, drawn in numpy (model.init would compile the model).

  Kernels ~ N(0, 1/fan_in), so activations keep a realistic scale through the blocks; biases,
  CLS and LayerNorm scales are off their init values (see the module docstring).
  """
  shapes = flax.traverse_util.flatten_dict(abstract_params(build_encoder(config.model)), sep="/")
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in shapes.items():
    shape = shape.shape
    if name.endswith("kernel"):
      # query/key/value kernels are (D, heads, head_dim): their fan-in is D alone.
      is_qkv = any(f"/{n}/" in name for n in ("query", "key", "value"))
      fan_in = shape[0] if is_qkv else int(np.prod(shape[:-1]))
      value = rng.normal(0.0, fan_in ** -0.5, shape)
    elif name.endswith("scale"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # biases and cls
      value = rng.normal(0.0, 0.1, shape)
    params[name] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(params, sep="/")


def make_workdir(path: pathlib.Path, variant: str, image_size: int, *, step: int = 7,
                 seed: int = 0, normalization: tuple[float, float] | None = None
                 ) -> tuple[pathlib.Path, dict[str, Any]]:
  """Writes a workdir with one checkpoint at `step`; returns it and the encoder params.

  `normalization`: the (mean, std) its config.json records, if not the defaults.
  """
  config = make_config(variant, image_size)
  if normalization is not None:
    config.data.mean, config.data.std = normalization
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
