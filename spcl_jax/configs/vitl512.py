"""ViT-L/16 at 512x512, mask ratio 0.6; remat on and parameters sharded over an fsdp axis.

On 8 accelerators, e.g.: --config.sharding.fsdp=8 shards parameters and optimiser state 8 ways.
"""

from spcl_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.variant = "L/16"
  config.model.image_size = 512
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.spcl.mask_ratio = 0.6
  config.batch_size = 512
  config.total_steps = 100_000
  config.data.num_workers = 8
  config.evals.retrieval.every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
