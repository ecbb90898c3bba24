"""The layout of a model file, shared by its writer and by readers that must not import torch.

A model file is the zip archive :func:`torch.save` writes; its pickle member holds one plain
dict whose :data:`FORMAT_KEY` is :data:`FORMAT_NAME` and whose :data:`VERSION_KEY` is
:data:`FORMAT_VERSION`. Every file has the :data:`REQUIRED_KEYS`; the :data:`DESCRIPTION_KEYS`
hold plain data that describes the model. :mod:`embedseg_service.core.model.checkpoint` writes
and loads the files; :mod:`embedseg_service.api.checkpoints` checks uploaded ones without torch.
This module imports nothing.
"""

from __future__ import annotations

FORMAT_KEY = "format"
"""Key of the mark that says the file is ours."""

FORMAT_NAME = "embedseg-service-model"
"""Value of :data:`FORMAT_KEY` in every model file."""

VERSION_KEY = "format_version"
"""Key of the layout version."""

FORMAT_VERSION = 1
"""Version of the layout written and read; files of another version are refused."""

REQUIRED_KEYS = ("state_dict", "spatial_dims", "in_channels", "step")
"""Keys every model file has: the network weights, 2 or 3, the input channel count, the embedding step."""

DESCRIPTION_KEYS = ("config", "properties", "metrics")
"""Keys of plain data describing the model: training configuration, data-derived parameters, metrics."""

PROVENANCE_KEYS = ("versions", "seed", "device", "epoch")
"""Keys of plain data saying how the file was made, when present: library versions (every file), the
training's seed, the kind of device it trained on (``cpu``, ``cuda``) and its epochs."""

PICKLE_MEMBER = "data.pkl"
"""Name of the archive member (in the archive's top folder) that :func:`torch.save` pickles the dict into."""
