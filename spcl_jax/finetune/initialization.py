"""`config.init`: where the encoder's starting weights come from.

  random            the classifier's own initialisation (the from-scratch baseline)
  WORKDIR           an S-PCL pre-training workdir (its config.json + checkpoints); the step is
                    config.init_step, -1 for the latest
  FILE.safetensors  a timm ViT state dict          (kind 'timm')
  FILE.pth          a Medical MAE checkpoint       (kind 'medical_mae')
  FILE.npz          big_vision / our npz export    (kind 'big_vision')
Files are read by `spcl_jax.export.importing` (the export's mapping run backwards). With
`config.model.pool = 'avg'` the encoder's final norm is not part of the classifier (timm drops
it too, `fc_norm=True`); with 'cls' it is kept.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax
import numpy as np

from spcl_jax.workdir_path import as_path, is_url

FINETUNED_KINDS = ("classifier", "segmenter")  # config.json keys a fine-tuning run adds
FILE_KINDS = {".safetensors": "timm", ".pth": "medical_mae", ".pt": "medical_mae",
              ".npz": "big_vision"}


@dataclasses.dataclass(frozen=True)
class Init:
  kind: str                    # spcl | random | timm | medical_mae | big_vision
  path: str | None
  step: int | None
  encoder_params: Any | None   # host numpy arrays in our big_vision names, or None (random)
  normalization: tuple[float, float] | None  # (mean, std) the weights were trained with

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "path": self.path, "step": self.step}


def load_init(init: str, init_step: int = -1, image_size: int | None = None) -> Init:
  """Reads `config.init`; errors name the field and the path."""
  if init == "random":
    return Init("random", None, None, None, None)
  path = as_path(init)  # absolute; a gs:// pre-training workdir stays a URL
  if path.is_dir():
    _refuse_finetuning_workdir(init, path)
    from spcl_jax.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
    pretrained = load_pretrained(path, None if init_step < 0 else init_step)
    return Init("spcl", str(path), pretrained.step, pretrained.params,
                (pretrained.mean, pretrained.std))
  if path.suffix in FILE_KINDS and not is_url(path) and path.is_file():
    from spcl_jax.export import importing  # pylint: disable=g-import-not-at-top
    params, info = importing.import_encoder(path, in_chans=1, image_size=image_size)
    if not info["pos_embedding_is_sincos"]:
      # Our encoder adds the fixed 2-D sin-cos table; a learnt table has nowhere to go, and
      # dropping it would silently fine-tune a different model.
      raise ValueError(f"config.init={init!r}: the checkpoint has learnt position embeddings, "
                       "not the fixed sin-cos table this ViT uses; it cannot be loaded exactly")
    return Init(info["format"], str(path.resolve()), None, params, None)
  raise FileNotFoundError(
      f"config.init={init!r}: not 'random', a pre-training workdir, nor an existing "
      f"{'/'.join(sorted(FILE_KINDS))} checkpoint file")


def _refuse_finetuning_workdir(init: str, path: Any) -> None:
  """A fine-tuning workdir has checkpoints too, but of a classifier (its encoder nested)."""
  info_path = path / "config.json"
  if not info_path.is_file():
    return
  try:
    info = json.loads(info_path.read_text())
  except ValueError:
    return  # read_run_info names the damage below
  kind = next((k for k in FINETUNED_KINDS if k in info), None)
  if kind is not None:
    raise ValueError(f"config.init={init!r} is a fine-tuning workdir (its config.json has a "
                     f"{kind!r} entry), not a pre-training one: config.init takes 'random', a "
                     "pre-training workdir or a .safetensors/.pth/.npz weights file")


def encoder_for_classifier(encoder_params: Any, expected: Any, where: str) -> Any:
  """The pre-trained encoder params the classifier takes: final norm dropped if it has none.

  Every other name and shape must match `expected` (the classifier's encoder subtree); a
  mismatch (another variant, patch size or channel count) fails naming the parameter.
  """
  actual = flax.traverse_util.flatten_dict(encoder_params, sep="/")
  wanted = flax.traverse_util.flatten_dict(expected, sep="/")
  actual = {k: v for k, v in actual.items()
            if k in wanted or not k.startswith("Transformer/encoder_norm/")}
  for name in sorted(actual.keys() | wanted.keys()):
    if name not in actual:
      raise ValueError(f"{where}: parameter {name!r} is missing; does config.model.variant "
                       "match the pre-trained model?")
    if name not in wanted:
      raise ValueError(f"{where}: unexpected parameter {name!r} for config.model.variant")
    if tuple(np.shape(actual[name])) != tuple(wanted[name].shape):
      raise ValueError(f"{where}: parameter {name!r} has shape {np.shape(actual[name])}, "
                       f"config.model expects {tuple(wanted[name].shape)}")
  return flax.traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in actual.items()}, sep="/")
