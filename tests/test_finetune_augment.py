"""Fine-tuning augmentation: geometry shared by image and mask, determinism, timm parity."""

import importlib.util
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from spcl_jax.finetune import augment


def _rectangle_pair(height=96, width=80):
  """An image bright exactly where the mask is 1: an off-centre, asymmetric rectangle."""
  mask = np.zeros((height, width), np.uint8)
  mask[20:60, 10:35] = 1
  image = np.where(mask == 1, 230, 25).astype(np.uint8)
  return image, mask


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
  """Pixels within `width` pixels of a 0/1 edge: where bicubic and nearest sampling may
  disagree (half a pixel per resampling, and bicubic's ringing)."""
  padded = np.pad(mask, width, mode="edge")
  near = np.zeros_like(mask, bool)
  for dy in range(-width, width + 1):
    for dx in range(-width, width + 1):
      shifted = padded[width + dy:width + dy + mask.shape[0], width + dx:width + dx + mask.shape[1]]
      near |= shifted != mask
  return near


@pytest.mark.parametrize("ops", [None, augment.GEOMETRIC_OPS])
def test_mask_lands_on_the_image_region_after_crop_flip_and_geometric_ops(ops):
  image, mask = _rectangle_pair()
  if ops is None:  # Crop and flip only.
    transform = augment.TrainAugment(32, randaugment_magnitude=None)
  else:  # Every draw a geometric RandAugment op, at a large magnitude.
    transform = augment.TrainAugment(32, scale=(0.5, 1.0), randaugment_magnitude=9,
                                     ops=sorted(ops), op_probability=1.0, fill=0)
  checked = 0
  for seed in range(40):
    out_image, out_mask = transform(image, np.random.default_rng(seed), mask=mask)
    assert out_image.shape == out_mask.shape == (32, 32)
    assert out_image.dtype == out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 1}  # Nearest: no invented fractional labels.
    if out_mask.sum() < 20:
      continue
    bright = out_image > 127
    away_from_edges = ~_boundary(out_mask, 1 if ops is None else 2)
    disagree = bright[away_from_edges] != (out_mask[away_from_edges] == 1)
    # Crop + flip resample once: exact away from edges. Two more bicubic affine resamplings
    # blur thin corners below the threshold: a pixel or two may differ (a mask that missed
    # one rotation or shear would differ on dozens).
    assert disagree.sum() <= (0 if ops is None else 2), f"seed {seed}"
    checked += 1
  assert checked >= 15


def test_flip_happens_half_the_time():
  # scale (1, 1) on a square keeps (nearly) the whole image: the output is it or its mirror.
  ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
  transform = augment.TrainAugment(64, scale=(1.0, 1.0), randaugment_magnitude=None)
  mirrored = 0
  for seed in range(30):
    out, _ = transform(ramp, np.random.default_rng(seed))
    to_ramp = np.abs(out.astype(int) - ramp).mean()
    to_mirror = np.abs(out.astype(int) - ramp[:, ::-1]).mean()
    assert min(to_ramp, to_mirror) < 3 < max(to_ramp, to_mirror)
    mirrored += to_mirror < to_ramp
  assert 8 <= mirrored <= 22
  no_flip = augment.TrainAugment(64, scale=(1.0, 1.0), hflip=False, randaugment_magnitude=None)
  out, _ = no_flip(ramp, np.random.default_rng(0))
  assert np.abs(out.astype(int) - ramp).mean() < 3


def test_photometric_ops_leave_the_mask_alone():
  image, mask = _rectangle_pair()
  photometric = [op for op in augment.RAND_INCREASING_OPS if op not in augment.GEOMETRIC_OPS]
  plain = augment.TrainAugment(32, randaugment_magnitude=None)
  photo = augment.TrainAugment(32, randaugment_magnitude=10, magnitude_std=0, ops=photometric,
                               op_probability=1.0)
  changed = 0
  for seed in range(10):
    plain_image, plain_mask = plain(image, np.random.default_rng(seed), mask=mask)
    # The same crop and flip draws come first in both, so the geometry is the same.
    photo_image, photo_mask = photo(image, np.random.default_rng(seed), mask=mask)
    np.testing.assert_array_equal(photo_mask, plain_mask)
    changed += not np.array_equal(photo_image, plain_image)
  assert changed >= 8


def _applied_ops(monkeypatch, transform, seeds):
  """(op name, argument) per call of a RandAugment op, per image."""
  calls = []
  real_photometric, real_geometric = augment._photometric, augment._geometric
  monkeypatch.setattr(augment, "_photometric",
                      lambda name, image, arg: calls[-1].append((name, arg)) or
                      real_photometric(name, image, arg))
  monkeypatch.setattr(augment, "_geometric",
                      lambda name, image, arg, *rest: calls[-1].append((name, arg)) or
                      real_geometric(name, image, arg, *rest))
  image = np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint8)
  for seed in seeds:
    calls.append([])
    transform(image, np.random.default_rng(seed))
  return calls


def test_randaugment_draws_two_ops_each_kept_with_probability_half(monkeypatch):
  calls = _applied_ops(monkeypatch, augment.TrainAugment(16), range(600))
  counts = np.array([len(ops) for ops in calls])
  assert 0.9 < counts.mean() < 1.1 and counts.max() == 2  # Binomial(2, 1/2)
  assert {name for ops in calls for name, _ in ops} == set(augment.RAND_INCREASING_OPS)
  degrees = np.array([abs(arg) for ops in calls for name, arg in ops if name == "Rotate"])
  assert len(degrees) > 20
  # m ~ N(6, 0.5): 18 +- 1.5 degrees.
  assert 17 < degrees.mean() < 19 and 0.9 < degrees.std() < 2.1


def test_randaugment_magnitude_is_clipped_to_ten(monkeypatch):
  transform = augment.TrainAugment(16, randaugment_magnitude=10, magnitude_std=3.0,
                                   ops=["Rotate"], op_probability=1.0)
  calls = _applied_ops(monkeypatch, transform, range(50))
  degrees = np.array([abs(arg) for ops in calls for _, arg in ops])
  assert len(degrees) == 100 and degrees.max() == 30.0 and (degrees == 30.0).mean() > 0.4


def test_deterministic_for_a_seed_and_picklable():
  image = np.random.default_rng(0).integers(0, 256, (64, 72), dtype=np.uint8)
  transform = augment.TrainAugment(48)
  clone = pickle.loads(pickle.dumps(transform))
  first, _ = transform(image, np.random.default_rng(7))
  again, _ = clone(image, np.random.default_rng(7))
  np.testing.assert_array_equal(first, again)
  others = [transform(image, np.random.default_rng(seed))[0] for seed in range(8, 12)]
  assert all(not np.array_equal(first, other) for other in others)
  assert first.shape == (48, 48) and first.dtype == np.uint8


def test_train_crop_is_a_bicubic_resize_of_the_sampled_box_then_the_flip():
  image = np.random.default_rng(4).integers(0, 256, (70, 90), dtype=np.uint8)
  transform = augment.TrainAugment(40, randaugment_magnitude=None)
  for seed in range(6):
    draws = np.random.default_rng(seed)
    top, left, h, w = augment.random_resized_crop_box(70, 90, draws, (0.08, 1.0))
    expected = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize(
        (40, 40), Image.Resampling.BICUBIC))
    if draws.random() < 0.5:
      expected = expected[:, ::-1]
    np.testing.assert_array_equal(transform(image, np.random.default_rng(seed))[0], expected)


def test_crop_boxes_follow_scale_and_ratio():
  rng = np.random.default_rng(0)
  boxes = [augment.random_resized_crop_box(200, 300, rng, (0.08, 1.0)) for _ in range(500)]
  areas = np.array([h * w / (200 * 300) for _, _, h, w in boxes])
  ratios = np.array([w / h for _, _, h, w in boxes])
  assert areas.min() > 0.07 and areas.max() <= 1.0 and areas.std() > 0.15
  assert ratios.min() > 0.72 and ratios.max() < 1.38
  assert all(0 <= top <= 200 - h and 0 <= left <= 300 - w for top, left, h, w in boxes)
  # An impossible aspect ratio falls back to the largest centred crop within the ratio range.
  assert augment.random_resized_crop_box(100, 10, rng, (0.9, 1.0)) == (43, 0, 13, 10)  # 10 / (3/4)


def test_eval_transform_geometry_is_exact():
  rng = np.random.default_rng(1)
  # 256 = 224 / (224/256): no resize, so the output is exactly the centre 224 x 224.
  square = rng.integers(0, 256, (256, 256), dtype=np.uint8)
  out, mask = augment.EvalTransform(224)(square, mask=square)
  np.testing.assert_array_equal(out, square[16:240, 16:240])
  np.testing.assert_array_equal(mask, square[16:240, 16:240])
  wide = rng.integers(0, 256, (256, 301), dtype=np.uint8)  # Short side already 256.
  out, _ = augment.EvalTransform(224)(wide)
  np.testing.assert_array_equal(out, wide[16:240, 38:262])  # left = round(77 / 2) = 38
  assert augment.EvalTransform(512).resize_to == 585  # floor(512 / 0.875)
  assert augment.EvalTransform(224).output_geometry(512, 600) == ((256, 300), (16, 38))
  assert augment.EvalTransform(224).output_geometry(600, 512) == ((300, 256), (38, 16))
  out, _ = augment.EvalTransform(64)(square)
  assert out.shape == (64, 64)


def test_bad_input_is_an_error_naming_it():
  transform = augment.TrainAugment(16)
  with pytest.raises(ValueError, match="image must be a 2-D uint8"):
    transform(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0))
  with pytest.raises(ValueError, match="mask shape"):
    transform(np.zeros((8, 8), np.uint8), np.random.default_rng(0), mask=np.zeros((8, 9)))
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    augment.TrainAugment(16, ops=["Cutout"])


# --- parity with timm, whose pipeline Medical MAE runs -----------------------------------------

class _Coin:
  """A stand-in Generator whose random() is fixed: picks the sign of a signed argument."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


def _timm_auto_augment():
  """timm's auto_augment.py loaded on its own: it needs only Pillow and NumPy, whereas
  importing it through the timm package would import torch (seconds)."""
  spec = importlib.util.find_spec("timm")
  # The suite needs the torch extra (the export tests import timm too): fail, never skip.
  assert spec is not None, "timm is missing: pip install -e '.[test,torch]'"
  path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "auto_augment.py"
  module_spec = importlib.util.spec_from_file_location("timm_auto_augment_alone", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def test_ops_and_magnitude_mapping_equal_timms():
  auto_augment = _timm_auto_augment()
  assert augment.RAND_INCREASING_OPS == tuple(auto_augment._RAND_INCREASING_TRANSFORMS)
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48), dtype=np.uint8))
  for name in augment.RAND_INCREASING_OPS:
    for magnitude in (0.0, 3.7, 6.0, 9.9):  # (at 10 timm posterizes to 0 bits: Pillow refuses)
      level = magnitude / augment.MAX_MAGNITUDE
      ours = {augment._ARGUMENTS[name](level, _Coin(coin)) for coin in (0.2, 0.8)}
      timm_fn = auto_augment.LEVEL_TO_ARG[name]
      theirs = {None} if timm_fn is None else {
          timm_fn(magnitude, {"translate_pct": 0.45})[0] for _ in range(64)}
      assert ours == theirs, (name, magnitude)
      arg = max(ours, key=lambda value: -1 if value is None else abs(value))
      if name in augment.GEOMETRIC_OPS:
        ours_image = augment._geometric(name, image, arg, Image.Resampling.BICUBIC, 129)
      else:
        ours_image = augment._photometric(name, image, arg)
      args = () if arg is None else (arg,)
      theirs_image = auto_augment.NAME_TO_OP[name](
          image, *args, fillcolor=129, resample=Image.Resampling.BICUBIC)
      np.testing.assert_array_equal(np.asarray(ours_image), np.asarray(theirs_image),
                                    err_msg=f"{name} m={magnitude}")


def test_eval_transform_equals_medical_maes_torchvision_pipeline():
  from torchvision import transforms  # the `torch` extra: missing fails, never skips
  rng = np.random.default_rng(3)
  for shape, size in (((300, 280), 224), ((97, 131), 64)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    reference = transforms.Compose([
        transforms.Resize(int(size / (224 / 256)), interpolation=Image.BICUBIC),
        transforms.CenterCrop(size)])(Image.fromarray(image))
    np.testing.assert_array_equal(augment.EvalTransform(size)(image)[0], np.asarray(reference))
