"""A fine-tuned model, ready to score images: from a fine-tuning workdir or a timm export.

  workdir   F/config.json (the run's config, classes, how its prepared folder stored images)
            and F/best (the best-on-val parameters, the ones results.json scores on test);
            classification or segmentation, at the run's compute dtype.
  export    OUT.safetensors + OUT.json from `python -m spcl_jax.export --workdir F`
            (classification only; float32).
`Scorer` holds the jitted eval step of fine-tuning (`finetune.steps`: the same normalisation,
model and task outputs) on a mesh of every local device, and the eval transform of fine-tuning
(`finetune.data.EvalTransform`), so a file scores exactly as a record of the run's eval split.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from spcl_jax import checkpoint, run_info, sharding, steps
from spcl_jax.configs.finetune import common
from spcl_jax.data.datasets.records import EncodeSettings
from spcl_jax.finetune import data
from spcl_jax.finetune.steps import build_finetuning
from spcl_jax.workdir_path import as_path


@dataclasses.dataclass
class LoadedModel:
  config: ml_collections.ConfigDict  # the fine-tuning config (model, data transform, task)
  params: Any                        # host numpy arrays
  classes: list[str]
  protocol: str                      # classification | mgca | upernet512
  stored: EncodeSettings             # how the run's prepared folder stored its images
  source: str                        # what was loaded, for messages and output files


def _stored_settings(block: dict[str, Any], config: ml_collections.ConfigDict, where: str
                     ) -> EncodeSettings:
  stored = block.get("stored_images")
  if stored is None:  # a run from before config.json recorded it: its prepared folder knows
    report = pathlib.Path(str(config.data.prepared)).expanduser() / "report.json"
    if not report.is_file():
      raise ValueError(f"{where} does not say how its training images were stored, and its "
                       f"prepared folder {str(report.parent)!r} is not here to tell")
    stored = json.loads(report.read_text())["settings"]
  fields = {f.name for f in dataclasses.fields(EncodeSettings)}
  return EncodeSettings(**{k: v for k, v in stored.items() if k in fields})


def load_workdir(workdir: str | pathlib.Path, step: int | None = None) -> LoadedModel:
  """The best-on-val parameters of a fine-tuning workdir (or training checkpoint `step`)."""
  workdir = as_path(workdir)
  info = run_info.read_run_info(workdir)
  block = info.get("classifier") or info.get("segmenter")
  if block is None:
    raise ValueError(f"{str(workdir)!r} is a pre-training workdir, not a fine-tuning one (its "
                     "config.json has no classifier): fine-tune it first")
  config = ml_collections.ConfigDict(info["config"])
  if step is None:
    best = checkpoint.available_steps(workdir / "best")
    if not best:
      raise FileNotFoundError(f"{str(workdir / 'best')!r} holds no best-on-val parameters: no "
                              "epoch of this run has finished")
    params, step = checkpoint.restore_params(workdir / "best", best[-1])
  else:
    params, step = checkpoint.restore_params(workdir, step)
  return LoadedModel(config, params, list(block["classes"]),
                     block.get("protocol", "classification"),
                     _stored_settings(block, config, f"{str(workdir)!r}"),
                     f"{workdir} step {step}")


def load_export(path: str | pathlib.Path) -> LoadedModel:
  """A classifier exported to timm (OUT.safetensors + its OUT.json sidecar)."""
  from spcl_jax.weights import importing  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  sidecar = path.with_suffix(".json")
  if not sidecar.is_file():
    raise FileNotFoundError(f"{str(sidecar)!r} not found: predict reads the classes and the "
                            f"preprocessing from the .json that export writes beside {path.name}")
  description = json.loads(sidecar.read_text())
  transform = description.get("eval_transform")
  if transform is None or "classes" not in description:
    raise ValueError(f"{str(sidecar)!r} is not a fine-tuned classifier's export (no classes "
                     "or eval_transform); export the fine-tuning workdir again")
  encoder, info = importing.import_encoder(path, in_chans=1)
  pool = "avg" if description["timm_kwargs"].get("global_pool") == "avg" else "cls"
  extras = info["extras"]
  if pool == "avg":
    encoder["Transformer"].pop("encoder_norm", None)  # timm's Identity norm: not in our model
  params = {"encoder": encoder, "head": extras["head"]}
  if pool == "avg":
    params["fc_norm"] = extras["fc_norm"]
  config = common.get_config("custom", "")
  config.model.variant = info["model"]["variant"] or description["source"]["variant"]
  config.model.image_size = int(description["image_size"])
  config.model.dtype = "float32"
  config.model.pool = pool
  config.data.mean, config.data.std = float(description["mean"][0]), float(description["std"][0])
  config.data.resize_filter = transform["resize_filter"]
  config.data.eval_crop_fraction = float(transform["crop_fraction"])
  config.task = description["source"]["task"]
  return LoadedModel(config, params, list(description["classes"]), "classification",
                     _stored_settings(transform, config, f"{str(sidecar)!r}"), str(path))


class Scorer:
  """Fine-tuning's eval step and eval transform for one loaded model, on every local device."""

  def __init__(self, loaded: LoadedModel, batch_per_device: int = 16):
    config = loaded.config
    # Data-parallel over every device: at inference the parameters fit on each one.
    config.sharding.data, config.sharding.fsdp = -1, 1
    self.loaded, self.config = loaded, config
    self.mesh = sharding.make_mesh(config)
    self.batch_size = batch_per_device * sharding.num_batch_shards(config, self.mesh)
    config.batch_size = self.batch_size
    self.ft = build_finetuning(config, self.mesh, len(loaded.classes), steps_per_epoch=1)
    abstract = self.ft.abstract_state.params
    self.params = jax.tree.map(lambda a, x: jax.device_put(np.asarray(x, a.dtype), a.sharding),
                               abstract, loaded.params)
    self.transform = data.EvalTransform(config, loaded.stored.image_size)

  @property
  def image_size(self) -> int:
    return int(self.config.model.image_size)

  def model_input(self, name: str, encoded: bytes) -> np.ndarray:
    """Stored-image bytes -> the uint8 (S, S) input, exactly as fine-tuning's eval makes it."""
    record = {"name": name, "encoded": encoded, "label": np.zeros(0, np.float32), "valid": True}
    return self.transform.map(record)["image"]

  def outputs(self, images: np.ndarray) -> np.ndarray:
    """uint8 (n, S, S), n <= batch_size -> the task's eval outputs (logits; mask probabilities)."""
    n = len(images)
    padded = np.concatenate([images, np.repeat(images[-1:], self.batch_size - n, axis=0)])
    batch = steps.global_batch(padded, self.mesh, self.config)
    return np.asarray(jax.device_get(self.ft.eval_step(self.params, batch)), np.float32)[:n]
