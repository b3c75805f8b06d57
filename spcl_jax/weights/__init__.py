"""Weight formats: our encoder's parameters in timm's, Medical MAE's and big_vision's layouts.

  layout.py      the table between our parameter tree and timm's state dict (both directions)
  npz_format.py  big_vision's .npz arrays
  importing.py   a .safetensors / .pth / .npz file back into our encoder (fine-tuning's
                 `config.init`)

Pure format code: it reads and writes arrays and files, never a workdir. `spcl_jax.export`
writes a workdir's checkpoint through it; `spcl_jax.finetune.initialization` reads through it.
"""
