"""Demo: a small ViT in float32 on the 16 bundled real chest X-rays; minutes on 2 CPU cores.

Defined in spcl_jax/configs/demo.py (importable from the installed package, so a config of
your own in any folder can build on it); this file lets --config=configs/demo.py work.
"""

from spcl_jax.configs.demo import get_config  # noqa: F401
