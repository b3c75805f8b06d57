"""Writing an output file whole or not at all, with the permissions the user's umask gives.

Every command that writes a result (export, extract) writes OUT.tmp, then renames it over OUT:
an interrupted or failed write never leaves a truncated OUT, and the tmp file is removed on any
failure. Some writers (safetensors) create files with mode 0600; the result gets the mode a
plain `open()` would give (0666 minus the umask, normally 0644), like every other output.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

from spcl_jax.errors import UsageError
from spcl_jax.workdir_path import is_url


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def local_output(out: str | os.PathLike[str], flag: str = "--out",
                 folder: bool = False) -> pathlib.Path:
  """OUT as a local path; a bucket URL is refused in one line saying how to get it there
  (`folder`: OUT is a folder, copied with `cp -r`).

  The writers (safetensors, torch.save, np.savez) and the tmp + rename step need a local file,
  and `pathlib.Path("gs://b/x")` would silently be the local path 'gs:/b/x'.
  """
  if is_url(out):
    name = os.fspath(out).rstrip("/").rsplit("/", 1)[-1]
    cp = "cp -r" if folder else "cp"
    raise UsageError(f"{flag} {os.fspath(out)!r}: results are written to local disk; write "
                     f"them here and copy them, e.g. {flag} {name} then `gcloud storage {cp} "
                     f"{name} {os.fspath(out).rsplit('/', 1)[0]}/` (or `gsutil {cp}`)")
  return pathlib.Path(out).expanduser()


def check_writable(out: pathlib.Path, flag: str = "--out") -> None:
  """Fails before any work if OUT cannot be written (a directory, no folder, no permission)."""
  if out.is_dir():
    raise UsageError(f"{flag} {str(out)!r} is a directory; give a file name inside it")
  if not out.parent.is_dir():
    raise UsageError(f"{flag} {str(out)!r}: folder {str(out.parent)!r} does not exist")
  # Try it: permission bits say nothing for root, nor for read-only or special file systems.
  probe = out.with_name(out.name + ".tmp")
  try:
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
  except FileExistsError:
    return  # a tmp file left by an interrupted write: overwritten by the next write
  except OSError as e:
    raise UsageError(f"{flag} {str(out)!r}: cannot write in folder {str(out.parent)!r} "
                     f"({e.strerror})") from None
  probe.unlink()


def write_atomically(out: str | os.PathLike[str], write: Callable[[pathlib.Path], None]
                     ) -> pathlib.Path:
  """Calls `write(tmp_path)`, then renames tmp to `out` with the umask's default mode."""
  out = pathlib.Path(out)
  tmp = out.with_name(out.name + ".tmp")
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(out)
  except BaseException as e:
    tmp.unlink(missing_ok=True)
    if isinstance(e, OSError) and e.strerror:
      raise OSError(e.errno, f"cannot write {str(out)!r}: {e.strerror}") from e
    raise
  return out
