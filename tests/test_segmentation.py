"""SIIM segmentation: Dice metrics against NumPy references, the decoders' shapes, masks through
the data pipeline, the loss, and a run on a prepared SIIM fixture (select on val, results.json,
Table 4, resume)."""

import contextlib
import io
import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import finetune_fixtures as ff
from run_safety_fixtures import read_metrics, truncate_params
from spcl_jax import checkpoint, engine
from spcl_jax.configs.finetune import siim as siim_config
from spcl_jax.finetune import data, decoders, dice, optimizer, trainer, workloads
from spcl_jax.models.vit import build_encoder, patchify
from spcl_jax.preemption import StopRequest
from spcl_jax.report import __main__ as report_cli


# Runs here rebuild identical steps: XLA's persistent cache compiles each program once.
pytestmark = pytest.mark.usefixtures("xla_compilation_cache")


# ---- Dice metrics ------------------------------------------------------------------------------

def reference_dice(truths, predictions):
  """Each score written out image by image from its definition (no shared code with `dice`)."""
  per_image, positive = [], []
  both_total = size_total = 0
  for t, p in zip(truths, predictions):
    t, p = t.astype(bool), p.astype(bool)
    both, size = np.logical_and(t, p).sum(), t.sum() + p.sum()
    score = (1.0 if not p.any() else 0.0) if not t.any() else 2.0 * both / size
    per_image.append(score)
    if t.any():
      positive.append(score)
    both_total += both
    size_total += size
  return {"dice_per_image": np.mean(per_image), "dice_positive": np.mean(positive),
          "dice_global": 2.0 * both_total / size_total}


def random_masks(rng, n, size=16):
  masks = np.zeros((n, size, size), bool)
  for i in range(n):
    if rng.random() < 0.6:
      top, left = rng.integers(0, size - 4, 2)
      masks[i, top:top + rng.integers(1, 8), left:left + rng.integers(1, 8)] = True
  return masks


def test_dice_scores_and_trivial_baseline_equal_a_numpy_reference():
  rng = np.random.default_rng(0)
  truths = random_masks(rng, 40)
  predictions = random_masks(rng, 40) | (truths & (rng.random(truths.shape) < 0.7))
  predictions[np.flatnonzero(truths.any((1, 2)))[:3]] = False  # missed pneumothoraces
  # The four cases of empty truth / empty prediction all occur.
  t_empty, p_empty = ~truths.any((1, 2)), ~predictions.any((1, 2))
  for case in (t_empty & p_empty, t_empty & ~p_empty, ~t_empty & p_empty, ~t_empty & ~p_empty):
    assert case.any()
  counts = dice.image_counts(truths, predictions)
  scores = dice.dice_scores(counts)
  expected = reference_dice(truths, predictions)
  assert scores == pytest.approx(expected, rel=1e-12)
  trivial = dice.trivial_scores(counts)
  assert trivial == pytest.approx(reference_dice(truths, np.zeros_like(truths)), rel=1e-12)
  # All-empty prediction: per-image Dice = the share of empty truths; positives and global 0.
  assert trivial["dice_per_image"] == pytest.approx(t_empty.mean())
  assert trivial["dice_positive"] == 0.0 and trivial["dice_global"] == 0.0


def test_dice_edge_cases():
  empty = np.zeros((2, 4, 4), bool)
  full = np.ones((2, 4, 4), bool)
  assert dice.dice_scores(dice.image_counts(empty, empty))["dice_per_image"] == 1.0
  assert dice.dice_scores(dice.image_counts(empty, full))["dice_per_image"] == 0.0
  assert np.isnan(dice.dice_scores(dice.image_counts(empty, full))["dice_positive"])
  assert dice.dice_scores(dice.image_counts(full, full)) == {
      "dice_per_image": 1.0, "dice_positive": 1.0, "dice_global": 1.0}
  # Threshold 0.5 on the probability, inclusive.
  assert dice.binarize(np.array([0.4999, 0.5, 0.9])).tolist() == [False, True, True]
  with pytest.raises(ValueError, match="must both be"):
    dice.image_counts(empty, full[0])


def test_segmentation_loss_is_bce_plus_batch_soft_dice():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 8, 8)).astype(np.float32)
  masks = (rng.random((3, 8, 8)) < 0.2).astype(np.uint8)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -np.mean(masks * np.log(p) + (1 - masks) * np.log(1 - p))
  soft = 1 - (2 * (p * masks).sum() + 1) / (p.sum() + masks.sum() + 1)
  task = workloads.Segmentation("mgca", bce_weight=0.3, dice_weight=2.0)
  assert float(task.loss(jnp.asarray(logits), jnp.asarray(masks))) == pytest.approx(
      0.3 * bce + 2.0 * soft, rel=1e-5)


# ---- decoders ------------------------------------------------------------------------------------

def seg_config(protocol, variant, size, blocks, channels):
  config = siim_config.get_config(protocol)
  config.model.variant, config.model.image_size = variant, size
  config.model.pyramid_blocks, config.model.decoder_channels = blocks, channels
  return config


@pytest.mark.parametrize("protocol,variant,size,blocks,channels", [
    pytest.param("upernet512", "B/16", 512, (3, 5, 7, 11), 512, marks=pytest.mark.slow),
    pytest.param("mgca", "B/16", 224, (3, 5, 7, 11), 256, marks=pytest.mark.slow),
    ("upernet512", "pico/16", 64, (0, 0, 1, 1), 32),
    ("mgca", "pico/16", 64, (0, 0, 1, 1), 32)])
def test_decoder_output_shapes_without_allocating(protocol, variant, size, blocks, channels):
  model = decoders.build_segmenter(seg_config(protocol, variant, size, blocks, channels))
  variables = jax.eval_shape(lambda k: decoders.init_segmenter(model, k), jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  assert logits.shape == (2, size, size) and logits.dtype == jnp.float32
  params = variables["params"]
  if protocol == "upernet512":
    assert model.encoder.return_blocks == blocks and not model.encoder.final_norm
    grid, width = size // 16, model.encoder.width
    # Strides 4, 8 come from transposed convs on the first two pyramid blocks.
    assert params["pyramid"]["fpn1_1"]["kernel"].shape == (2, 2, width, width)
    assert params["decoder"]["ppm_bottleneck"]["Conv_0"]["kernel"].shape[2] == (
        width + len(decoders.PPM_SCALES) * channels)
    assert grid // 2 >= 1
  else:
    assert model.encoder.return_blocks == (model.encoder.depth - 1,)
    assert "pyramid" not in params and model.encoder.final_norm


@pytest.mark.slow
def test_encoder_returns_the_configured_blocks_outputs():
  config = ml_collections.ConfigDict({"variant": "pico/16", "image_size": 32, "channels": 1,
                                      "dtype": "float32"})
  plain = build_encoder(config).clone(final_norm=False)
  picked = plain.clone(return_blocks=(1, 0, 1))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  patches = patchify(images, 16)
  positions = jnp.broadcast_to(jnp.arange(4), (2, 4))

  @jax.jit
  def both(key):  # one compilation for the three calls
    params = plain.init(key, patches, positions)
    last, state = plain.apply(params, patches, positions, capture_intermediates=True)
    return last, state, picked.apply(params, patches, positions)
  last, state, outs = both(jax.random.key(0))
  block0 = state["intermediates"]["Transformer"]["encoderblock_0"]["__call__"][0]
  np.testing.assert_allclose(outs[0], last, rtol=1e-6)
  np.testing.assert_allclose(outs[1], block0, rtol=1e-6)
  np.testing.assert_allclose(outs[2], last, rtol=1e-6)
  with pytest.raises(ValueError, match="pyramid_blocks"):
    decoders.build_segmenter(seg_config("upernet512", "pico/16", 64, (0, 1, 2, 1), 32))


def test_frozen_encoder_gets_no_update_and_decoder_full_lr():
  params = {"encoder": {"embedding": {"kernel": 1.0}, "Transformer": {
      "encoderblock_0": {"x": 1.0}}}, "decoder": {"logits": {"kernel": 1.0}},
      "pyramid": {"fpn2": {"kernel": 1.0}}}
  frozen = optimizer.lr_multipliers(params, 12, 0.65, freeze_encoder=True)
  assert jax.tree.leaves(frozen["encoder"]) == [0.0, 0.0]
  assert jax.tree.leaves(frozen["decoder"]) == [1.0] and jax.tree.leaves(frozen["pyramid"]) == [1.0]
  tuned = optimizer.lr_multipliers(params, 12, 0.65)
  assert tuned["encoder"]["Transformer"]["encoderblock_0"]["x"] == pytest.approx(0.65 ** 12)


# ---- data --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  with contextlib.redirect_stdout(io.StringIO()):
    return ff.prepared_siim(tmp_path_factory.mktemp("siim"))


def test_masks_stay_on_their_bright_region_through_the_train_pipeline(prepared):
  config = ff.finetune_config("siim", prepared, "mgca", **{"data.crop_scale": (0.3, 1.0)})
  source = data.split_sources(config)["train"]
  batches = iter(data.train_dataset(config, source))
  checked = 0
  for _ in range(3):
    batch = data.as_batch(next(batches))
    assert batch["mask"].shape == batch["image"].shape == (8, 64, 64)
    for image, mask in zip(batch["image"], batch["mask"]):
      if mask.sum() < 30:
        continue
      # The fixture's image is 230 exactly on the mask and <= 128 elsewhere; bicubic blurs a
      # pixel or two at the edges only.
      inside = mask.astype(bool) & ~np.roll(~mask.astype(bool), 2, axis=1) & \
          ~np.roll(~mask.astype(bool), -2, axis=1)
      inside &= ~np.roll(~mask.astype(bool), 2, axis=0) & ~np.roll(~mask.astype(bool), -2, axis=0)
      far = ~mask.astype(bool)
      for shift in (-2, 2):
        for axis in (0, 1):
          far &= ~np.roll(mask.astype(bool), shift, axis=axis)
      assert image[inside].min() > 180 and image[far].max() < 160
      checked += 1
  assert checked >= 6


def test_balanced_train_keeps_every_positive_and_as_many_negatives(prepared):
  config = ff.finetune_config("siim", prepared, "mgca")
  full = data.split_sources(ff.finetune_config("siim", prepared, "upernet512"))["train"]
  kept = data.split_sources(config)["train"]
  positives = int(full.targets.sum())
  assert len(full) == 35 and positives == 12
  assert kept.targets.sum() == positives and len(kept) == 2 * positives
  assert set(kept.indices) <= set(full.indices) and list(kept.indices) == sorted(kept.indices)
  config.seed = 5
  assert list(data.split_sources(config)["train"].indices) != list(kept.indices)


# ---- a run ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mgca_run(prepared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mgca_run")
  config = ff.finetune_config("siim", prepared, "mgca")
  with contextlib.redirect_stdout(io.StringIO()):
    outcome = trainer.train_and_evaluate(config, str(workdir))
  return config, workdir, outcome


def losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_mgca_run_lowers_the_loss_selects_on_val_and_writes_results(mgca_run):
  config, workdir, outcome = mgca_run
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(outcome))
  assert saved["task"] == "siim" and saved["protocol"] == "mgca"
  assert saved["metric"] == "dice_positive" and saved["classes"] == ["Pneumothorax"]
  step_losses = losses(workdir)
  assert sorted(step_losses) == list(range(1, 7))  # 24 balanced images: 3 steps x 2 epochs
  assert np.mean([step_losses[s] for s in (5, 6)]) < np.mean([step_losses[s] for s in (1, 2)])
  history = json.loads((workdir / "selection.json").read_text())["history"]
  best = max(sorted(history, key=int), key=lambda e: history[e]["dice_positive"])
  assert saved["val_best"] == {k: history[best][k] for k in saved["val_best"]}
  assert saved["test_at_best_val"]["step"] == history[best]["step"]
  for key in ("test_at_best_val", "test_at_last_epoch"):
    entry = saved[key]
    assert set(entry) == {"epoch", "step", "dice_per_image", "dice_positive", "dice_global",
                          "trivial", "num_images"}
    assert entry["num_images"] == 5
    assert set(entry["trivial"]) == set(dice.METRICS)
  info = json.loads((workdir / "config.json").read_text())
  assert info["segmenter"]["protocol"] == "mgca"
  # Per-image counts kept: the test Dice is recomputed from the CSV.
  import csv
  with open(workdir / saved["predictions"]["test_best_val"]["file"], newline="") as f:
    rows = list(csv.DictReader(f))
  counts = np.asarray([[int(r["intersection"]), int(r["true_pixels"]), int(r["predicted_pixels"])]
                       for r in rows])
  assert len(rows) == 5
  assert dice.dice_scores(counts)["dice_positive"] == saved["test_at_best_val"]["dice_positive"]
  np.testing.assert_allclose([float(r["predicted_area"]) for r in rows],
                             counts[:, 2] / config.model.image_size ** 2)


@pytest.mark.slow
def test_predict_writes_masks_that_match_the_runs_test_counts(mgca_run, tmp_path):
  import csv
  import pathlib
  from PIL import Image
  from spcl_jax import predict
  config, workdir, saved = mgca_run
  with open(workdir / saved["predictions"]["test_best_val"]["file"], newline="") as f:
    expected = {r["name"]: int(r["predicted_pixels"]) for r in csv.DictReader(f)}
  raw = pathlib.Path(config.data.prepared).parent / "raw/dicom-images-train"
  with contextlib.redirect_stdout(io.StringIO()):
    assert predict.main(["--workdir", str(workdir), "--images", str(raw),
                         "--out", str(tmp_path / "seg.csv")]) == 0
  with open(tmp_path / "seg.csv", newline="") as f:
    rows = {pathlib.Path(r["path"]).stem: r for r in csv.DictReader(f)}
  assert len(rows) == 50
  for name, pixels in expected.items():
    mask = np.asarray(Image.open(rows[name]["mask"]))
    assert mask.shape == (config.model.image_size,) * 2 and set(np.unique(mask)) <= {0, 255}
    assert int(rows[name]["predicted_pixels"]) == pixels == int((mask == 255).sum())


@pytest.mark.slow
def test_results_render_in_table_4(mgca_run):
  _, workdir, outcome = mgca_run
  built, _ = report_cli.build([str(workdir)])
  table4 = next(t for t in built if t.name == "table4")
  text = table4.csv()
  # Table 4's default Dice: per image over all images (GLoRIA, MGCA, MedKLIP)
  assert f"{100 * outcome['test_at_best_val']['dice_per_image']:.2f}" in text


class _StopAtStep3(StopRequest):
  def should_stop(self, step):
    return step == 3


@pytest.mark.slow
def test_stopped_segmentation_run_resumes_with_the_same_losses(mgca_run, tmp_path):
  config, reference_dir, reference = mgca_run
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
    patch.setattr(engine, "StopRequest", _StopAtStep3)
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"stopped_at_step": 3}
  assert checkpoint.available_steps(tmp_path) == [3]
  with contextlib.redirect_stdout(io.StringIO()):
    resumed = trainer.train_and_evaluate(config, str(tmp_path))
  assert losses(tmp_path) == losses(reference_dir)
  for key in ("val_best", "test_at_best_val", "test_at_last_epoch"):
    assert resumed[key] == reference[key]


@pytest.mark.slow
def test_a_truncated_latest_segmentation_checkpoint_falls_back_to_the_same_results(mgca_run,
                                                                                  tmp_path):
  """The engine's fallback for segmentation: the epoch-2 checkpoint cut short is moved aside,
  epoch 2 is redone from the epoch-1 checkpoint (its val score and best/ again), and the run
  ends with the uninterrupted run's results.json and selection.json, each metrics row once."""
  config, reference_dir, _ = mgca_run
  workdir = tmp_path / "run"
  shutil.copytree(reference_dir, workdir)
  (workdir / trainer.RESULTS_FILE).unlink()
  truncate_params(checkpoint.checkpoint_dir(workdir) / "6")
  with contextlib.redirect_stdout(io.StringIO()):
    trainer.train_and_evaluate(config, str(workdir))
  assert [p.name.split("-")[0] for p in (workdir / checkpoint.CORRUPT_DIR).iterdir()] == ["6"]

  def finished(folder):
    outcome = json.loads((folder / trainer.RESULTS_FILE).read_text())
    for key in ("accelerator_seconds", "git_commit"):
      outcome.pop(key)
    return outcome, json.loads((folder / trainer.SELECTION_FILE).read_text())
  assert finished(workdir) == finished(reference_dir)
  rows = [(r["step"], ",".join(sorted(set(r) - {"images_per_sec", "tflops_per_sec", "mfu"})))
          for r in read_metrics(workdir)]
  assert len(rows) == len(set(rows)) == len(read_metrics(reference_dir))


def test_seed_aggregate_of_segmentation_results_is_mean_and_std_per_dice():
  from spcl_jax.finetune import results
  def entry(base):
    return {"epoch": 2, "step": 6, "dice_per_image": base, "dice_positive": base / 2,
            "dice_global": base / 4, "num_images": 5,
            "trivial": {"dice_per_image": 0.6, "dice_positive": 0.0, "dice_global": 0.0}}
  runs = [{"metric": "dice_positive", "seeds": [s], "accelerator_seconds": 1.0,
           **{k: entry(b) for k in ("val_best", "test_at_best_val", "test_at_last_epoch")}}
          for s, b in ((0, 0.2), (1, 0.4))]
  out = results.aggregate(runs, ["seed_0/results.json", "seed_1/results.json"])
  t = out["test_at_best_val"]
  assert t["dice_positive"] == pytest.approx(0.15)
  assert t["dice_positive_std"] == pytest.approx(np.std([0.1, 0.2], ddof=1))
  assert t["trivial"] == {"dice_per_image": 0.6, "dice_positive": 0.0, "dice_global": 0.0}
  assert out["seeds"] == [0, 1]


def test_config_presets_and_their_errors():
  from spcl_jax.configuration import ConfigError
  from spcl_jax.finetune.configuration import validate_finetune_config
  mgca = siim_config.get_config()
  assert mgca.protocol == "mgca" and mgca.model.image_size == 224
  assert mgca.optim.freeze_encoder and mgca.data.balance_train and not mgca.data.randaugment
  assert mgca.data.eval_crop_fraction == 1.0  # every mask pixel is scored
  uper = siim_config.get_config("upernet512")
  assert uper.model.image_size == 512 and not uper.optim.freeze_encoder
  assert not uper.data.balance_train and uper.model.pyramid_blocks == (3, 5, 7, 11)
  with pytest.raises(ValueError, match="siim's presets"):
    siim_config.get_config("512")
  validate_finetune_config(uper)
  uper.protocol = "classification"
  with pytest.raises(ConfigError, match="config.protocol='classification'"):
    validate_finetune_config(uper)
  uper.protocol = "upernet512"
  with pytest.raises(ConfigError, match="segmentation runs on one process"):
    validate_finetune_config(uper, process_count=2)


def test_selection_is_on_the_tasks_metric(tmp_path):
  selection = trainer.Selection(tmp_path / "selection.json", "dice_positive")
  selection.history = {1: {"dice_positive": 0.2, "dice_per_image": 0.9},
                       2: {"dice_positive": 0.5, "dice_per_image": 0.1},
                       3: {"dice_positive": 0.5, "dice_per_image": 0.3}}
  assert selection.best_epoch == 2  # the first of equal ones
  selection.save()
  assert trainer.Selection(tmp_path / "selection.json", "dice_positive").best_epoch == 2


def test_a_split_without_positives_is_an_error_naming_it():
  counts = np.array([[0, 0, 0], [0, 0, 3]])
  with pytest.raises(ValueError, match="the val split has no image with a pneumothorax"):
    workloads.Segmentation("mgca").score(None, counts, ["Pneumothorax"], "the val split")


@pytest.mark.slow
def test_mgca_trains_the_decoder_on_a_frozen_encoder(mgca_run):
  _, workdir, _ = mgca_run
  assert checkpoint.available_steps(workdir) == [3, 6]
  first, _ = checkpoint.restore_params(workdir, 3)
  last, _ = checkpoint.restore_params(workdir, 6)
  for a, b in zip(jax.tree.leaves(first["encoder"]), jax.tree.leaves(last["encoder"])):
    np.testing.assert_array_equal(a, b)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first["decoder"]),
                                                    jax.tree.leaves(last["decoder"]))]
  assert all(moved)


@pytest.mark.slow
def test_export_of_a_segmentation_workdir_says_it_is_not_supported(mgca_run, tmp_path):
  from spcl_jax import export
  _, workdir, _ = mgca_run
  with pytest.raises(ValueError, match="mgca segmentation model: exporting segmentation"):
    export.export_checkpoint(workdir, "timm", tmp_path / "seg.safetensors")


def test_tokens_to_grid_drops_the_cls_and_keeps_patches_in_row_major_order():
  grid, width = 3, 2
  tokens = jnp.arange(2 * (1 + grid * grid) * width, dtype=jnp.float32).reshape(2, -1, width)
  out = decoders.tokens_to_grid(tokens, grid)
  assert out.shape == (2, grid, grid, width)
  np.testing.assert_array_equal(out[:, 0, 0], tokens[:, 1])  # the CLS (token 0) is gone
  np.testing.assert_array_equal(out[:, 2, 1], tokens[:, 1 + 2 * grid + 1])


@pytest.mark.slow
def test_upernet_fpn_levels_add_the_upsampled_coarser_levels():
  # The finest FPN output sees the coarsest level only through the top-down pathway (the
  # fused concat adds it separately, after fpn_0).
  model = decoders.UperNet(channels=32)
  rng = np.random.default_rng(0)
  levels = [jnp.asarray(rng.normal(size=(1, s, s, 8)), jnp.float32) for s in (8, 4, 2, 2)]
  variables = model.init(jax.random.key(0), levels)

  @jax.jit
  def fpn_0(levels):
    _, state = model.apply(variables, levels, capture_intermediates=(
        lambda module, _: module.name == "fpn_0"))
    return state["intermediates"]["fpn_0"]["__call__"][0]
  # (a shift by a constant would vanish in the GroupNorms: a random change does not)
  coarser = [*levels[:3], jnp.asarray(rng.normal(size=levels[3].shape), jnp.float32)]
  assert max_abs_diff_np(fpn_0(coarser), fpn_0(levels)) > 1e-3


def max_abs_diff_np(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
