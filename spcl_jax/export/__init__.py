"""Export a pre-training checkpoint to PyTorch: timm, Medical MAE and big_vision npz.

  python -m spcl_jax.export --workdir W [--step S] --format timm|medical_mae|npz --out PATH
                            [--in-chans 1|3]

A fine-tuning workdir (python -m spcl_jax.finetune) exports its classifier, head included, to
timm (`classifier.py`; the best-on-val parameters unless --step). Only the `params` item of the
checkpoint is restored (see `spcl_jax.pretrained`). The layouts are
in `layout.py` (timm / Medical MAE) and `npz_format.py`; docs/export.md is the user's guide.
torch is needed for the medical_mae format only (imported when it writes); the timm format needs
`safetensors` (with numpy, not torch).
"""

from __future__ import annotations

import os
import pathlib

from spcl_jax.atomic_file import check_writable, local_output
from spcl_jax.export import classifier, layout, medical_mae, npz_format, timm_format
from spcl_jax.pretrained import PretrainedEncoder, load_pretrained
from spcl_jax.run_info import read_run_info
from spcl_jax.workdir_path import as_path, check_store_client

# The file each format writes (timm's JSON sidecar goes beside its .safetensors).
SUFFIXES = {"timm": ".safetensors", "medical_mae": ".pth", "npz": ".npz"}
FORMATS = tuple(SUFFIXES)


def default_in_chans(export_format: str, trained_channels: int) -> int:
  # Medical MAE's ViT only takes RGB; the other formats keep what the model was trained on.
  return 3 if export_format == "medical_mae" else trained_channels


def check_request(export_format: str, out: pathlib.Path, in_chans: int | None) -> None:
  """The checks that need no checkpoint, so a typo fails before the (slow) restore."""
  if export_format not in FORMATS:
    raise ValueError(f"--format {export_format!r}: expected one of {', '.join(FORMATS)}")
  if out.suffix != SUFFIXES[export_format]:
    raise ValueError(f"--out {str(out)!r}: the {export_format} format writes a "
                     f"{SUFFIXES[export_format]} file, e.g. --out spcl_vit"
                     f"{SUFFIXES[export_format]}")
  check_writable(out)
  if in_chans is not None and in_chans not in layout.SUPPORTED_IN_CHANS:
    raise ValueError(f"--in-chans {in_chans}: expected one of {layout.SUPPORTED_IN_CHANS}")
  if export_format == "medical_mae" and in_chans not in (None, medical_mae.IN_CHANS):
    raise ValueError(f"--in-chans {in_chans}: Medical MAE's ViT takes {medical_mae.IN_CHANS} "
                     "input channels (its state dict would not load); use the timm format "
                     "for a 1-channel model")


def export_pretrained(pretrained: PretrainedEncoder, export_format: str,
                      out: str | os.PathLike[str], in_chans: int | None = None
                      ) -> list[pathlib.Path]:
  """Writes `pretrained` in `export_format`; returns the files written."""
  out = local_output(out)
  check_request(export_format, out, in_chans)
  trained_channels = int(pretrained.info["model"]["channels"])
  if in_chans is None:
    in_chans = default_in_chans(export_format, trained_channels)
  layout.check_in_chans(trained_channels, in_chans)
  if export_format == "timm":
    return timm_format.write_timm(pretrained, out, in_chans)
  if export_format == "medical_mae":
    return medical_mae.write_medical_mae(pretrained, out, in_chans)
  arrays = npz_format.big_vision_arrays(pretrained.params, pretrained.model.grid_size, in_chans)
  return [npz_format.write_npz(arrays, out)]


def export_checkpoint(workdir: str | os.PathLike[str], export_format: str,
                      out: str | os.PathLike[str], step: int | None = None,
                      in_chans: int | None = None) -> list[pathlib.Path]:
  """Restores checkpoint `step` (None: latest) of `workdir` and exports it."""
  check_request(export_format, local_output(out), in_chans)
  check_store_client(workdir)
  if not as_path(workdir).is_dir():  # a gs:// workdir stays a URL
    raise FileNotFoundError(f"--workdir {str(workdir)!r} does not exist or is not a directory")
  info = read_run_info(workdir)
  if "segmenter" in info:
    raise ValueError(f"--workdir {str(workdir)!r} holds a {info['segmenter'].get('protocol')} "
                     "segmentation model: exporting segmentation decoders to PyTorch is not "
                     "supported (export the pre-training workdir's encoder instead)")
  if classifier.is_finetune_workdir(info):
    return export_classifier(workdir, info, export_format, out, step, in_chans)
  return export_pretrained(load_pretrained(workdir, step), export_format, out, in_chans)


def export_classifier(workdir, info, export_format: str, out, step: int | None,
                      in_chans: int | None) -> list[pathlib.Path]:
  """A fine-tuning workdir: the classifier (best-on-val unless `step`), timm format only."""
  if export_format != "timm":
    raise ValueError(f"--format {export_format}: a fine-tuned classifier exports to timm only "
                     "(its head has no place in the medical_mae or npz layouts)")
  trained_channels = int(info["model"]["channels"])
  in_chans = trained_channels if in_chans is None else in_chans
  layout.check_in_chans(trained_channels, in_chans)
  finetuned = classifier.load_finetuned(workdir, info, step)
  return classifier.write_timm_classifier(finetuned, local_output(out), in_chans)
