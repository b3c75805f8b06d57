"""Medical MAE format: a `.pth` holding {'model': state_dict} for its fine-tuning scripts.

Medical MAE's ViT is timm's `VisionTransformer` with 3 input channels, so the state dict is the
timm one (same keys) with the patch kernel spread over 3 channels. Its fine-tuning reads
`torch.load(path)['model']`, resamples `pos_embed` to its input size (224 by default) and loads
with `strict=False`:
  - with its default `--global_pool`, the pre-trained final `norm` is dropped (unexpected key) and
    a freshly initialised `fc_norm` over the mean of the patch tokens is used instead;
  - with `--cls_token`, the CLS token and the pre-trained `norm` are used, as in pre-training.
The head is new in both cases. docs/export.md says this to users.

The file also carries {'spcl_jax': the export description} (plain types only, so it loads with
`torch.load(..., weights_only=True)`); Medical MAE ignores it.
"""

from __future__ import annotations

import os
import pathlib

from spcl_jax.export.layout import timm_state_dict
from spcl_jax.atomic_file import write_atomically
from spcl_jax.export.timm_format import describe_export
from spcl_jax.pretrained import PretrainedEncoder

IN_CHANS = 3  # Medical MAE builds its ViTs with timm's default of 3 input channels


def write_medical_mae(pretrained: PretrainedEncoder, out: str | os.PathLike[str],
                      in_chans: int = IN_CHANS) -> list[pathlib.Path]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the medical_mae format needs torch: pip install -e '.[torch]'") from e

  if in_chans != IN_CHANS:
    raise ValueError(f"Medical MAE's ViT takes {IN_CHANS} input channels, not {in_chans}")
  out = pathlib.Path(out)
  state = timm_state_dict(pretrained.params, pretrained.model.grid_size, in_chans)
  checkpoint = {
      "model": {k: torch.from_numpy(v) for k, v in state.items()},
      "spcl_jax": describe_export(pretrained, "medical_mae", in_chans),
  }
  write_atomically(out, lambda tmp: torch.save(checkpoint, tmp))
  return [out]
