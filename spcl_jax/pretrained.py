"""A pre-trained encoder restored from a workdir: the model, its parameters and how it saw images.

Export and feature extraction (and later fine-tuning) need nothing but the workdir: the model's
shape and the preprocessing come from WORKDIR/config.json, the weights from the `params` item of
a checkpoint (restored alone, without optimizer state or the input pipeline).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax
import ml_collections
import numpy as np

from spcl_jax import checkpoint
from spcl_jax.models.vit import VisionTransformer, abstract_params, build_encoder
from spcl_jax.run_info import read_run_info
from spcl_jax.workdir_path import as_path, check_store_client


@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
  """Everything a consumer of pre-trained weights needs, read from one workdir."""

  workdir: pathlib.Path
  step: int
  info: dict[str, Any]       # WORKDIR/config.json (see `spcl_jax.run_info`)
  model: VisionTransformer
  params: dict[str, Any]     # the encoder's parameters (big_vision names), host numpy arrays

  @property
  def mean(self) -> float:
    return float(self.info["normalization"]["mean"])

  @property
  def std(self) -> float:
    return float(self.info["normalization"]["std"])

  @property
  def image_size(self) -> int:
    return int(self.info["preprocessing"]["image_size"])

  @property
  def resize_filter(self) -> str:
    return str(self.info["preprocessing"]["resize_filter"])


def model_from_run_info(info: dict[str, Any], dtype: str = "float32") -> VisionTransformer:
  """The encoder module that config.json describes, computing in `dtype`."""
  model = info["model"]
  model_config = ml_collections.ConfigDict(dict(
      variant=model["variant"], image_size=model["image_size"], channels=model["channels"],
      dtype=dtype, attention_impl="auto", remat="none"))
  return build_encoder(model_config)


def load_pretrained(workdir: str | pathlib.Path, step: int | None = None,
                    dtype: str = "float32") -> PretrainedEncoder:
  """Restores the encoder of checkpoint `step` (None: the latest) of a pre-training workdir.

  Errors name the workdir, the file or the parameter that is wrong.
  """
  workdir = as_path(workdir)
  check_store_client(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"--workdir {str(workdir)!r} does not exist or is not a directory")
  info = read_run_info(workdir)
  model = model_from_run_info(info, dtype)
  params, step = checkpoint.restore_params(workdir, step)
  if "encoder" not in params:
    raise KeyError(f"checkpoint step {step} in {str(checkpoint.checkpoint_dir(workdir))!r}: "
                   f"the params item has {sorted(params)}, no 'encoder'")
  encoder = params["encoder"]
  check_params_fit_model(model, encoder, f"checkpoint step {step} of {str(workdir)!r}")
  return PretrainedEncoder(workdir=workdir, step=step, info=info, model=model, params=encoder)


def check_params_fit_model(model: VisionTransformer, params: Any, where: str) -> None:
  """Fails naming the first parameter whose name or shape differs from what the model expects.

  A checkpoint from another variant (or an edited config.json) would otherwise fail deep inside
  apply, or worse, in PyTorch after export.
  """
  expected = flax.traverse_util.flatten_dict(abstract_params(model), sep="/")
  actual = flax.traverse_util.flatten_dict(params, sep="/")
  for name in sorted(expected.keys() | actual.keys()):
    if name not in actual:
      raise ValueError(f"{where}: parameter {name!r} is missing (config.json says "
                       f"{model.width=}, {model.depth=}, {model.channels=})")
    if name not in expected:
      raise ValueError(f"{where}: unexpected parameter {name!r} for the model in config.json")
    if tuple(np.shape(actual[name])) != tuple(expected[name].shape):
      raise ValueError(f"{where}: parameter {name!r} has shape {np.shape(actual[name])}, the "
                       f"model in config.json expects {expected[name].shape}")

