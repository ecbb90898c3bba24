"""Choice of the torch device at run time."""

from __future__ import annotations

from enum import Enum

import torch


class DeviceChoice(str, Enum):
    """Where to run: ``auto`` takes CUDA when present, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device for ``choice`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a device).

    Raises ``ValueError`` when CUDA is asked for but not available.
    """
    if isinstance(choice, torch.device):
        return choice
    if choice is None or choice == DeviceChoice.auto or choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(choice.value if isinstance(choice, DeviceChoice) else choice)
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
        return torch.device(text)
    if text == "cpu":
        return torch.device("cpu")
    valid = ", ".join(c.value for c in DeviceChoice)
    raise ValueError(f"unknown device {text!r}; valid choices: {valid} (or cuda:N)")
