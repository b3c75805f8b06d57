"""A fine-tuned classifier (python -m spcl_jax.finetune) exported to timm, head included.

  OUT.safetensors  timm `VisionTransformer(num_classes=K, ...)` weights:
                     the encoder as in `layout.py`, except that with pool 'avg' there is no
                     `norm` (timm makes it Identity when fc_norm is on) and `fc_norm` is the
                     classifier's; with pool 'cls' the encoder's `norm` is kept
                     head.weight (K, D) <- head/kernel (D, K) transposed, head.bias
  OUT.json         constructor arguments (global_pool 'avg' + fc_norm=True, or 'token'),
                   the class names in output order, the evaluation preprocessing, and the
                   source: workdir, step, and the val epoch it was selected at
By default the best-on-val parameters (WORKDIR/best) are exported, the ones results.json
scores on test; --step takes a training checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

import spcl_jax
from spcl_jax import checkpoint
from spcl_jax.weights.layout import timm_kwargs, timm_state_dict
from spcl_jax.workdir_path import as_path


@dataclasses.dataclass(frozen=True)
class FineTuned:
  workdir: pathlib.Path
  step: int
  selected: str            # 'best_val' (WORKDIR/best) or 'checkpoint'
  info: dict[str, Any]     # WORKDIR/config.json, with its "classifier" block
  params: dict[str, Any]   # {'encoder', ['fc_norm'], 'head'}, host numpy arrays

  @property
  def pool(self) -> str:
    return self.info["classifier"]["pool"]

  @property
  def classes(self) -> list[str]:
    return list(self.info["classifier"]["classes"])


def is_finetune_workdir(info: dict[str, Any]) -> bool:
  return "classifier" in info


def load_finetuned(workdir: str | pathlib.Path, info: dict[str, Any], step: int | None = None
                   ) -> FineTuned:
  """The best-on-val parameters (step None) or those of training checkpoint `step`."""
  workdir = as_path(workdir)  # a gs:// URL stays a URL
  if step is not None:
    params, step = checkpoint.restore_params(workdir, step)
    return FineTuned(workdir, step, "checkpoint", info, params)
  best_dir = workdir / "best"
  steps = checkpoint.available_steps(best_dir)
  if not steps:
    raise FileNotFoundError(f"{str(checkpoint.checkpoint_dir(best_dir))!r} holds no best-on-val "
                            "parameters: no epoch of this run has finished (or give --step)")
  params, step = checkpoint.restore_params(best_dir, steps[-1])
  return FineTuned(workdir, step, "best_val", info, params)


def classifier_state_dict(finetuned: FineTuned, in_chans: int) -> dict[str, np.ndarray]:
  params = finetuned.params
  grid = int(finetuned.info["model"]["image_size"]) // int(finetuned.info["model"]["patch_size"])
  encoder = params["encoder"]
  has_norm = "encoder_norm" in encoder["Transformer"]
  if has_norm != (finetuned.pool == "cls"):
    raise ValueError(f"{finetuned.workdir}: pool {finetuned.pool!r} but the encoder "
                     f"{'has' if has_norm else 'lacks'} its final norm")
  state = timm_state_dict(encoder, grid, in_chans)
  if finetuned.pool == "avg":
    state["fc_norm.weight"] = np.asarray(params["fc_norm"]["scale"], np.float32)
    state["fc_norm.bias"] = np.asarray(params["fc_norm"]["bias"], np.float32)
  state["head.weight"] = np.ascontiguousarray(np.asarray(params["head"]["kernel"]).T, np.float32)
  state["head.bias"] = np.asarray(params["head"]["bias"], np.float32)
  return state


def classifier_kwargs(finetuned: FineTuned, in_chans: int) -> dict[str, Any]:
  kwargs = timm_kwargs(finetuned.info["model"], in_chans)
  kwargs["num_classes"] = len(finetuned.classes)
  if finetuned.pool == "avg":
    kwargs.update(global_pool="avg", fc_norm=True)
  else:
    kwargs.update(global_pool="token", fc_norm=False)
  return kwargs


def describe_classifier(finetuned: FineTuned, in_chans: int) -> dict[str, Any]:
  info = finetuned.info
  config = info.get("config", {})
  mean, std = info["normalization"]["mean"], info["normalization"]["std"]
  image_size = int(info["model"]["image_size"])
  return {
      "format": "timm",
      "timm_class": "timm.models.vision_transformer.VisionTransformer",
      "timm_kwargs": classifier_kwargs(finetuned, in_chans),
      "classes": finetuned.classes,
      "pool": finetuned.pool,  # as resolved at fine-tuning (config.model.pool 'auto' -> cls/avg)
      "outputs": "logits, one per class in 'classes' order; sigmoid gives probabilities",
      "image_size": image_size,
      "in_chans": in_chans,
      "mean": [mean] * in_chans,
      "std": [std] * in_chans,
      "preprocessing": {
          "eval": f"grayscale, short side resized to {image_size} / "
                  f"{config.get('data', {}).get('eval_crop_fraction')} (bicubic, rounded down), "
                  f"centre crop {image_size}; x = (u8 / 255 - mean) / std",
      },
      # What `python -m spcl_jax.predict --model OUT.safetensors` replays: the prepared
      # folder's stored size and encoding, then the fine-tuning eval resize + centre crop.
      "eval_transform": {
          "resize_filter": config.get("data", {}).get("resize_filter"),
          "crop_fraction": config.get("data", {}).get("eval_crop_fraction"),
          "stored_images": info["classifier"].get("stored_images"),
      },
      "source": {"workdir": str(finetuned.workdir), "step": finetuned.step,
                 "selected": finetuned.selected, "task": info["classifier"]["task"],
                 "variant": info["model"]["variant"],
                 "spcl_jax_version": spcl_jax.__version__},
  }


def write_timm_classifier(finetuned: FineTuned, out: pathlib.Path, in_chans: int
                          ) -> list[pathlib.Path]:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = classifier_state_dict(finetuned, in_chans)
  description = describe_classifier(finetuned, in_chans)
  tmp = out.with_name(out.name + ".tmp")
  save_file(state, tmp, metadata={"format": "pt", "spcl_jax": json.dumps(description["source"])})
  tmp.replace(out)
  sidecar = out.with_suffix(".json")
  sidecar.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
  return [out, sidecar]
