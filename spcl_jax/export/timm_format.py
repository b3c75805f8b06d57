"""timm format: a safetensors state dict plus a JSON file beside it describing the model.

  OUT.safetensors   timm `VisionTransformer` weights (keys in `layout.py`), float32
  OUT.json          {"timm_kwargs": constructor arguments, "image_size", "in_chans",
                     "mean"/"std" per channel, "preprocessing", "source": workdir and step}

Rebuilding the model in PyTorch takes two lines (docs/export.md):

  model = VisionTransformer(**json.load(open("OUT.json"))["timm_kwargs"])
  model.load_state_dict(safetensors.torch.load_file("OUT.safetensors"))

Writing needs only `safetensors` with numpy, not torch.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

import spcl_jax
from spcl_jax.atomic_file import write_atomically
from spcl_jax.export.layout import timm_kwargs, timm_state_dict
from spcl_jax.pretrained import PretrainedEncoder
from spcl_jax.workdir_path import as_path


def sidecar_path(out: str | os.PathLike[str]) -> pathlib.Path:
  return pathlib.Path(out).with_suffix(".json")


def describe_export(pretrained: PretrainedEncoder, export_format: str, in_chans: int
                    ) -> dict[str, Any]:
  """What a PyTorch user needs besides the weights: the constructor and the preprocessing."""
  return {
      "format": export_format,
      "timm_class": "timm.models.vision_transformer.VisionTransformer",
      "timm_kwargs": timm_kwargs(pretrained.info["model"], in_chans),
      "image_size": pretrained.image_size,
      "in_chans": in_chans,
      # Per channel, as torchvision's Normalize and timm's data config take them. With
      # in_chans 3, feed the grayscale image copied to all three channels.
      "mean": [pretrained.mean] * in_chans,
      "std": [pretrained.std] * in_chans,
      "preprocessing": pretrained.info["preprocessing"],
      "features": "forward_features(x)[:, 0]: the pre-trained CLS embedding, after the final "
                  "norm (no projection head)",
      "source": {
          "workdir": str(as_path(pretrained.workdir)), "step": pretrained.step,
          "variant": pretrained.info["model"]["variant"],
          "spcl_jax_version": spcl_jax.__version__,
      },
  }


def write_timm(pretrained: PretrainedEncoder, out: str | os.PathLike[str], in_chans: int
               ) -> list[pathlib.Path]:
  """Writes OUT.safetensors and OUT.json; returns both paths."""
  try:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the timm format needs safetensors: pip install -e '.[torch]'") from e

  out = pathlib.Path(out)
  state = timm_state_dict(pretrained.params, pretrained.model.grid_size, in_chans)
  description = describe_export(pretrained, "timm", in_chans)
  # The header metadata is informational (string values only); the JSON is the source of truth.
  metadata = {"format": "pt", "spcl_jax": json.dumps(description["source"])}
  write_atomically(out, lambda tmp: save_file(state, tmp, metadata=metadata))
  sidecar = sidecar_path(out)
  write_atomically(sidecar, lambda tmp: tmp.write_text(
      json.dumps(description, indent=2, sort_keys=True) + "\n"))
  return [out, sidecar]


def read_timm_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """The exported state dict as numpy arrays (for checks without torch)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(path))
