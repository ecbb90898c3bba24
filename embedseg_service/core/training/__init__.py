"""Training: data-derived hyper-parameters, the EmbedSeg loss, the training loop and batch-norm calibration."""
