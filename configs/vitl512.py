"""ViT-L/16 at 512x512, mask ratio 0.6; remat on and parameters sharded over an fsdp axis.

Defined in spcl_jax/configs/vitl512.py (importable from the installed package, so a config of
your own in any folder can build on it); this file lets --config=configs/vitl512.py work.
"""

from spcl_jax.configs.vitl512 import get_config  # noqa: F401
