"""Benchmarks that print numbers: `python -m spcl_jax.bench train|input ...`."""
