"""ViT-S/16 at 512x512, mask ratio 0.6: the paper's small backbone (82.8 mAUC on CheXpert).

Defined in spcl_jax/configs/vits512.py (importable from the installed package, so a config of
your own in any folder can build on it); this file lets --config=configs/vits512.py work.
"""

from spcl_jax.configs.vits512 import get_config  # noqa: F401
