"""What a run reports: WORKDIR/metrics.jsonl, TensorBoard event files, a progress line, and the
analytic FLOPs behind images/s -> TFLOP/s -> MFU.

TensorBoard files are written with tensorboardX (clu's writers would pull in TensorFlow).
Only process 0 writes; every process computes the same global values.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from spcl_jax.masking import view_size
from spcl_jax.models.vit import variant_dims
from spcl_jax.workdir_path import as_path, is_url, rewrite_text

# Dense bf16 peak FLOP/s per device, by a substring of jax's `device_kind` (lowercase), first
# match wins. Override with config.peak_flops_per_device for anything not listed.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989e12), ("h100", 989e12),  # also GH200 / GH100: the substring matches
    ("b200", 2250e12), ("a100", 312e12), ("l4", 121e12), ("a6000", 155e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def encoder_forward_flops(seq_len: int, width: int, depth: int, mlp_dim: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one sequence through the transformer blocks."""
  per_layer = (2 * seq_len * width * 3 * width      # q, k, v
               + 2 * seq_len * seq_len * width * 2  # q k^T and attention-weighted v
               + 2 * seq_len * width * width        # output projection
               + 2 * seq_len * width * mlp_dim * 2)  # MLP in and out
  return float(depth * per_layer)


def view_forward_flops(config: ml_collections.ConfigDict) -> float:
  """Forward of one view (its h visible patches + CLS) through the encoder, embedding included."""
  dims = variant_dims(config.model.variant)
  p, width = dims["patch_size"], dims["width"]
  num_patches = (config.model.image_size // p) ** 2
  h = view_size(num_patches, config.spcl.mask_ratio)
  embed = 2 * h * p * p * config.model.channels * width
  return embed + encoder_forward_flops(h + 1, width, dims["depth"], dims["mlp_dim"])


def train_flops_per_image(config: ml_collections.ConfigDict) -> float:
  """Forward + backward (3x forward) of both views of one image, patch embedding included."""
  return 3.0 * 2 * view_forward_flops(config)


def image_forward_flops(config: ml_collections.ConfigDict) -> float:
  """Forward of one whole image (all N patches + CLS) through the encoder, embedding included:
  what fine-tuning, evaluation and extraction cost per image before any head or decoder."""
  dims = variant_dims(config.model.variant)
  p, width = dims["patch_size"], dims["width"]
  num_patches = (config.model.image_size // p) ** 2
  embed = 2 * num_patches * p * p * config.model.channels * width
  return embed + encoder_forward_flops(num_patches + 1, width, dims["depth"], dims["mlp_dim"])


def flops_record(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The analytic FLOPs config.json records at the first start, so that readers (the report)
  get them without importing the model. Pre-training adds its two-view counts."""
  record = {"image_forward": image_forward_flops(config)}
  if "spcl" in config:
    record.update(train_per_image=train_flops_per_image(config),
                  view_forward=view_forward_flops(config))
  return record


def peak_flops_per_device(config: ml_collections.ConfigDict, device: jax.Device) -> float | None:
  if config.peak_flops_per_device > 0:
    return float(config.peak_flops_per_device)
  kind = device.device_kind.lower()
  for key, flops in PEAK_FLOPS:
    if key in kind:
      return flops
  return None  # e.g. CPUs: no honest peak number, so MFU is reported as null


def throughput(config: ml_collections.ConfigDict, images: float,
               seconds: float) -> dict[str, float | None]:
  """images/s, TFLOP/s (analytic training FLOPs) and MFU over every device of the job.

  The one place both the trainer's log and `bench train` compute these from; MFU is None where
  the device has no known peak (CPUs).
  """
  images_per_sec = images / seconds
  flops = images_per_sec * train_flops_per_image(config)
  peak = peak_flops_per_device(config, jax.devices()[0])
  mfu = flops / (peak * jax.device_count()) if peak else None
  return {"images_per_sec": images_per_sec, "tflops_per_sec": flops / 1e12, "mfu": mfu}


def _json_value(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def drop_rows_from(path: pathlib.Path, first_new_step: int) -> int:
  """Rewrites metrics.jsonl without the rows the (re)started run will write again.

  A run killed after its last checkpoint logged steps it will now redo: rows at steps >=
  `first_new_step` go (0 on a start from scratch, S + 1 on a resume from step S), as does a line
  cut short by a kill. Returns how many rows were dropped.
  """
  if not path.is_file():
    return 0
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      dropped += 1
      continue
    if isinstance(step, int) and step < first_new_step:
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    rewrite_text(path, "".join(line + "\n" for line in kept))
  return dropped


class _JsonLines:
  """metrics.jsonl, one line per write, readable after every write (a kill loses nothing).

  Locally an appended, flushed file; on an object store (no append) the object is rewritten
  whole on each write, from the rows held here (the whole log, ~0.5 KB per row: some 100
  KB per write after 200 log lines; once per log_every_steps, which is small against a step).
  """

  def __init__(self, path: pathlib.Path | Any):
    self.path = path
    self._rewrite = is_url(path)
    if self._rewrite:
      self._text = path.read_text(encoding="utf-8") if path.exists() else ""
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write(self, line: str) -> None:
    if self._rewrite:
      self._text += line + "\n"
      rewrite_text(self.path, self._text)
    else:
      self._file.write(line + "\n")
      self._file.flush()

  def close(self) -> None:
    if not self._rewrite:
      self._file.close()


class MetricsWriter:
  """metrics.jsonl (one flat JSON object a line), TensorBoard scalars and stdout, on process 0.

  `first_new_step`: the first step this run writes (0 from scratch, S + 1 resuming from step S).
  Rows at that step and after are dropped from metrics.jsonl and hidden from TensorBoard
  (tensorboardX's `purge_step`), so after any number of kills each (step, metric) appears once.
  None (e.g. a reader appending evaluations) keeps every row.
  """

  def __init__(self, workdir: str | pathlib.Path, *, total_steps: int, enabled: bool = True,
               first_new_step: int | None = None):
    self.enabled = enabled
    self.total_steps = total_steps
    self._start_time = time.time()
    self._start_step = 0
    self._progress_calls = 0
    self._jsonl = None
    self._tb = None
    if enabled:
      workdir = as_path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      if first_new_step is not None:
        drop_rows_from(workdir / "metrics.jsonl", first_new_step)
      self._jsonl = _JsonLines(workdir / "metrics.jsonl")
      if is_url(workdir):
        # tensorboardX writes to gs:// only through extra Google Cloud packages, and its
        # purge_step (dropping redone steps) needs an appendable file: no events here.
        print(f"TensorBoard: no event files for the object-store workdir {workdir}; every value "
              "is in metrics.jsonl", flush=True)
      else:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=30,
                                 purge_step=first_new_step)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record))
    for key, value in values.items():
      if (self._tb is not None and isinstance(value, (int, float)) and value is not None
          and math.isfinite(value)):
        self._tb.add_scalar(key, value, global_step=int(step))

  def progress(self, step: int, values: dict[str, Any], extra_keys: Sequence[str] = ()) -> None:
    """One line: step/total, the main numbers (and `extra_keys`), and the ETA."""
    if not self.enabled:
      return
    now = time.time()
    self._progress_calls += 1
    if self._progress_calls <= 2:
      # The ETA clock starts at the second line: the first interval includes compilation.
      self._start_step, self._start_time = step, now
    done = step - self._start_step
    rate = done / (now - self._start_time) if done > 0 else 0.0
    eta = format_duration((self.total_steps - step) / rate) if rate > 0 else "--:--"
    parts = [f"step {step}/{self.total_steps}"]
    keys = ("loss", "eval_loss", "retrieval_top1", "eval_retrieval_top1", "temperature",
            "images_per_sec")
    for key in (*keys, *(k for k in extra_keys if k not in keys)):
      if key in values and values[key] is not None:
        parts.append(f"{key} {values[key]:.4g}")
    parts.append(f"ETA {eta}")
    print(" | ".join(parts), file=sys.stdout, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
