"""WORKDIR/config.json: what a run was, so export and extraction need nothing but the workdir.

It records the resolved config, the model's shape, the image preprocessing and normalisation, and
the checkpoint layout version. A restart in the same workdir must describe the same model: a
changed architecture or preprocessing would silently mis-load the checkpoint, so it is refused.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import ml_collections

import spcl_jax
from spcl_jax.checkpoint import LAYOUT_VERSION
from spcl_jax.models.vit import variant_dims

FILENAME = "config.json"


def describe_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  model = dict(variant=config.model.variant, image_size=config.model.image_size,
               channels=config.model.channels, **variant_dims(config.model.variant))
  return {
      "layout_version": LAYOUT_VERSION,
      "spcl_jax_version": spcl_jax.__version__,
      "model": model,
      "preprocessing": {
          "image_size": config.model.image_size,
          "grayscale": True,
          "resize": "direct (no crop)",
          "resize_filter": config.data.resize_filter,
          "intensity": "decoded to [0, 1], stored as uint8; x = (u8 / 255 - mean) / std",
      },
      "normalization": {"mean": config.data.mean, "std": config.data.std},
      "config": json.loads(config.to_json_best_effort()),
  }


def read_run_info(workdir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(workdir).expanduser() / FILENAME
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} not found: is {str(workdir)!r} an spcl-jax workdir?")
  info = json.loads(path.read_text())
  if info.get("layout_version") != LAYOUT_VERSION:
    raise ValueError(f"{str(path)!r}: layout_version {info.get('layout_version')} is not "
                     f"{LAYOUT_VERSION}, the one this code reads")
  return info


def write_run_info(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, after checking a previous one (a resume) describes the same model."""
  path = pathlib.Path(workdir).expanduser() / FILENAME
  new = describe_run(config)
  if path.is_file():
    old = read_run_info(workdir)
    for key in ("model", "preprocessing", "normalization"):
      if old[key] != new[key]:
        raise ValueError(
            f"{str(path)!r}: this workdir was started with {key} {old[key]}, the config now "
            f"gives {new[key]}; resume with the original settings or use a new --workdir")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)
