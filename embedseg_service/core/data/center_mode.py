"""How an object's centre is chosen (:mod:`embedseg_service.core.data.centers`); numpy- and scipy-free, so
that the service's job schemas can offer the same choices."""

from __future__ import annotations

from embedseg_service.core.options import Option


class CenterMode(Option):
    """How the centre of an object is chosen."""

    medoid = "medoid"
    approximate_medoid = "approximate_medoid"
    centroid = "centroid"
