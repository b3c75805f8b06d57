"""Saliency (integrated gradients per patch) of a classifier trained where only one of two
equally bright blobs decides the label: the hottest patch is the deciding blob (a ring), not the
distractor (a filled square, more input energy: what a bright-pixel map would pick)."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from spcl_jax.finetune.model import build_classifier, init_params
from spcl_jax.finetune.workloads import bce_with_logits
from spcl_jax.inference import saliency

SIZE, PATCH = 32, 8
GRID = SIZE // PATCH
MEAN, STD = 0.3, 0.25
DECIDING = DISTRACTOR = 240  # the distractor is a filled square: input energy alone points at it


def blob_images(rng: np.random.Generator, n: int):
  """Noise, a distractor blob in every image, and in positives a dimmer deciding blob, each a
  6 x 6 square inside its own random patch. Returns images, labels, and both blobs' patches."""
  images = rng.integers(40, 80, (n, SIZE, SIZE)).astype(np.uint8)
  labels = rng.integers(0, 2, n)
  cells = np.stack([rng.choice(GRID * GRID, 2, replace=False) for _ in range(n)])
  for image, label, (distractor, deciding) in zip(images, labels, cells):
    top, left = (distractor // GRID) * PATCH + 1, (distractor % GRID) * PATCH + 1
    image[top:top + 6, left:left + 6] = DISTRACTOR
    if label:
      top, left = (deciding // GRID) * PATCH + 1, (deciding % GRID) * PATCH + 1
      image[top:top + 6, left:left + 6] = DECIDING
      image[top + 2:top + 4, left + 2:left + 4] = image[top - 1, left - 1]  # a ring
  return images, labels.astype(np.float32), cells


def train(steps: int, seed: int = 0):
  config = ml_collections.ConfigDict({"model": {
      "variant": "pico/8", "image_size": SIZE, "channels": 1, "dtype": "float32",
      "attention_impl": "xla", "attention_seq_multiple": 0, "remat": "none", "pool": "avg",
      "drop_path_rate": 0.0}})
  model = build_classifier(config, 1)
  params = init_params(model, jax.random.key(0))
  tx = optax.adam(2e-3)

  def apply(params, x):
    return model.apply({"params": params}, x, train=False)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss(params):
      x = (images.astype(np.float32) / 255.0 - MEAN) / STD
      return bce_with_logits(apply(params, x)[:, 0], labels)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  rng = np.random.default_rng(seed)
  opt_state = tx.init(params)
  for _ in range(steps):
    images, labels, _ = blob_images(rng, 64)
    params, opt_state, _ = step(params, opt_state, images, labels)
  return apply, params


@pytest.fixture(scope="module")
def trained():
  return train(120)


@pytest.mark.slow  # trains a model
def test_hottest_patch_is_the_deciding_blob_not_the_brighter_one(trained):
  apply, params = trained
  images, labels, cells = blob_images(np.random.default_rng(1), 32)
  positive = labels == 1
  x = (images.astype(np.float32) / 255.0 - MEAN) / STD
  logits = np.asarray(apply(params, x))[:, 0]
  assert np.mean((logits > 0) == positive) > 0.95  # the model did learn the deciding blob
  maps = np.asarray(saliency.integrated_gradients_fn(apply, PATCH, MEAN, STD)(params, images, 0))
  assert maps.shape == (32, GRID, GRID)
  hottest = [r * GRID + c for r, c in map(saliency.hottest_patch, maps)]
  on_deciding = np.mean([h == cell for h, cell in zip(np.asarray(hottest)[positive],
                                                      cells[positive, 1])])
  # Input energy alone (what an untrained gradient map follows) points at the distractor.
  energy = saliency.patch_sums(np.abs(x), PATCH)
  on_distractor = np.mean(np.argmax(energy.reshape(32, -1), axis=1) == cells[:, 0])
  assert on_distractor == 1.0 and on_deciding > 0.9, (on_distractor, on_deciding)
  # Completeness: each map adds up to logit(image) - logit(mean-intensity image), up to the
  # path's discretisation (128 steps: within 2% of the logit's range on this sharp model).
  baseline = np.asarray(apply(params, np.zeros_like(x)))[:, 0]
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), logits - baseline, rtol=0.05,
                             atol=0.05 * np.abs(logits - baseline).max())


def test_patch_sums_match_a_loop():
  pixels = np.random.default_rng(2).normal(size=(2, 8, 12)).astype(np.float32)
  expected = np.array([[[pixels[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].sum() for j in range(3)]
                        for i in range(2)] for b in range(2)])
  np.testing.assert_allclose(np.asarray(saliency.patch_sums(pixels, 4)), expected, rtol=1e-5)
