"""big_vision-style `.npz`: our parameter tree flattened with '/', plus `pos_embedding`.

The parameter names are big_vision's already, so this is nearly an identity map, and timm's own
big_vision reader (`VisionTransformer.load_pretrained(path)`) checks it independently.

`pos_embedding` is (1, N, D) with no CLS row, as big_vision stores it. timm must then build the
model with `no_embed_class=True`: otherwise it expects a CLS row, tries to resample the table with
one prefix token, and fails on a 1023-token grid (docs/method.md §8). With `no_embed_class=True`
timm adds the table to the patch tokens only, which is exactly what pre-training does.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import flax
import numpy as np

from spcl_jax.atomic_file import write_atomically
from spcl_jax.weights.layout import spread_over_channels
from spcl_jax.models.vit import sincos_2d_posemb

POS_EMBEDDING = "pos_embedding"
EMBEDDING_KERNEL = "embedding/kernel"


def big_vision_arrays(params: dict[str, Any], grid_size: int, in_chans: int
                      ) -> dict[str, np.ndarray]:
  """Flat '/'-joined float32 arrays, the patch kernel spread over `in_chans` channels."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
  # timm's npz loader copies a 1-channel kernel unchanged into every channel of a 3-channel
  # model (3x the activations, no error; timm 1.0.31): spread it ourselves instead.
  flat[EMBEDDING_KERNEL] = spread_over_channels(flat[EMBEDDING_KERNEL], in_chans)
  width = flat[EMBEDDING_KERNEL].shape[-1]
  flat[POS_EMBEDDING] = sincos_2d_posemb(grid_size, width)[None]
  return flat


def params_from_big_vision(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  """The inverse of `big_vision_arrays` (for in_chans equal to the trained channels).

  Drops `pos_embedding`: in this project positions are a fixed table, not a parameter.
  """
  flat = {k: np.asarray(v) for k, v in arrays.items() if k != POS_EMBEDDING}
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def write_npz(arrays: dict[str, np.ndarray], out: str | os.PathLike[str]) -> pathlib.Path:
  """Writes exactly `out` (np.savez on a path would append '.npz' to other names)."""
  def write(tmp: pathlib.Path) -> None:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  # atomic: an interrupted export never leaves a truncated file (or a stray .tmp) behind
  return write_atomically(out, write)


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}
