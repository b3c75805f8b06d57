"""The paper's run: ViT-B/16 at 512x512, mask ratio 0.6, MIMIC-CXR-JPG (docs/method.md §6).

The paper's batch: 1200 images per device and step, in 2 micro-batches of 600 (its 600 per GPU
x accumulation 2). Cached-embedding accumulation keeps all 1200 x devices images as negatives
of each other; the global batch (and the learning rate) scales with the device count. Point data
at your prepared images, e.g.
  --config.data.source=prepared:/data/prepared/mimic
"""

from spcl_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.variant = "B/16"
  config.model.image_size = 512
  config.model.dtype = "bfloat16"
  config.spcl.mask_ratio = 0.6
  config.batch_size_per_device = 1200  # global batch = 1200 x devices (paper: 600/GPU x 2)
  config.grad_accum_steps = 2
  config.accumulation = "cached"
  config.total_steps = 100_000
  config.data.num_workers = 8
  config.log_every_steps = 50
  config.evals.retrieval.every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
