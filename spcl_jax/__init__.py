"""spcl-jax: S-PCL self-supervised pre-training of chest X-ray Vision Transformers in JAX/Flax."""

__version__ = "0.1.0"
