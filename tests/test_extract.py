"""`python -m spcl_jax.extract`: one row per image, right names, the in-process JAX features."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from export_fixtures import (jax_cls_features, make_config, make_workdir, max_abs_diff,
                             sample_images)
from spcl_jax import extract
from spcl_jax.data import sources
from spcl_jax.data.sources import SAMPLE_DIR
from spcl_jax.pretrained import load_pretrained

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANT, IMAGE_SIZE = "pico/16", 64
SAMPLE_NAMES = sorted(p.name for p in SAMPLE_DIR.glob("*.png"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir, params = make_workdir(tmp_path_factory.mktemp("extract") / "workdir", VARIANT,
                                 IMAGE_SIZE)
  names, images = sample_images(IMAGE_SIZE, len(SAMPLE_NAMES))
  return dict(workdir=workdir, params=params, names=names, images=images,
              reference=jax_cls_features(VARIANT, IMAGE_SIZE, params, images))


@pytest.mark.slow
def test_command_on_the_bundled_folder(run, tmp_path):
  out = tmp_path / "feats.npz"
  # 16 images in batches of 5: the last batch is padded, and its padding must not leak out.
  result = subprocess.run(
      [sys.executable, "-m", "spcl_jax.extract", "--workdir", str(run["workdir"]),
       "--images", str(SAMPLE_DIR), "--out", str(out), "--batch-size", "5", "--mean-patch"],
      capture_output=True, text=True, timeout=300, check=False, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr
  assert "16/16" in result.stderr  # the progress bar reached the end
  with np.load(out) as feats:
    assert list(feats["names"]) == SAMPLE_NAMES == run["names"]
    assert feats["cls"].shape == (16, 64) and feats["mean_patch"].shape == (16, 64)
    assert int(feats["step"]) == 7 and str(feats["variant"]) == VARIANT
    diff = max_abs_diff(feats["cls"], run["reference"])
    print(f"extract vs in-process JAX CLS: max abs diff {diff:.3g}")
    assert diff <= 1e-5
    # Mean pooling must be a different feature from CLS, not a copy of it.
    assert max_abs_diff(feats["mean_patch"], feats["cls"]) > 1e-2


@pytest.mark.slow
def test_mean_patch_is_the_mean_of_the_patch_tokens(run):
  import jax  # pylint: disable=g-import-not-at-top
  from spcl_jax.models.vit import encode_images  # pylint: disable=g-import-not-at-top
  from spcl_jax.data.normalize import normalize_uint8  # pylint: disable=g-import-not-at-top
  pretrained = load_pretrained(run["workdir"])
  feats = extract.extract_features(pretrained, sources.FolderSource(SAMPLE_DIR), batch_size=16,
                                   mean_patch=True, progress=False)
  config = make_config(VARIANT, IMAGE_SIZE)
  x = normalize_uint8(run["images"], config.data.mean, config.data.std)
  with jax.default_matmul_precision("highest"):
    tokens = np.asarray(encode_images(pretrained.model, pretrained.params, x))
  assert max_abs_diff(feats["mean_patch"], tokens[:, 1:].mean(axis=1)) <= 1e-5
  assert max_abs_diff(feats["cls"], tokens[:, 0]) <= 1e-5


@pytest.mark.slow
def test_data_goes_through_open_source_with_the_split(run, monkeypatch, tmp_path):
  """--data is wired through `open_source('prepared:...')`, whatever reads it underneath."""
  opened = []

  def fake_prepared(argument):
    opened.append(argument)
    return sources.FolderSource(SAMPLE_DIR)

  monkeypatch.setitem(sources._SOURCE_KINDS, "prepared", fake_prepared)  # pylint: disable=protected-access
  out = tmp_path / "feats.npz"
  code = extract.main(["--workdir", str(run["workdir"]), "--data", "/data/nih", "--split", "val",
                       "--out", str(out), "--no-progress"])
  assert code == 0
  assert opened == ["/data/nih,split=val"]
  with np.load(out) as feats:
    assert list(feats["names"]) == SAMPLE_NAMES


def test_split_without_data_is_refused():
  with pytest.raises(ValueError, match="--split applies to --data"):
    extract.open_images(images=str(SAMPLE_DIR), split="val")


@pytest.mark.slow
def test_undecodable_image_is_named(run, tmp_path, capsys):
  folder = tmp_path / "images"
  folder.mkdir()
  (folder / "ok.png").write_bytes((SAMPLE_DIR / SAMPLE_NAMES[0]).read_bytes())
  (folder / "broken.png").write_bytes(b"not a png")
  code = extract.main(["--workdir", str(run["workdir"]), "--images", str(folder),
                       "--out", str(tmp_path / "f.npz"), "--no-progress"])
  assert code == 1
  assert "broken.png" in capsys.readouterr().err
  assert not (tmp_path / "f.npz").exists()


@pytest.mark.slow
def test_missing_or_empty_image_folder_is_named(run, tmp_path, capsys):
  code = extract.main(["--workdir", str(run["workdir"]), "--images", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "f.npz")])
  assert code == 1 and "--images" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  code = extract.main(["--workdir", str(run["workdir"]), "--images", str(tmp_path / "empty"),
                       "--out", str(tmp_path / "f.npz")])
  assert code == 1 and "no .png/.jpg/.jpeg files" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_output_folder_fails_before_extracting(run, tmp_path, capsys):
  code = extract.main(["--workdir", str(run["workdir"]), "--images", str(SAMPLE_DIR),
                       "--out", str(tmp_path / "no" / "f.npz"), "--no-progress"])
  assert code == 2  # a usage error (spcl_jax.cli_errors)
  err = capsys.readouterr().err
  assert "--out" in err and "does not exist" in err and "16/16" not in err


@pytest.mark.slow
def test_bfloat16_extraction_stays_close_to_float32(run):
  """--dtype bfloat16 (for accelerators) computes the same features, only rounded."""
  source = sources.FolderSource(SAMPLE_DIR)
  feats = extract.extract_features(load_pretrained(run["workdir"], dtype="bfloat16"), source,
                                   batch_size=8, progress=False)
  assert feats["cls"].dtype == np.float32
  scale = np.abs(run["reference"]).max()
  diff = max_abs_diff(feats["cls"], run["reference"])
  assert 0 < diff <= 0.05 * scale  # rounded (not float32 silently), yet the same features
