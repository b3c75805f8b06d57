"""Fine-tuning configs; defined in spcl_jax/configs/finetune/ (importable from the package)."""
