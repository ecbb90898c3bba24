"""Inference: raw outputs (whole or tiled), test-time augmentation and clustering into instance labels."""
