"""Demo: a small ViT in float32 on the 16 bundled real chest X-rays; minutes on 2 CPU cores.

The whole method runs as on the real job (masking, partition, shared ViT, T-SP InfoNCE,
checkpoints, metrics), at 256x256 with 16x16 patches (N = 256, 51 patches per view).
"""

from spcl_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.variant = "pico/16"
  config.model.image_size = 256
  config.model.dtype = "float32"  # XLA:CPU runs bfloat16 matmuls slower than float32
  config.data.source = "sample"
  config.batch_size = 16          # all 16 images: every other image is a negative
  config.total_steps = 600
  config.optim.learning_rate = 1e-3
  config.optim.warmup_fraction = 0.1
  config.log_every_steps = 20
  config.evals.retrieval.every_steps = 100
  config.evals.retrieval.batches = 1
  # Do the features know normal from pneumonia? The label is in each bundled file name; the 16
  # images are split by patient into 9 train / 7 val images (spcl_jax/data/eval_splits.py).
  config.evals.probe = dict(type="linear_probe", every_steps=100, data="sample")
  config.evals.knn = dict(type="knn", every_steps=100, data="sample")
  config.checkpoint_every_steps = 200
  return config
