"""SIIM-ACR pneumothorax segmentation, presets :mgca (default) and :upernet512.

Defined in spcl_jax/configs/finetune/siim.py (importable from the installed package); this file
lets --config=configs/finetune/siim.py[:mgca|:upernet512] work.
"""

from spcl_jax.configs.finetune.siim import get_config  # noqa: F401
