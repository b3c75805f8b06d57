"""The five supported downloads. Each module holds one dataset's quirks:

  NAME, LABELS (raw label columns), TASK_LABELS (what fine-tuning predicts), IMAGE_FORMAT
  ("file" for PNG/JPEG, "dicom"), DOWNSTREAM (gets a 7:2:1 split), the module docstring (where
  to download, the layout --src must have), `read_manifest(src, *, check_files=True)` and, for
  labelled sets, `targets(codes, policy)` (raw codes -> float32 targets).
"""

from __future__ import annotations

import importlib
import types

DATASET_NAMES = ("mimic_cxr_jpg", "nih_chestxray14", "chexpert", "rsna_pneumonia", "siim_acr")


def dataset_module(name: str) -> types.ModuleType:
  if name not in DATASET_NAMES:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
  return importlib.import_module(f"spcl_jax.data.datasets.{name}")
