"""Input: image sources, decoding, the grain pipeline."""
