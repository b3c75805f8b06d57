"""gs:// workdirs, offline: an in-memory stand-in for GCS registered as fsspec's "gs" protocol.

etils.epath (without TensorFlow) reaches gs:// through fsspec's "gs" implementation (gcsfs in
real use); these tests register an in-memory file system under that name, so every file the run
writes through epath (config.json, history, metrics, lock, accelerator time, eval lists) takes
the same code path as on GCS, with no traffic at all. orbax writes arrays through tensorstore's
own GCS driver, which this stand-in cannot serve: the tests check that orbax is handed the
gs:// URL unchanged and let it write that checkpoint folder to a local mirror instead.
"""

import json
import os
import pathlib
import shutil
import sys
import time

import fsspec
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as _fsspec_registry  # pylint: disable=protected-access

from spcl_jax import checkpoint, extract, train, tsne, workdir_lock
from spcl_jax.configuration import ConfigError
from spcl_jax.data import prepare
from spcl_jax.export import __main__ as export_cli
from spcl_jax.export import export_checkpoint
from spcl_jax.finetune.initialization import load_init
from spcl_jax.report import __main__ as report_cli
from spcl_jax.workdir_path import as_path, is_url
from run_safety_fixtures import BASE, assert_one_error_line, quick_config, run_main

URL = "gs://spcl-test-bucket/runs/demo"


class FakeGCS(MemoryFileSystem):
  """A bucket in memory; paths keep GCS's 'bucket/key' shape under fsspec's memory store."""
  protocol = ("gs", "gcs")
  cachable = False
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's option, from epath
    del finalize_on_close
    super().__init__(*args, **kwargs)

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:  # like GCS: an object is written whole, never appended to
      raise NotImplementedError(f"{path}: GCS objects cannot be appended to")
    return super()._open(path, mode, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return MemoryFileSystem._strip_protocol(path)

  @classmethod
  def _parent(cls, path):
    return MemoryFileSystem._parent(cls._strip_protocol(path))


def forget_epath_filesystems():
  """epath caches one file system per protocol: drop it when the registration changes."""
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served from memory, and orbax redirected to a local mirror of the URL it gets."""
  saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  forget_epath_filesystems()
  mirror = tmp_path / "orbax_mirror"
  handed_to_orbax = []
  real_manager = ocp.CheckpointManager

  def manager_on_mirror(directory, *args, **kwargs):
    handed_to_orbax.append(directory)
    assert isinstance(directory, epath.Path) and str(directory).startswith("gs://")
    if kwargs["options"].create:
      directory.mkdir(parents=True, exist_ok=True)  # what orbax does on the store
    return real_manager(mirror / str(directory)[len("gs://"):], *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager_on_mirror)
  monkeypatch.chdir(tmp_path)  # where pathlib would have made a local 'gs:' folder
  yield handed_to_orbax, mirror
  FakeGCS.store.clear()
  forget_epath_filesystems()
  for protocol, cls in saved.items():
    if cls is None:
      _fsspec_registry.pop(protocol, None)
    else:
      fsspec.register_implementation(protocol, cls, clobber=True)


def metrics(url):
  return [json.loads(line) for line in epath.Path(url, "metrics.jsonl").read_text().splitlines()]


def losses(url):
  return {r["step"]: r["loss"] for r in metrics(url) if "loss" in r}


def test_as_path_keeps_urls_and_resolves_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(as_path(URL) / "checkpoints") == URL + "/checkpoints"
  assert as_path("rel/dir") == tmp_path / "rel" / "dir"
  assert is_url(URL) and is_url(epath.Path(URL)) and not is_url("gs:/x") and not is_url("/a")


@pytest.mark.slow
def test_gs_workdir_trains_is_killed_resumes_and_exports(fake_gcs, tmp_path, capsys):
  handed_to_orbax, mirror = fake_gcs
  train.train_and_evaluate(quick_config(), URL)
  out = capsys.readouterr().out
  assert "TensorBoard: no event files for the object-store workdir" in out
  run = epath.Path(URL)
  assert sorted(p.name for p in run.iterdir()) == [
      "accelerator_time.json", "checkpoints", "config.json", "history.jsonl", "lock.json",
      "metrics.jsonl"]
  assert run.joinpath("lock.json").read_text() == ""  # released
  assert [str(d) for d in handed_to_orbax] == [URL + "/checkpoints"]
  assert checkpoint.available_steps(URL) == [2, 4]
  original = losses(URL)
  assert sorted(original) == [1, 2, 3, 4]

  # Killed after step 3 (its metrics written, step 4's checkpoint not), holding the lease.
  ckpt_mirror = mirror / "spcl-test-bucket/runs/demo/checkpoints"
  shutil.rmtree(ckpt_mirror / "4")
  kept = [json.dumps(r) for r in metrics(URL) if r["step"] <= 3]
  run.joinpath("metrics.jsonl").write_text("".join(line + "\n" for line in kept))
  run.joinpath("lock.json").write_text(json.dumps(
      {"host": "worker-0", "pid": 1234, "started": "then", "lease_until": time.time() - 1}))

  train.train_and_evaluate(quick_config(), URL)
  out = capsys.readouterr().out
  assert "taking over the workdir lock of a run that is gone (PID 1234" in out
  assert "resumed from gs://spcl-test-bucket/runs/demo/checkpoints at step 2" in out
  records = metrics(URL)
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # each step once
  again = losses(URL)
  for step in (3, 4):
    assert again[step] == pytest.approx(original[step], abs=1e-6), step
  history = [json.loads(line) for line in run.joinpath("history.jsonl").read_text().splitlines()]
  assert [(h["start_step"], h["restored_from"]) for h in history] == [(0, None), (2, 2)]
  assert len(json.loads(run.joinpath("accelerator_time.json").read_text())["sessions"]) == 2

  (written,) = export_checkpoint(URL, "npz", tmp_path / "encoder.npz")
  with np.load(written) as exported:
    assert len(exported.files) > 10
  init = load_init(URL)  # fine-tuning starts from a gs:// pre-training workdir
  assert (init.kind, init.path, init.step) == ("spcl", URL, 4)
  assert not [p for p in pathlib.Path(".").rglob("gs:*")]  # no local 'gs:' folder anywhere
  assert not os.path.exists(pathlib.Path.cwd() / "gs:")


def test_lease_lock_refuses_a_live_holder_and_renews(fake_gcs):
  first = workdir_lock.WorkdirLock(URL, lease_seconds=0.6)
  assert isinstance(first, workdir_lock.LeaseWorkdirLock)
  with first:
    lease = json.loads(epath.Path(URL, "lock.json").read_text())
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"PID {os.getpid()}"):
      workdir_lock.WorkdirLock(URL).acquire()
    time.sleep(0.5)  # past a third of the lease: renewed at least once
    renewed = json.loads(epath.Path(URL, "lock.json").read_text())
    assert renewed["lease_until"] > lease["lease_until"]
  assert epath.Path(URL, "lock.json").read_text() == ""
  with workdir_lock.WorkdirLock(URL):  # released: the next run takes it without a takeover
    pass


def test_data_folders_on_gs_fail_at_start_naming_the_copy_command(fake_gcs):
  for source in ("prepared:gs://spcl-test-bucket/mimic", "folder:gs://spcl-test-bucket/imgs"):
    config = quick_config()
    config.data.source = source
    with pytest.raises(ConfigError, match=r"copy it first, e\.g\. `gcloud storage cp -r gs://"):
      train.train_and_evaluate(config, URL)
  assert not FakeGCS.store  # nothing written before the config was checked


def test_missing_gcs_client_is_one_clear_error(monkeypatch, capsys):
  for protocol in ("gs", "gcs"):  # as on a machine without gcsfs
    monkeypatch.delitem(_fsspec_registry, protocol, raising=False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  forget_epath_filesystems()
  with pytest.raises(ImportError, match=r"--workdir 'gs://.*pip install -e '\.\[gcs\]'"):
    train.train_and_evaluate(quick_config(), URL)
  code, _, err = run_main(capsys, f"--workdir={URL}", *BASE)  # the command: one line, exit 1+
  assert code != 0
  assert_one_error_line(err, "pip install -e '.[gcs]' installs gcsfs")


@pytest.mark.parametrize("command, args", [
    ("export", ["--workdir", URL, "--format", "npz", "--out", "gs://spcl-test-bucket/out/enc.npz"]),
    ("export", ["--workdir", URL, "--format", "timm",
                "--out", "gs://spcl-test-bucket/out/enc.safetensors"]),
    ("extract", ["--workdir", URL, "--images", "imgs", "--out",
                 "gs://spcl-test-bucket/out/enc.npz"]),
    ("tsne", ["--features", "f.npz", "--out", "gs://spcl-test-bucket/out/enc.png"]),
    ("report", ["runs/a", "--out", "gs://spcl-test-bucket/out/tables"]),
    ("prepare", ["nih_chestxray14", "--src", "raw", "--out", "gs://spcl-test-bucket/out/nih"]),
])
def test_outputs_on_gs_are_one_line_saying_write_locally_and_copy(fake_gcs, tmp_path, capsys,
                                                                  command, args):
  main = {"export": export_cli.main, "extract": extract.main, "tsne": tsne.main,
          "report": report_cli.main, "prepare": prepare.main}[command]
  assert main(args) == 2  # a usage error, like a bad --out folder
  err = capsys.readouterr().err
  name = args[-1].rsplit("/", 1)[-1]
  cp = "cp -r" if command in ("report", "prepare") else "cp"  # those write folders
  assert_one_error_line(err, f"--out {args[-1]!r}: results are written to local disk")
  assert f"--out {name} then `gcloud storage {cp} {name} gs://spcl-test-bucket/out/`" in err
  assert not FakeGCS.store and not list(tmp_path.rglob("gs:*"))  # nothing written anywhere
