"""A workdir (or any output folder) as a path object that keeps a URL a URL.

`pathlib.Path("gs://bucket/run")` silently becomes the local relative path `gs:/bucket/run`:
a run would write a folder named `gs:` and then fail at its first checkpoint. Every module that
takes a workdir goes through `as_path`, which gives an `etils.epath.Path` for a URL (`gs://`,
`s3://`, ...; orbax uses the same class, so checkpoints and the other files go to one place)
and a plain, absolute `pathlib.Path` for a local folder.

Object stores have no append and no `flock`: the callers use `is_url` to rewrite whole files
(metrics.jsonl, history.jsonl) and to hold the workdir lock as a lease (`workdir_lock`).
"""

from __future__ import annotations

import os
import pathlib
import re

from etils import epath

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str | os.PathLike[str]) -> bool:
  """True for 'gs://bucket/x' (also an epath.Path holding one); False for local paths."""
  return bool(_URL.match(os.fspath(path)))


def as_path(path: str | os.PathLike[str]) -> pathlib.Path | epath.Path:
  """epath.Path for a URL (never resolved against the cwd), absolute pathlib.Path otherwise."""
  if is_url(path):
    return epath.Path(os.fspath(path))
  return pathlib.Path(path).expanduser().resolve()


def rewrite_text(path: pathlib.Path | epath.Path, text: str) -> None:
  """Replaces the file's content whole: tmp + rename locally, one object write on a store.

  An object store writes an object whole on close (a reader never sees half of it), and its
  "rename" is a copy + delete, so the tmp step would only double the traffic there.
  """
  if is_url(path):
    path.write_text(text, encoding="utf-8")
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(path)


def append_line(path: pathlib.Path | epath.Path, line: str) -> None:
  """Appends one line; an object store has no append, so there the object is rewritten."""
  if is_url(path):
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(old + line + "\n", encoding="utf-8")
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")


def require_local(path: str | os.PathLike[str], what: str) -> None:
  """Image folders are read from local disk: array_record and the per-image reads need a file
  system, and reading a dataset image by image from a bucket would starve the accelerators."""
  if is_url(path):
    name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1]
    raise ValueError(
        f"{what} {os.fspath(path)!r}: data folders must be on local disk (a bucket is not "
        f"read directly); copy it first, e.g. `gcloud storage cp -r {os.fspath(path)} "
        f"/mnt/disks/data/` (or `gsutil -m cp -r ...`), and give /mnt/disks/data/{name}")


def check_store_client(path: str | os.PathLike[str], what: str = "--workdir") -> None:
  """Fails at start, in one line, when the URL's file-system client is not installed.

  epath reads gs:// through gcsfs (fsspec) when TensorFlow is absent; without it the first
  write would fail deep inside the run with fsspec's ImportError.
  """
  if not is_url(path):
    return
  try:
    as_path(path).exists()
  except ImportError as e:
    raise ImportError(f"{what} {os.fspath(path)!r}: {e} (pip install -e '.[gcs]' installs "
                      "gcsfs for gs://)") from None
