"""A fine-tuned model applied to image files: loading (`model`), inputs (`images`), saliency."""
