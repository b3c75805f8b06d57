"""A fine-tuned model applied to image files: loading (`model`), inputs (`images`), saliency."""

import argparse


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
  """--workdir | --model and --images: what predict and explain both read."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a fine-tuning workdir (its best-on-val parameters)")
  source.add_argument("--model", help="an exported classifier, OUT.safetensors (with OUT.json)")
  parser.add_argument("--images", required=True, help="a folder, a .txt list or a .csv of files")
