"""Feature extraction over the mesh: every example once, in order, the same as one device."""

import jax
import numpy as np
import pytest

from export_fixtures import make_config, random_encoder_params, sample_images
from spcl_jax import features, sharding, steps
from spcl_jax.data.eval_splits import Subset
from spcl_jax.data.normalize import normalize_uint8
from spcl_jax.data.sources import SAMPLE_DIR, FolderSource
from spcl_jax.models.vit import build_encoder, encode_images

VARIANT, IMAGE_SIZE, COUNT = "pico/16", 32, 13  # 13 images: not a multiple of 8 devices


@pytest.fixture(scope="module")
def setup():
  config = make_config(VARIANT, IMAGE_SIZE)
  params = random_encoder_params(config)
  source = Subset(FolderSource(SAMPLE_DIR), range(COUNT))
  _, images = sample_images(IMAGE_SIZE, COUNT)
  model = build_encoder(config.model)
  x = normalize_uint8(images, config.data.mean, config.data.std)
  tokens = np.asarray(jax.jit(lambda p, x: encode_images(model, p, x))(params, x))
  return dict(config=config, params=params, source=source, model=model,
              reference={"cls": tokens[:, 0], "mean_patch": tokens[:, 1:].mean(axis=1)})


def _extract(setup, devices, batch_size):
  config = setup["config"]
  _, batch_sharding = features.data_parallel_mesh(devices)
  encode = features.make_encode_fn(setup["model"], config.data.mean, config.data.std,
                                   ("cls", "mean_patch"), batch_sharding)
  return features.extract(encode, setup["params"], setup["source"],
                          batch_sharding=batch_sharding, image_size=IMAGE_SIZE,
                          resize_filter="bilinear", batch_size=batch_size)


@pytest.mark.parametrize("num_devices,batch_size", [(8, 8), (1, 5)])
def test_every_example_once_in_order_whatever_the_devices(setup, num_devices, batch_size):
  assert jax.device_count() == 8
  out = _extract(setup, jax.devices()[:num_devices], batch_size)
  for pooling in ("cls", "mean_patch"):
    # 13 rows: the padding of the last batch (3 rows on 8 devices) is masked out.
    assert out[pooling].shape == (COUNT, 64)
    np.testing.assert_allclose(out[pooling], setup["reference"][pooling], atol=1e-5)


def test_batches_are_rounded_up_to_the_batch_shards():
  _, eight = features.data_parallel_mesh()
  _, one = features.data_parallel_mesh(jax.devices()[:1])
  assert [features.global_batch_size(b, eight) for b in (1, 8, 9, 30)] == [8, 8, 16, 32]
  assert features.global_batch_size(5, one) == 5


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_processes_share_out_every_row_exactly_once(process_count):
  rows = [r for t in range(3) for p in range(process_count)
          for r in features.process_rows(t, 8, p, process_count)]
  assert sorted(rows) == list(range(24))


def test_the_trainers_fsdp_sharded_parameters_give_the_same_features(setup):
  """Evaluators extract with the trainer's parameters in place (here split over fsdp=2)."""
  config = make_config(VARIANT, IMAGE_SIZE)
  config.batch_size = 8
  config.sharding.fsdp = 2
  mesh = sharding.make_mesh(config)
  training = steps.build_training(config, mesh)
  encoder_shardings = training.shardings.params["encoder"]
  params = jax.device_put(setup["params"], encoder_shardings)
  assert not params["Transformer"]["encoder_norm"]["scale"].sharding.is_fully_replicated
  batch_sharding = sharding.batch_sharding(mesh, config, 3)
  encode = features.make_encode_fn(training.model, config.data.mean, config.data.std, ("cls",),
                                   batch_sharding, encoder_shardings)
  out = features.extract(encode, params, setup["source"], batch_sharding=batch_sharding,
                         image_size=IMAGE_SIZE, resize_filter="bilinear", batch_size=8)
  np.testing.assert_allclose(out["cls"], setup["reference"]["cls"], atol=1e-5)
