"""`python -m spcl_jax.export`: the command works, and every user error names what is wrong."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from export_fixtures import make_config, make_workdir
from spcl_jax.export.__main__ import main
from spcl_jax.export.npz_format import read_npz
from spcl_jax.run_info import write_run_info

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path, params = make_workdir(tmp_path_factory.mktemp("cli") / "workdir", "pico/16", 64, step=7)
  return path, params


def run_cli(capsys, *args):
  code = main([str(a) for a in args])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.mark.slow
def test_module_command_writes_the_npz(workdir, tmp_path):
  path, params = workdir
  out = tmp_path / "mu.npz"
  result = subprocess.run(
      [sys.executable, "-m", "spcl_jax.export", "--workdir", str(path), "--format", "npz",
       "--out", str(out)], capture_output=True, text=True, timeout=300, check=False,
      cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr
  assert f"wrote {out}" in result.stdout
  np.testing.assert_array_equal(read_npz(out)["cls"], params["cls"])


def test_timm_export_writes_weights_and_sidecar(workdir, tmp_path, capsys):
  path, _ = workdir
  code, out, _ = run_cli(capsys, "--workdir", path, "--format", "timm", "--step", 7,
                         "--out", tmp_path / "mu.safetensors")
  assert code == 0
  assert "mu.safetensors" in out and "mu.json" in out
  assert json.loads((tmp_path / "mu.json").read_text())["source"]["step"] == 7


def test_missing_workdir_is_named(tmp_path, capsys):
  code, _, err = run_cli(capsys, "--workdir", tmp_path / "nope", "--format", "npz",
                         "--out", tmp_path / "x.npz")
  assert code == 1 and "nope" in err and "does not exist" in err


def test_workdir_without_config_json_is_named(tmp_path, capsys):
  code, _, err = run_cli(capsys, "--workdir", tmp_path, "--format", "npz",
                         "--out", tmp_path / "x.npz")
  assert code == 1 and "config.json" in err


def test_workdir_without_checkpoints_is_named(tmp_path, capsys):
  write_run_info(tmp_path, make_config("pico/16", 64))
  code, _, err = run_cli(capsys, "--workdir", tmp_path, "--format", "npz",
                         "--out", tmp_path / "x.npz")
  assert code == 1 and "no checkpoints" in err and "checkpoints" in err


def test_unknown_step_lists_the_steps_present(workdir, tmp_path, capsys):
  path, _ = workdir
  code, _, err = run_cli(capsys, "--workdir", path, "--step", 99, "--format", "npz",
                         "--out", tmp_path / "x.npz")
  assert code == 1 and "--step 99" in err and "steps present: 7" in err


def test_unsupported_in_chans_is_refused_by_the_parser(workdir, tmp_path, capsys):
  path, _ = workdir
  with pytest.raises(SystemExit) as exit_info:
    main(["--workdir", str(path), "--format", "timm", "--in-chans", "2",
          "--out", str(tmp_path / "x.safetensors")])
  assert exit_info.value.code == 2
  assert "--in-chans" in capsys.readouterr().err


def test_medical_mae_needs_three_channels(workdir, tmp_path, capsys):
  path, _ = workdir
  code, _, err = run_cli(capsys, "--workdir", path, "--format", "medical_mae", "--in-chans", 1,
                         "--out", tmp_path / "x.pth")
  assert code == 1 and "--in-chans 1" in err and "3 input channels" in err


@pytest.mark.parametrize("fmt,name", [("timm", "x.pt"), ("npz", "x.bin"),
                                      ("medical_mae", "x.safetensors")])
def test_wrong_output_suffix_is_named(workdir, tmp_path, capsys, fmt, name):
  path, _ = workdir
  code, _, err = run_cli(capsys, "--workdir", path, "--format", fmt, "--out", tmp_path / name)
  assert code == 1 and "--out" in err and name in err
  assert not (tmp_path / name).exists()


def test_checkpoint_that_does_not_fit_config_json_is_named(workdir, tmp_path, capsys):
  """An edited or mismatched config.json must fail at export, not later in PyTorch."""
  path, _ = workdir
  info = json.loads((path / "config.json").read_text())
  info["model"]["variant"] = "Ti/16"
  other = tmp_path / "workdir"
  other.mkdir()
  (other / "config.json").write_text(json.dumps(info))
  (other / "checkpoints").symlink_to(path / "checkpoints")
  code, _, err = run_cli(capsys, "--workdir", other, "--format", "npz", "--out", tmp_path / "x.npz")
  assert code == 1 and "expects" in err and "encoder_norm" in err
