"""The paper's run: ViT-B/16 at 512x512, mask ratio 0.6, MIMIC-CXR-JPG (METHOD 6).

The paper uses 600 images per GPU with 2 accumulation steps. Until accumulation lands, the
global batch must fit in one step: set --config.batch_size to 600 x your device count if memory
allows (with --config.model.remat=True if needed). Point data at your images, e.g.
  --config.data.source=folder:/data/mimic-cxr-jpg/files
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.variant = "B/16"
  config.model.image_size = 512
  config.model.dtype = "bfloat16"
  config.spcl.mask_ratio = 0.6
  config.batch_size = 600          # per optimiser step, all devices (paper: 600/GPU x accum 2)
  config.grad_accum_steps = 1      # the paper's 2 needs the scale-out work's accumulation
  config.total_steps = 100_000
  config.data.num_workers = 8
  config.log_every_steps = 50
  config.evals.retrieval.every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
