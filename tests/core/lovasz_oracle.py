"""Textbook Lovász hinge (method.md §4), the oracle of the Lovász and loss tests."""

from __future__ import annotations

import torch


def textbook_lovasz(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sort the hinge errors, take the Jaccard loss of each prefix, weight errors by its differences."""
    y = labels.to(logits.dtype)
    errors = 1 - logits * (2 * y - 1)
    errors_sorted, perm = torch.sort(errors, descending=True)
    y_sorted = y[perm]
    total = y.sum()
    jaccard = 1 - (total - torch.cumsum(y_sorted, 0)) / (total + torch.cumsum(1 - y_sorted, 0))
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return torch.dot(torch.relu(errors_sorted), grad)
