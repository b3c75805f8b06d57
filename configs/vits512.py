"""ViT-S/16 at 512x512, mask ratio 0.6: the paper's small backbone (82.8 mAUC on CheXpert)."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = "S/16"
  config.model.image_size = 512
  config.model.dtype = "bfloat16"
  config.spcl.mask_ratio = 0.6
  config.batch_size = 1024
  config.total_steps = 100_000
  config.data.num_workers = 8
  config.evals.retrieval.every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
