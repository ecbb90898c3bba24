"""Checks of label images: 0 = background, objects are positive integer ids (torch-free)."""

from __future__ import annotations

import numpy as np


def check_label_image(labels: np.ndarray) -> np.ndarray:
    """``labels`` as an integer array (bool becomes int32) of shape (Y, X) or (Z, Y, X) with ids >= 0.

    Raises ``ValueError`` for another dtype, another number of dimensions or a negative id.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D (Y, X) or 3D (Z, Y, X), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    return labels
