"""Fine-tuning defaults: Medical MAE's recipe (github.com/lambert-x/medical_mae).

Sources, by file of that repository:
  main_finetune_chestxray.py  AdamW, blr 2.5e-4, lr = blr * batch / 256, weight decay 0.05,
                              layer decay 0.55, drop path 0.2, 75 epochs, 5 warmup, min lr 1e-5,
                              head init trunc_normal std 2e-5, BCEWithLogitsLoss, input 224,
                              global average pool + fc_norm, mean/std 0.5056/0.252
  FINETUNE.md                 the commands: 128 images per GPU on 8 GPUs (batch 1024)
  util/lr_decay.py            layer ids (embedding/CLS/positions 0, head last), no decay on 1-D
  util/lr_sched.py            linear warmup then half-cycle cosine, per iteration
  util/datasets.py            timm create_transform: RandomResizedCrop(scale 0.08-1), flip,
                              RandAugment rand-m6-mstd0.5-inc1; eval resize 256 + centre crop 224
Where we differ, on purpose: the checkpoint is chosen on `val` (Medical MAE chooses on test),
a class with one label value is an error (Medical MAE drops it), and the images stay 1-channel.
Also ours: the pooling (`pool='auto'`: the CLS output S-PCL trains for a pre-training workdir
or random init, 'avg' for imported MAE-style files; docs/method.md has the measurement) and the
low-label rule below, which resolves batch, epochs and the val interval from the train split's
size at start (spcl_jax/finetune/recipe.py), so every label fraction runs with this config.
Override any field: --config.label_fraction=10 --config.init=/runs/spcl_b16.
"""

import ml_collections

from spcl_jax.configs import default


def get_config(task: str, prepared: str, image_size_preset: str | None = None
               ) -> ml_collections.ConfigDict:
  pretrain = default.get_config()
  config = ml_collections.ConfigDict()
  config.task = task                  # nih14 | chexpert | rsna | siim | custom: the table column
  # classification (full fine-tuning) | linear (linear evaluation: the encoder frozen, drop path
  # off, the pooling's norm and the head trained); siim: mgca | upernet512 (configs/finetune/siim.py)
  config.protocol = "classification"
  config.init = "random"              # random | pre-training WORKDIR | .safetensors/.pth/.npz
  config.init_step = -1               # checkpoint step of a WORKDIR init; -1 = the latest
  config.label_fraction = 100         # 1 | 10 | 100 percent of the train split (nested subsets)
  config.split_scheme = "paper"       # paper (7:2:1 by patient) | official (chexpert.py) | files
  config.split_files = ml_collections.ConfigDict({"train": "", "val": "", "test": ""})
  config.chexpert_policy = "medical_mae"  # uncertain labels: medical_mae | ones | zeros
  config.classes = ""                 # "" = every class of the task; else "A,B": keep these only
  config.seed = 0
  config.epochs = 75                  # main_finetune_chestxray.py --epochs
  config.batch_size = 1024            # FINETUNE.md: 128 per GPU x 8 GPUs; the rule's ceiling
  config.val_every_epochs = 1         # resolved by the low-label rule (config.json has the value)
  config.bootstrap_samples = 1000     # test-set bootstrap resamples for the 95% interval

  # The low-label rule, resolved at start from the train split's size (written to config.json):
  # batch = the largest power of two <= train images / min_steps_per_epoch, at least
  # min_batch_size, at most batch_size; epochs raised to reach min_total_steps optimiser steps;
  # val scored every k epochs (and after the last) so that the val images scored stay within
  # val_images_per_train_image x the train images seen (+ the last pass). At 100% of the big
  # sets it changes nothing; at NIH 1% (783 images) it gives batch 64, 75 epochs of 12 steps,
  # val every 8 epochs. enabled=False runs batch_size and epochs as given.
  config.low_label = ml_collections.ConfigDict()
  config.low_label.enabled = True
  config.low_label.min_steps_per_epoch = 8
  config.low_label.min_batch_size = 16
  config.low_label.min_total_steps = 500
  config.low_label.val_images_per_train_image = 4

  config.model = ml_collections.ConfigDict()
  config.model.variant = "B/16"       # must match the init's pre-trained variant
  config.model.image_size = 224       # main_finetune_chestxray.py --input_size
  config.model.channels = 1
  config.model.dtype = "bfloat16"     # compute dtype (Medical MAE trains with AMP)
  config.model.attention_impl = "auto"
  config.model.attention_seq_multiple = 0
  config.model.remat = "none"
  # auto (resolved at start: cls for a pre-training workdir or random init, avg for an imported
  # file) | avg (models_vit.py global_pool + fc_norm, Medical MAE's) | cls (the CLS output)
  config.model.pool = "auto"
  config.model.drop_path_rate = 0.2   # main_finetune_chestxray.py --drop_path

  config.optim = ml_collections.ConfigDict()
  config.optim.base_learning_rate = 2.5e-4  # --blr; lr = blr * batch_size / 256
  config.optim.learning_rate = 0.0          # > 0 sets the peak lr directly
  config.optim.layer_decay = 0.55           # --layer_decay (util/lr_decay.py)
  config.optim.weight_decay = 0.05          # --weight_decay, none on 1-D params
  config.optim.warmup_epochs = 5            # --warmup_epochs
  config.optim.min_learning_rate = 1e-5     # --min_lr (util/lr_sched.py)
  config.optim.b1 = 0.9                     # torch AdamW defaults (betas, eps)
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.freeze_encoder = False       # True: encoder lr 0 (protocol linear sets it)

  config.data = ml_collections.ConfigDict()
  config.data.prepared = prepared     # python -m spcl_jax.data.prepare ... --out THIS
  config.data.mean = pretrain.data.mean  # Medical MAE's CXR mean/std; an S-PCL init's own win
  config.data.std = pretrain.data.std
  config.data.resize_filter = "bicubic"  # timm create_transform interpolation
  config.data.crop_scale = (0.08, 1.0)   # RandomResizedCrop scale
  config.data.hflip = True
  config.data.randaugment = True         # protocol linear and segmentation turn it off
  config.data.randaugment_magnitude = 6  # rand-m6-mstd0.5-inc1
  config.data.randaugment_magnitude_std = 0.5
  config.data.eval_crop_fraction = 224 / 256  # eval: resize to S / this (256 at 224), crop S
  config.data.num_workers = 8
  config.data.read_threads = 4
  config.data.prefetch_buffer_size = 4
  config.data.shuffle_seed = -1        # -1 uses config.seed

  config.sharding = pretrain.sharding
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000  # also at every epoch end
  config.max_checkpoints_to_keep = 2
  config.peak_flops_per_device = 0.0
  if image_size_preset is not None:
    apply_preset(config, image_size_preset)
  return config


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  """'512': input 512 (eval resize 585, the same 224/256 crop). Given as FILE.py:512."""
  if preset != "512":
    raise ValueError(f"config preset {preset!r}: the only preset is '512' (e.g. "
                     "--config=configs/finetune/nih14.py:512)")
  config.model.image_size = 512
