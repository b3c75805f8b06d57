"""Defaults for every S-PCL run; the variant files override what differs (Flax-examples style).

Every field can be overridden on the command line: --config.spcl.mask_ratio=0.5.
References in comments (METHOD n) are to the sections of docs/method.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 10_000
  config.batch_size = 256          # GLOBAL batch of one optimiser step (docs/method.md §5)
  # When set, batch_size = this x the devices the batch is split over (resolved at start).
  config.batch_size_per_device = ml_collections.config_dict.placeholder(int)
  config.grad_accum_steps = 1      # micro-batches per device and step (each device splits its own)
  config.accumulation = "cached"   # 'cached': exact, every negative; 'plain': per micro-batch

  config.model = ml_collections.ConfigDict()
  config.model.variant = "B/16"    # pico (ours, tests), Ti, S, B, L / patch size
  config.model.image_size = 512
  config.model.channels = 1
  config.model.dtype = "bfloat16"  # computation dtype; parameters are always float32
  # 'auto': cuDNN's fused flash attention on NVIDIA GPUs (bf16), XLA elsewhere; or 'xla', 'cudnn'
  config.model.attention_impl = "auto"
  config.model.attention_seq_multiple = 0  # pad attention's tokens to this; 0: the kernel's need
  config.model.remat = "none"      # 'none', 'full' or 'save_dots' (models/vit.REMAT_POLICIES)

  config.spcl = ml_collections.ConfigDict()
  config.spcl.mask_ratio = 0.6         # fraction of the N patches dropped (docs/method.md §2)
  config.spcl.similarity = "tsp"       # a name in losses.SIMILARITIES: 'tsp' or 'cosine'
  config.spcl.kappa = 1 / 64           # T-SP concentration (docs/method.md §4)
  config.spcl.init_temperature = 0.07  # scale s starts at 1 / 0.07
  config.spcl.max_scale = 100.0        # s = exp(min(log_s, log max_scale))
  config.spcl.learn_temperature = True
  config.spcl.negatives = "all"        # 'all' (paper eq. 2) or 'cross' (OCL)

  config.optim = ml_collections.ConfigDict()
  config.optim.base_learning_rate = 1.5e-4  # lr = base * batch_size / 256 (docs/method.md §6)
  config.optim.learning_rate = 0.0          # > 0 sets the peak lr directly instead
  config.optim.warmup_fraction = 0.05
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  config.optim.grad_clip_norm = 0.0         # 0 turns clipping off

  config.data = ml_collections.ConfigDict()
  config.data.source = "sample"    # 'sample', 'folder:PATH' (png/jpg/jpeg, 8/16-bit)
  config.data.mean = 0.5056        # per-dataset normalisation, applied on device (Medical MAE's)
  config.data.std = 0.252
  config.data.resize_filter = "bilinear"
  config.data.num_workers = 0      # grain worker processes; 0 decodes in the main process
  config.data.read_threads = 4      # decoding threads per process (PIL releases the GIL)
  config.data.prefetch_buffer_size = 8  # batches read ahead per process
  config.data.shuffle_seed = -1    # -1 uses config.seed

  config.sharding = ml_collections.ConfigDict()
  config.sharding.data = -1        # mesh axis sizes; -1 takes the devices left over
  config.sharding.fsdp = 1
  # Logical axis name -> mesh axes. 'batch' shards examples; parameters are replicated unless
  # a rule maps one of their axes (e.g. ('embed', 'fsdp') for FSDP).
  config.sharding.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", None), ("heads", None), ("kv", None),
  )

  config.log_every_steps = 50
  # Evaluators (spcl_jax/evaluators/): name -> {type, every_steps, ...}; each also runs at step
  # 0 and at the last step, and logs PREFIX + metric (prefix default: "NAME_").
  config.evals = ml_collections.ConfigDict()
  # S-PCL's own task on images it does not train on where the source has such a split
  # (prepared:...,split=train -> val): loss and pair retrieval over `batches` x batch_size images.
  config.evals.retrieval = dict(type="pair_retrieval", every_steps=1000, batches=4,
                                prefix="eval_")
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 3
  config.peak_flops_per_device = 0.0  # 0 looks the device kind up in metrics.PEAK_FLOPS
  return config
