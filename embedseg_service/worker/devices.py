"""How a worker process names its device, for the ``workers`` table and for the jobs it runs.

``cuda:N`` is the device as this process numbers its visible ones, with ``CUDA_VISIBLE_DEVICES``
appended when that is set (``embedseg worker --gpus`` pins each child process to one GPU that way,
so its jobs run on ``cuda:0 (CUDA_VISIBLE_DEVICES=1)``, the host's GPU 1); ``cpu`` otherwise.
"""

from __future__ import annotations

import os

MAX_LENGTH = 64
"""Length of the ``device`` columns (``workers.device``, ``jobs.device``)."""


def device_label(cuda_index: int | None) -> str:
    """``cuda:<cuda_index>`` (with `` (CUDA_VISIBLE_DEVICES=...)`` when that is set), or ``cpu`` for None;
    at most :data:`MAX_LENGTH` characters."""
    if cuda_index is None:
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    label = f"cuda:{cuda_index}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    return label[:MAX_LENGTH]


def job_device() -> str:
    """The device the jobs of this process run on (the handlers' ``auto``: CUDA when torch finds it), as
    :func:`device_label` names it.

    Imports torch and asks the driver whether a GPU is visible, without creating a CUDA context: call it
    in the process that runs the job (never in a process that forks job processes afterwards).
    """
    import torch

    if not torch.cuda.is_available():
        return device_label(None)
    return device_label(torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
