"""Self-contained model files (docs/method.md §9).

A checkpoint is one file written by :func:`torch.save` holding a plain dict: the network
weights, the optimiser state (for resuming), the epoch, the full training configuration,
the embedding step, the data-derived parameters (normalisation included), the training
metrics and history, the seeds and the library versions. Files are written through a temporary
file and an atomic rename, so a reader never sees half a checkpoint.

:func:`load_model` turns a file into a :class:`TrainedModel` ready for inference on any device
(a GPU-trained checkpoint loads on the CPU).
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.defaults import DEFAULT_PRECISION, DEFAULT_TTA, InferencePrecision
from embedseg_service.core.model.checkpoint_format import (
    FORMAT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    VERSION_KEY,
)
from embedseg_service.core.model.embedding import normalize_step

DEFAULT_MIN_OBJECT_SIZE = 36


def library_versions() -> dict[str, str]:
    """Versions of python, numpy, torch and this package, recorded in every checkpoint."""
    try:
        package = metadata.version("embedseg-service")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {
        "python": platform.python_version(),
        "numpy": str(np.__version__),
        "torch": str(torch.__version__),
        "embedseg-service": package,
    }


def _to_cpu(obj: Any) -> Any:
    """Move every tensor inside ``obj`` (nested dicts/lists/tuples) to the CPU (CPU tensors as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (a dict of tensors and plain Python values) to ``path`` atomically.

    The ``format``/``format_version`` marks and the library versions are added; tensors are
    moved to the CPU. The file is written to a temporary file in the same folder, flushed and
    renamed over ``path``. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(_to_cpu(dict(payload)))
    data[FORMAT_KEY] = FORMAT_NAME
    data[VERSION_KEY] = FORMAT_VERSION
    data.setdefault("versions", library_versions())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, every tensor on the CPU.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not
    one of ours or has another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign or corrupt file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not an EmbedSeg model file (cannot read it as a checkpoint: {reason})") from None
    if not isinstance(data, dict) or data.get(FORMAT_KEY) != FORMAT_NAME:
        raise ValueError(f"{path} is not an EmbedSeg model file (no {FORMAT_NAME!r} format mark)")
    version = data.get(VERSION_KEY)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} is an EmbedSeg model file of format version {version!r}; this version reads "
            f"version {FORMAT_VERSION} only (retrain, or use the release that wrote it)"
        )
    for key in REQUIRED_KEYS:
        if key not in data:
            raise ValueError(f"{path} is an incomplete EmbedSeg model file (missing {key!r})")
    return data


@dataclass
class TrainedModel:
    """A trained network with everything needed to segment new images.

    ``net`` is in eval mode on ``device``. ``step`` is in array order; ``properties`` are the
    data-derived parameters (as stored by :class:`embedseg_service.core.training.hyperparams.DataProperties`).
    """

    net: torch.nn.Module
    spatial_dims: int
    in_channels: int
    step: tuple[float, ...]
    device: torch.device
    config: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def normalization(self) -> Any:
        """:class:`embedseg_service.core.data.normalization.NormalizationSettings` the training images were normalised
        with."""
        from embedseg_service.core.data.normalization import NormalizationMode, NormalizationSettings

        props = self.properties
        value = props.get("normalization")
        if isinstance(value, Mapping):
            return NormalizationSettings.from_dict(dict(value))
        return NormalizationSettings(
            mode=NormalizationMode.parse(value or "percentile"),
            p_low=float(props.get("p_low", 1.0)),
            p_high=float(props.get("p_high", 99.8)),
        )

    @property
    def min_object_size(self) -> int:
        """Smallest object kept by clustering: the data-derived value, else 36."""
        value = self.properties.get("min_object_size")
        return int(value) if value is not None else DEFAULT_MIN_OBJECT_SIZE

    @property
    def max_seed_radius(self) -> tuple[float, ...] | None:
        """Clustering's seed radius limit from the training objects' extents (``None`` when not stored)."""
        from embedseg_service.core.training.hyperparams import max_seed_radius

        props = self.properties
        return max_seed_radius(props.get("extent_mean"), props.get("extent_std"), props.get("n_objects"))

    def normalize(self, image: np.ndarray) -> np.ndarray:
        """Normalise one channel ``(*S)`` as the training images were (float32, same shape)."""
        return self.normalization.apply(np.asarray(image)).astype(np.float32, copy=False)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Check ``image`` against the model and return it normalised with a channel axis.

        Accepts ``(*S)`` for a single-channel model or ``(C, *S)``; returns ``(C, *S)`` float32.
        """
        image = np.asarray(image)
        d = self.spatial_dims
        if image.ndim == d:
            if self.in_channels != 1:
                raise ValueError(
                    f"the model expects {self.in_channels} channels (C, {'Z, ' if d == 3 else ''}Y, X); "
                    f"got an image of shape {image.shape}"
                )
            image = image[None]
        elif image.ndim == d + 1:
            if image.shape[0] != self.in_channels:
                raise ValueError(f"the model expects {self.in_channels} channel(s) first; got shape {image.shape}")
        else:
            raise ValueError(
                f"a {d}D model needs an image with {d} spatial axes (and optionally a channel axis first); "
                f"got shape {image.shape}"
            )
        channels = [self.normalize(image[c]) for c in range(image.shape[0])]
        return np.stack(channels, axis=0).astype(np.float32, copy=False)

    def segment(
        self,
        image: np.ndarray,
        *,
        tta: bool = DEFAULT_TTA,
        tile: str | Sequence[int] | None = "auto",
        device: str | torch.device | None = None,
        progress: Callable[..., Any] | None = None,
        fg_thresh: float = 0.5,
        seed_thresh: float = 0.9,
        min_size: int | None = None,
        precision: InferencePrecision | str = DEFAULT_PRECISION,
    ) -> np.ndarray:
        """Segment one image: ``(*S)`` or ``(C, *S)`` → int32 labels ``(*S)`` (0 = background).

        Uses the model's own step, normalisation, minimum object size (``min_size`` overrides
        the latter: objects need more than that many pixels) and seed radius limit
        (:attr:`max_seed_radius`); ``tta`` combines the
        8 (2D) or 16 (3D) flips/rotations; ``tile`` is ``"auto"`` (the whole image when it fits the
        device's free memory, else the largest windows that do: the batch-norm statistics of a
        trained model are estimated on whole images, see :mod:`embedseg_service.core.training.calibration`), a tile
        shape in array order, or ``None`` (whole image); ``precision``: the network's number format
        (:class:`embedseg_service.core.inference.defaults.InferencePrecision`).
        """
        return self.segment_batch([image], tta=tta, tile=tile, device=device, progress=progress, fg_thresh=fg_thresh,
                                  seed_thresh=seed_thresh, min_size=min_size, precision=precision)[0]  # fmt: skip

    def segment_batch(
        self,
        images: Sequence[np.ndarray],
        *,
        tta: bool = DEFAULT_TTA,
        tile: str | Sequence[int] | None = "auto",
        device: str | torch.device | None = None,
        progress: Callable[..., Any] | None = None,
        fg_thresh: float = 0.5,
        seed_thresh: float = 0.9,
        min_size: int | None = None,
        precision: InferencePrecision | str = DEFAULT_PRECISION,
        batch_voxels: int | None = None,
    ) -> list[np.ndarray]:
        """Labels of each of ``images`` as :meth:`segment` gives them, in their order; images of one shape run
        through the network together, at most ``batch_voxels`` voxels at once
        (:func:`embedseg_service.core.inference.predict.segment_batch`). ``progress(done, total)``:
        ``done / total`` is the fraction of the work done."""
        from embedseg_service.core.inference.predict import segment_batch

        prepared = [self.prepare(image) for image in images]
        target = self.device if device is None else resolve_device(device)
        if target != self.device:
            self.net.to(target)
            self.device = target
        return segment_batch(
            self.net,
            prepared,
            step=self.step,
            tta=tta,
            tile=tile,
            fg_thresh=fg_thresh,
            seed_thresh=seed_thresh,
            min_size=self.min_object_size if min_size is None else min_size,
            max_radius=self.max_seed_radius,
            device=target,
            progress=progress,
            precision=precision,
            batch_voxels=batch_voxels,
        )


def build_network(spatial_dims: int, in_channels: int) -> torch.nn.Module:
    """A fresh Branched ERF-Net for ``spatial_dims`` (2 or 3) and ``in_channels``."""
    from embedseg_service.core.model.erfnet import BranchedERFNet

    return BranchedERFNet(spatial_dims, in_channels=in_channels)


def load_model(path: str | os.PathLike, device: str | torch.device | None = "auto") -> TrainedModel:
    """Load a model file for inference; the network is in eval mode on ``device`` (a 2D network on the CPU
    with its convolution weights channels-last, which the CPU's convolutions run faster).

    ``device`` is ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for a foreign or incompatible one.
    """
    data = load_checkpoint(path)
    target = resolve_device(device)
    spatial_dims = int(data["spatial_dims"])
    in_channels = int(data["in_channels"])
    if spatial_dims not in (2, 3) or in_channels < 1:
        raise ValueError(f"{path}: invalid model description (spatial_dims={spatial_dims}, in_channels={in_channels})")
    step = normalize_step(data["step"], spatial_dims)
    net = build_network(spatial_dims, in_channels)
    try:
        net.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit a {spatial_dims}D network: {exc}") from None
    net.to(target).eval()
    if target.type == "cpu" and spatial_dims == 2:
        # 2D convolutions with channels-last weights run faster on the CPU, to the same labels (benchmarks/RESULTS.md)
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # accepted at run time
    return TrainedModel(
        net=net,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        step=step,
        device=target,
        config=dict(data.get("config") or {}),
        properties=dict(data.get("properties") or {}),
        metrics=dict(data.get("metrics") or {}),
        history=list(data.get("history") or []),
        epoch=int(data.get("epoch", 0)),
        seed=data.get("seed"),
        versions=dict(data.get("versions") or {}),
        path=Path(path),
    )
