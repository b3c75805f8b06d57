"""gs:// workdirs against a real GCS emulator on 127.0.0.1: nothing mocked between the trainer
and the HTTP API.

`gcp-storage-emulator` serves the GCS JSON API in memory, in a thread of this process, on a free
loopback port. Each client is pointed at it by its documented emulator setting:
  gcsfs (etils.epath's gs:// backend)  STORAGE_EMULATOR_HOST, with anonymous credentials
  tensorstore (orbax's arrays)         TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
and the metadata-server settings of both auth stacks point at a closed loopback port, so
nothing asks for the credentials of a VM. Python-level connections to anything but loopback fail
the test (the guard below); tensorstore's own HTTP (libcurl, in C++) is kept on loopback by
those settings and is seen arriving at the emulator (its OCDBT files are in the bucket).

The emulator ignores GCS's generation preconditions (ifGenerationMatch on upload,
ifGenerationNotMatch on read, the x-goog-generation header), which tensorstore's OCDBT manifest
updates rely on: without them a checkpoint save intermittently fails with "Malformed
StorageGeneration". `_with_generation_preconditions` adds those three GCS behaviours to the
emulator's two handlers; everything else is the emulator's own.

tensorstore reads TENSORSTORE_GCS_HTTP_URL once per process, so one emulator (session scope)
serves every test of this module (the environment is restored after it).
"""

import contextlib
import io
import json
import logging
import os
import pathlib
import signal
import socket
import time
from http import HTTPStatus

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend

# The `test` extra installs both; a missing one fails here rather than skipping the round trip.
import gcp_storage_emulator.server as gse  # noqa: E402
import gcsfs.core as gcsfs_core  # noqa: E402

from gcp_storage_emulator.exceptions import NotFound  # noqa: E402
from gcp_storage_emulator.handlers import objects as emulator_objects  # noqa: E402

import finetune_fixtures as ff  # noqa: E402
from spcl_jax import checkpoint, engine, train  # noqa: E402
from spcl_jax.export import export_checkpoint  # noqa: E402
from spcl_jax.finetune import trainer as finetune_trainer  # noqa: E402
from spcl_jax.preemption import StopRequest  # noqa: E402
from run_safety_fixtures import quick_config  # noqa: E402

BUCKET = "spcl-emulated"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# --- the emulator ----------------------------------------------------------------------------

def _generation(storage, request) -> str:
  name = request.params.get("object_id") or request.query["name"][0]
  try:
    return storage.get_file_obj(request.params["bucket_name"], name)["generation"]
  except NotFound:
    return "0"  # GCS's generation of an object that does not exist


def _insert(request, response, storage, *args, **kwargs):
  wanted = request.query.get("ifGenerationMatch")
  if wanted and _generation(storage, request) != wanted[0]:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return None
  return emulator_objects.insert(request, response, storage, *args, **kwargs)


def _get(request, response, storage, *args, **kwargs):
  if request.query.get("alt", [""])[0] == "media":
    generation = _generation(storage, request)
    if generation != "0":
      response["x-goog-generation"] = generation
    unwanted = request.query.get("ifGenerationNotMatch")
    if unwanted and generation != "0" and generation == unwanted[0]:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    wanted = request.query.get("ifGenerationMatch")
    if wanted and generation != wanted[0]:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
  return emulator_objects.get(request, response, storage, *args, **kwargs)


def _with_generation_preconditions(patch: pytest.MonkeyPatch) -> None:
  for _, methods in gse.HANDLERS:
    for method, handler in list(methods.items()):
      replacement = {emulator_objects.insert: _insert, emulator_objects.get: _get}.get(handler)
      if replacement is not None:
        patch.setitem(methods, method, replacement)


def _free_loopback_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _forget_epath_filesystems() -> None:
  """epath caches one file system per protocol: drop it when the registration changes."""
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def emulator():
  """The emulator's address, with gcsfs and tensorstore pointed at it for the session."""
  port = _free_loopback_port()
  address = f"http://127.0.0.1:{port}"
  closed = f"127.0.0.1:{_free_loopback_port()}"  # nothing listens: a metadata probe fails fast
  with pytest.MonkeyPatch.context() as patch:
    for name, value in {
        "STORAGE_EMULATOR_HOST": address,  # gcsfs (and google-cloud-storage)
        "TENSORSTORE_GCS_HTTP_URL": address,  # tensorstore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed token, no auth flow
        "GCE_METADATA_ROOT": closed,  # tensorstore's metadata server
        "GCE_METADATA_HOST": closed,  # google-auth's
        "GCE_METADATA_IP": closed,
        "NO_GCE_CHECK": "true",  # gcsfs: do not probe for a GCE VM
    }.items():
      patch.setenv(name, value)
    # gcsfs's default class asks the storage-control gRPC API for the bucket layout, which the
    # emulator does not serve (a 60 s timeout per bucket): the plain JSON-API class instead.
    saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    for protocol in ("gs", "gcs"):
      fsspec.register_implementation(protocol, gcsfs_core.GCSFileSystem, clobber=True)
      patch.setitem(fsspec.config.conf, protocol, {"token": "anon"})  # no credentials needed
    _forget_epath_filesystems()
    _with_generation_preconditions(patch)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are expected
    server = gse.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
      yield address
    finally:
      server.stop()
      for protocol, cls in saved.items():
        if cls is not None:
          fsspec.register_implementation(protocol, cls, clobber=True)
      _forget_epath_filesystems()


@pytest.fixture
def loopback_only(monkeypatch):
  """Fails on any Python-level connection beyond loopback (gcsfs, aiohttp, google-auth)."""
  refused = []
  real_connect = socket.socket.connect

  def connect(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
      refused.append(address)
      raise OSError(f"test: connection to {address} refused (loopback only)")
    return real_connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", connect)
  yield refused
  assert not refused, f"connections beyond loopback were attempted: {refused}"


def test_the_guard_refuses_connections_beyond_loopback_and_lets_loopback_through(loopback_only):
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as outside:
    with pytest.raises(OSError, match="loopback only"):
      outside.connect(("192.0.2.1", 443))  # TEST-NET-1: documentation addresses, never routed
  assert loopback_only == [("192.0.2.1", 443)]
  loopback_only.clear()  # refused on purpose here; the fixture fails a test that leaves any
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server, \
       socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client.connect(server.getsockname())


# --- helpers ---------------------------------------------------------------------------------

def losses(url: str) -> list[tuple[int, float]]:
  rows = [json.loads(line) for line in epath.Path(url, "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


class _SigtermAtStep3(StopRequest):
  """Preemption: a real SIGTERM to this process while step 3 runs."""

  def should_stop(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().should_stop(step)


def _bucket_keys(url: str) -> list[str]:
  """Every object under `url`, listed through gcsfs from the emulator."""
  fs = fsspec.filesystem("gs")
  return sorted(fs.find(url))


# --- the round trip --------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_trains_is_preempted_resumes_and_exports_through_the_emulator(
    emulator, loopback_only, tmp_path, monkeypatch, capsys):
  del emulator, loopback_only
  monkeypatch.chdir(tmp_path)  # where pathlib would have made a local 'gs:' folder
  full, run = f"gs://{BUCKET}/runs/uninterrupted", f"gs://{BUCKET}/runs/x"
  train.train_and_evaluate(quick_config(), full)
  capsys.readouterr()

  monkeypatch.setattr(engine, "StopRequest", _SigtermAtStep3)
  train.train_and_evaluate(quick_config(), run)
  out = capsys.readouterr().out
  assert "received signal 15: saving a checkpoint and stopping" in out
  assert "stopped at step 3; checkpoint saved" in out
  assert checkpoint.available_steps(run) == [2, 3]
  # tensorstore wrote the arrays itself, into the emulator's bucket (OCDBT manifest + data).
  keys = _bucket_keys(f"{run}/checkpoints/3/params")
  assert any(k.endswith("manifest.ocdbt") for k in keys), keys
  assert any("/d/" in k for k in keys), keys
  assert epath.Path(run, "lock.json").read_text() == ""  # released by the stopped run

  # As if the stopped run had then been killed holding the lease: the next start takes it over.
  epath.Path(run, "lock.json").write_text(json.dumps(
      {"host": "worker-0", "pid": 4321, "started": "then", "lease_until": time.time() - 1}))
  monkeypatch.setattr(engine, "StopRequest", StopRequest)
  train.train_and_evaluate(quick_config(), run)
  out = capsys.readouterr().out
  assert "taking over the workdir lock of a run that is gone (PID 4321" in out
  assert f"resumed from {run}/checkpoints at step 3" in out
  resumed, uninterrupted = losses(run), losses(full)
  assert [s for s, _ in resumed] == [1, 2, 3, 4]  # each step logged once
  np.testing.assert_allclose([l for _, l in resumed], [l for _, l in uninterrupted],
                             rtol=0, atol=1e-6)
  history = [json.loads(line) for line in epath.Path(run, "history.jsonl").read_text()
             .splitlines()]
  assert [(h["start_step"], h["restored_from"]) for h in history] == [(0, None), (3, 3)]

  (from_run,) = export_checkpoint(run, "npz", tmp_path / "resumed.npz")
  (from_full,) = export_checkpoint(full, "npz", tmp_path / "uninterrupted.npz")
  with np.load(from_run) as a, np.load(from_full) as b:
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    for name in a.files:
      np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)

  # A corrupt newest checkpoint on the bucket is moved aside (copy + delete through gcsfs) and
  # the run falls back to the previous one, then trains the lost step again, identically.
  meta = epath.Path(run, "checkpoints", "4", "meta", "metadata")
  truncated = meta.read_bytes()[:5]
  meta.write_bytes(truncated)
  train.train_and_evaluate(quick_config(), run)
  err = capsys.readouterr().err
  assert "'meta/metadata' is not valid JSON" in err and "falling back to step 3" in err
  (moved,) = epath.Path(run, checkpoint.CORRUPT_DIR).iterdir()
  assert moved.name.startswith("4-")
  assert moved.joinpath("meta", "metadata").read_bytes() == truncated  # kept, not deleted
  assert checkpoint.available_steps(run) == [2, 3, 4]
  assert losses(run) == resumed

  assert not list(tmp_path.rglob("gs:*")), "a local 'gs:' folder was created"
  assert not pathlib.Path(tmp_path.parent, "gs:").exists()


@pytest.mark.slow
def test_fine_tuning_runs_in_a_gs_workdir_and_exports_its_classifier(
    emulator, loopback_only, tmp_path, monkeypatch):
  del emulator, loopback_only
  monkeypatch.chdir(tmp_path)
  with contextlib.redirect_stdout(io.StringIO()):
    prepared = ff.prepared_nih(tmp_path / "nih")
  config = ff.finetune_config("nih14", prepared, epochs=1, **{"optim.warmup_epochs": 0})
  root = f"gs://{BUCKET}/finetune/nih"
  # Two seeds, as `--seeds 2` runs them: one workdir per seed under the URL, and the aggregate
  summary = finetune_trainer.train_seeds(config, root, 2)
  assert json.loads(epath.Path(root, "results.json").read_text()) == json.loads(
      json.dumps(summary))
  assert summary["per_seed"] == [f"seed_{s}/results.json" for s in (config.seed, config.seed + 1)]
  url = f"{root}/seed_{config.seed}"
  outcome = json.loads(epath.Path(url, "results.json").read_text())
  run = epath.Path(url)
  assert json.loads(run.joinpath("results.json").read_text()) == json.loads(json.dumps(outcome))
  assert {"config.json", "selection.json", "metrics.jsonl", "checkpoints", "best"} <= {
      p.name for p in run.iterdir()}
  assert checkpoint.available_steps(run / "best") == [outcome["val_best"]["step"]]

  written = export_checkpoint(url, "timm", tmp_path / "classifier.safetensors")
  assert [p.name for p in written] == ["classifier.safetensors", "classifier.json"]
  sidecar = json.loads((tmp_path / "classifier.json").read_text())
  assert sidecar["source"]["workdir"] == url
  assert not list(tmp_path.rglob("gs:*")), "a local 'gs:' folder was created"
