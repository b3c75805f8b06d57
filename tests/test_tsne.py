"""`python -m spcl_jax.tsne`: the bundled sample (16 images) -> a PNG and one CSV row per image."""

import csv
import json

import numpy as np
import pytest

from export_fixtures import make_workdir
from spcl_jax import extract, tsne
from spcl_jax.data.datasets import manifest
from spcl_jax.data.sources import SAMPLE_DIR, FolderSource
from spcl_jax.pretrained import load_pretrained

SAMPLE_NAMES = sorted(p.name for p in SAMPLE_DIR.glob("*.png"))
NAME_LABELS = ["--name-label", "normal=No Finding", "--name-label", "bacteria|virus=Pneumonia"]


def expected_label(name):
  return "No Finding" if name.startswith("NORMAL") else "Pneumonia"


def read_rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module", autouse=True)
def one_openmp_thread():
  """scikit-learn's t-SNE threads gain nothing on 16 points, and on a busy 2-core machine
  waiting OpenMP and BLAS threads cost seconds per run."""
  import sklearn.manifold  # pylint: disable=g-import-not-at-top,unused-import
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  # Only libraries already loaded are limited: scikit-learn's OpenMP comes with its import.
  with threadpool_limits(limits=1):
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path, _ = make_workdir(tmp_path_factory.mktemp("tsne") / "pretrain", "pico/16", 64)
  return path


@pytest.fixture(scope="module")
def sample_run(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("figure") / "tsne.png"
  code = tsne.main(["--workdir", str(workdir), "--images", str(SAMPLE_DIR), "--out", str(out),
                    "--no-progress", *NAME_LABELS])
  assert code == 0
  return out


def test_sample_gives_a_png_and_one_csv_row_per_image(sample_run, capsys):
  del capsys
  assert sample_run.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(sample_run) as image:
    assert image.size[0] > 500 and len(image.getcolors(2**20)) > 50  # a drawn figure
  rows = read_rows(sample_run.with_suffix(".csv"))
  assert [r["name"] for r in rows] == SAMPLE_NAMES
  assert [r["label"] for r in rows] == [expected_label(n) for n in SAMPLE_NAMES]
  xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
  assert np.all(np.isfinite(xy)) and np.ptp(xy, axis=0).min() > 0  # spread in both axes


def test_features_file_gives_the_same_embedding(workdir, sample_run, tmp_path, capsys):
  """extract's .npz and the in-process extraction are the same features: same coordinates."""
  pretrained = load_pretrained(workdir)
  feats = extract.extract_features(pretrained, FolderSource(SAMPLE_DIR), progress=False)
  npz = extract.write_features(feats, pretrained, tmp_path / "feats.npz")
  out = tmp_path / "from_npz.png"
  assert tsne.main(["--features", str(npz), "--out", str(out), *NAME_LABELS]) == 0
  printed = capsys.readouterr().out
  assert "perplexity 30 -> 5 for 16 images" in printed
  assert "No Finding (n=8), Pneumonia (n=8)" in printed  # a tie: by name
  ours, direct = read_rows(out.with_suffix(".csv")), read_rows(sample_run.with_suffix(".csv"))
  assert [(r["name"], r["label"]) for r in ours] == [(r["name"], r["label"]) for r in direct]
  np.testing.assert_allclose([[float(r["x"]), float(r["y"])] for r in ours],
                             [[float(r["x"]), float(r["y"])] for r in direct], atol=1e-3)


def fake_prepared(path, dataset, names, codes, findings_count):
  """report.json + records.csv: all that reading a prepared folder's labels needs."""
  path.mkdir()
  (path / "report.json").write_text(json.dumps({"complete": True,
                                                "settings": {"dataset": dataset}}))
  with open(path / "records.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["name", "patient", "view", "labels"])
    for name, row in zip(names, codes):
      assert len(row) == findings_count
      writer.writerow([name, name, "PA", " ".join(str(c) for c in row)])
  return path


def test_labels_from_prepared_folders(tmp_path):
  P, N, U, B = manifest.POSITIVE, manifest.NEGATIVE, manifest.UNCERTAIN, manifest.BLANK
  nih = fake_prepared(tmp_path / "nih", "nih_chestxray14", ["a.png", "b.png", "c.png"],
                      [[N] * 14, [N] * 13 + [P], [P] * 2 + [N] * 12], 14)
  assert tsne.prepared_labels(str(nih)) == {"a.png": "No Finding", "b.png": "Disease",
                                            "c.png": "Disease"}
  # CheXpert: its own No Finding column decides (an image with no positive finding but no
  # "No Finding" either, e.g. support devices only, is not called normal).
  chexpert = fake_prepared(tmp_path / "chexpert", "chexpert", ["x.jpg", "y.jpg", "z.jpg"],
                           [[P] + [B] * 13, [B] * 13 + [P], [B, U] + [B] * 12], 14)
  assert tsne.prepared_labels(str(chexpert)) == {"x.jpg": "No Finding", "y.jpg": "Disease",
                                                 "z.jpg": "Disease"}
  rsna = fake_prepared(tmp_path / "rsna", "rsna_pneumonia", ["p", "q"], [[P], [N]], 1)
  assert tsne.prepared_labels(str(rsna)) == {"p": "Pneumonia", "q": "No Pneumonia"}


def test_prepared_labels_with_a_features_file(tmp_path, capsys):
  names = SAMPLE_NAMES[:6]
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "feats.npz", names=np.asarray(names), cls=rng.normal(size=(6, 8)))
  nih = fake_prepared(tmp_path / "nih", "nih_chestxray14", names,
                      [[manifest.NEGATIVE] * 14] * 2 + [[manifest.POSITIVE] * 14] * 4, 14)
  out = tmp_path / "t.png"
  assert tsne.main(["--features", str(tmp_path / "feats.npz"), "--data", str(nih),
                    "--out", str(out)]) == 0
  assert "Disease (n=4), No Finding (n=2)" in capsys.readouterr().out
  assert [r["label"] for r in read_rows(tmp_path / "t.csv")] == ["No Finding"] * 2 + ["Disease"] * 4


def test_labels_csv_subset_and_errors(tmp_path, capsys):
  rng = np.random.default_rng(0)
  names = [f"img{i}.png" for i in range(10)]
  np.savez(tmp_path / "feats.npz", names=np.asarray(names), cls=rng.normal(size=(10, 8)))
  (tmp_path / "labels.csv").write_text(
      "name,label\n" + "".join(f"{n},{'A' if i % 2 else 'B'}\n" for i, n in enumerate(names)))
  out = tmp_path / "t.png"
  assert tsne.main(["--features", str(tmp_path / "feats.npz"), "--labels",
                    str(tmp_path / "labels.csv"), "--out", str(out), "--max-images", "6"]) == 0
  rows = read_rows(tmp_path / "t.csv")
  assert len(rows) == 6 and len({r["name"] for r in rows}) == 6
  assert all(r["label"] == ("A" if int(r["name"][3:-4]) % 2 else "B") for r in rows)

  assert tsne.main(["--features", str(tmp_path / "feats.npz"), "--out", str(out),
                    "--name-label", "img[0-4]=low"]) == 1
  assert "--name-label: no label for image 'img5.png'" in capsys.readouterr().err
  (tmp_path / "bad.csv").write_text("file,class\n")
  assert tsne.main(["--features", str(tmp_path / "feats.npz"), "--out", str(out),
                    "--labels", str(tmp_path / "bad.csv")]) == 1
  assert "needs the columns 'name' and 'label'" in capsys.readouterr().err
  assert tsne.main(["--features", str(tmp_path / "feats.npz"), "--out", str(out),
                    "--feature", "mean_patch"]) == 1
  assert "has no 'mean_patch'" in capsys.readouterr().err


def test_perplexity_is_clamped_below_the_number_of_points():
  assert tsne.effective_perplexity(30, 16) == 5.0
  assert tsne.effective_perplexity(30, 10_000) == 30.0
  with pytest.raises(ValueError, match="at least 4 images, got 3"):
    tsne.effective_perplexity(30, 3)


def test_embedding_sees_directions_only():
  """Features are L2-normalised first: rescaling an image's feature moves nothing."""
  rng = np.random.default_rng(1)
  features = rng.normal(size=(10, 8))
  scaled = features * rng.uniform(0.1, 10.0, size=(10, 1))
  np.testing.assert_allclose(tsne.embed(scaled, 3.0, seed=0), tsne.embed(features, 3.0, seed=0),
                             atol=1e-4)
  with pytest.raises(ValueError, match="all-zero rows"):
    tsne.embed(np.zeros((5, 8)), 1.0, seed=0)
