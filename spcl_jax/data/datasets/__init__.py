"""The five supported downloads and your own CSV, one module each, under one checked contract.

A dataset module holds one dataset's quirks and its docstring says where to download it and the
layout `--src` must have. What it must provide is `DatasetModule` below; `dataset_module(name)`
checks a module against it when it is loaded, so a new dataset that forgets a field fails at
once with the field's name instead of deep inside `prepare`.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

DATASET_NAMES = ("mimic_cxr_jpg", "nih_chestxray14", "chexpert", "rsna_pneumonia", "siim_acr",
                 "csv")
# A dataset name whose module is named otherwise ('csv' would shadow the standard library's).
_MODULE_OF = {"csv": "custom_csv"}
IMAGE_FORMATS = ("file", "dicom")


@runtime_checkable
class DatasetModule(Protocol):
  """What a dataset module provides (module-level names)."""

  NAME: str                        # the dataset's name in DATASET_NAMES and the CLI
  LABELS: tuple[str, ...]          # raw label columns stored per record (codes of manifest.py)
  TASK_LABELS: tuple[str, ...]     # what fine-tuning predicts, in the paper's table order
  IMAGE_FORMAT: str                # "file" (PNG/JPEG) or "dicom"
  PATIENT_SPLIT: bool              # gets the 7:2:1 patient split and 1% / 10% label fractions
  HAS_MASKS: bool                  # records carry a segmentation mask beside the image
  # read_manifest(src, *, check_files=True) -> manifest.Manifest
  read_manifest: Callable[..., Any]
  # targets(codes (N, len(LABELS)), policy) -> float32 (N, len(TASK_LABELS)); None without labels
  targets: Callable[..., Any] | None
  # official_lists(entries) -> {split stem: names} the download defines; None when there are
  # none or when read_manifest fills Manifest.official_splits itself (NIH's list files)
  official_lists: Callable[[Sequence[Any]], Mapping[str, list[str]]] | None


_FIELD_TYPES = {"NAME": str, "LABELS": tuple, "TASK_LABELS": tuple, "IMAGE_FORMAT": str,
                "PATIENT_SPLIT": bool, "HAS_MASKS": bool}


def check_contract(module: types.ModuleType) -> None:
  """Raises TypeError naming the module and the first field that breaks the contract."""
  where = module.__name__
  for field, kind in _FIELD_TYPES.items():
    if not isinstance(getattr(module, field, None), kind):
      raise TypeError(f"{where}.{field} must be a {kind.__name__} (the DatasetModule contract)")
  if module.IMAGE_FORMAT not in IMAGE_FORMATS:
    raise TypeError(f"{where}.IMAGE_FORMAT={module.IMAGE_FORMAT!r} must be one of {IMAGE_FORMATS}")
  if not callable(getattr(module, "read_manifest", None)):
    raise TypeError(f"{where}.read_manifest must be a function (the DatasetModule contract)")
  for field in ("targets", "official_lists"):
    if not hasattr(module, field):
      raise TypeError(f"{where}.{field} is missing: a function, or None (the DatasetModule "
                      "contract)")
    value = getattr(module, field)
    if value is not None and not callable(value):
      raise TypeError(f"{where}.{field} must be a function or None")
  if module.TASK_LABELS and module.targets is None:
    raise TypeError(f"{where}: TASK_LABELS {module.TASK_LABELS} need a targets() function")


def dataset_module(name: str, settings: Mapping[str, Any] | None = None) -> DatasetModule:
  """The dataset's module; a dataset configured per prepared folder (csv: its classes, image
  root) is returned configured with `settings` (prepare's, or report.json's) when given."""
  if name not in DATASET_NAMES:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
  module = importlib.import_module(f"spcl_jax.data.datasets.{_MODULE_OF.get(name, name)}")
  if settings is not None and hasattr(module, "configured"):
    module = module.configured(dict(settings))
  check_contract(module)
  return module
