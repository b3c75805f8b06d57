"""Export a pre-training checkpoint to PyTorch: timm, Medical MAE and big_vision npz.

  python -m spcl_jax.export --workdir W [--step S] --format timm|medical_mae|npz --out PATH
                            [--in-chans 1|3]

Only the `params` item of the checkpoint is restored (see `spcl_jax.pretrained`). The layouts are
in `layout.py` (timm / Medical MAE) and `npz_format.py`; `docs/export.md` is the user's guide.
torch is needed for the medical_mae format only; timm's format needs `safetensors`.
"""

from __future__ import annotations

import os
import pathlib

from spcl_jax.pretrained import PretrainedEncoder, load_pretrained

FORMATS = ("timm", "medical_mae", "npz")


def default_in_chans(export_format: str, trained_channels: int) -> int:
  # Medical MAE's ViT only takes RGB; the other formats keep what the model was trained on.
  return 3 if export_format == "medical_mae" else trained_channels


def export_pretrained(pretrained: PretrainedEncoder, export_format: str,
                      out: str | os.PathLike[str], in_chans: int | None = None
                      ) -> list[pathlib.Path]:
  """Writes `pretrained` in `export_format`; returns the files written."""
  # Imported here: each writer pulls in its own optional dependency (safetensors, torch).
  from spcl_jax.export import layout  # pylint: disable=g-import-not-at-top

  if export_format not in FORMATS:
    raise ValueError(f"--format {export_format!r}: expected one of {', '.join(FORMATS)}")
  trained_channels = int(pretrained.info["model"]["channels"])
  if in_chans is None:
    in_chans = default_in_chans(export_format, trained_channels)
  layout.check_in_chans(trained_channels, in_chans)
  out = pathlib.Path(out).expanduser()
  if not out.parent.is_dir():
    raise FileNotFoundError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
  if export_format == "timm":
    from spcl_jax.export.timm_format import write_timm  # pylint: disable=g-import-not-at-top
    return write_timm(pretrained, out, in_chans)
  if export_format == "medical_mae":
    from spcl_jax.export.medical_mae import write_medical_mae  # pylint: disable=g-import-not-at-top
    return write_medical_mae(pretrained, out, in_chans)
  from spcl_jax.export import npz_format  # pylint: disable=g-import-not-at-top
  if out.suffix != ".npz":
    raise ValueError(f"--out {str(out)!r}: the npz format writes a .npz file")
  arrays = npz_format.big_vision_arrays(pretrained.params, pretrained.model.grid_size, in_chans)
  return [npz_format.write_npz(arrays, out)]


def export_checkpoint(workdir: str | os.PathLike[str], export_format: str,
                      out: str | os.PathLike[str], step: int | None = None,
                      in_chans: int | None = None) -> list[pathlib.Path]:
  """Restores checkpoint `step` (None: latest) of `workdir` and exports it."""
  if export_format not in FORMATS:  # fail before the (slow) restore
    raise ValueError(f"--format {export_format!r}: expected one of {', '.join(FORMATS)}")
  return export_pretrained(load_pretrained(workdir, step), export_format, out, in_chans)
