"""Argument types of the ``embedseg`` command line: each parses one option's text or raises
``argparse.ArgumentTypeError`` saying what is expected."""

from __future__ import annotations

import argparse


def int_list(text: str, what: str) -> tuple[int, ...]:
    """Integers separated by commas or ``x`` (``"64,64"``, ``"16x64x64"``)."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    return values


def float_list(text: str, what: str) -> tuple[float, ...]:
    """Numbers separated by commas."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    return values


def crop_size(text: str) -> str | int:
    """``auto`` or a positive multiple of 8."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--crop-size must be 'auto' or a multiple of 8, got {text!r}") from None
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"--crop-size must be a positive multiple of 8, got {value}")
    return value


def tile(text: str) -> str | tuple[int, ...] | None:
    """``auto``, ``none``/``off`` (whole images) or Y,X / Z,Y,X sizes, each a positive multiple of 8."""
    if text == "auto":
        return "auto"
    if text in ("none", "off"):
        return None
    values = int_list(text, "--tile")
    if len(values) not in (2, 3) or any(v < 8 or v % 8 for v in values):
        raise argparse.ArgumentTypeError(
            f"--tile must be 'auto', 'none' or Y,X / Z,Y,X sizes, each a positive multiple of 8; got {text!r}"
        )
    return values


def voxel_size(text: str) -> tuple[float, ...]:
    """2 or 3 positive numbers in array order."""
    values = float_list(text, "--voxel-size")
    if len(values) not in (2, 3) or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--voxel-size must be 2 or 3 positive numbers (Z,Y,X or Y,X), got {text!r}")
    return values


def thresholds(text: str) -> tuple[float, ...]:
    """IoU thresholds in (0, 1]."""
    values = float_list(text, "--thresholds")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--thresholds must lie in (0, 1], got {text!r}")
    return values


def _int_at_least(text: str, least: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0, "non-negative")


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {value}")
    return value
