"""Branched ERF-Net for 2D images and 3D volumes (docs/method.md §1–2).

One shared encoder and two decoders: the first emits ``D`` offsets and ``D`` sigmas, the second
the seed logit; their outputs are concatenated in that order, giving ``2*D + 1`` raw channels
(x, y[, z] order inside each vector head). There are no encoder–decoder skip connections.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from embedseg_service.core.inference.tiling import NetworkStages
from embedseg_service.core.model.layers import Down, NonBottleneck1d, Up, conv_transpose_layer

SIZE_MULTIPLE = 8
"""Every spatial size fed to the network must be a multiple of this (three stride-2 stages)."""


LOCAL_LAYERS = 7
"""Encoder layers after the first that read a bounded neighbourhood: the downsamplers and the
undilated blocks at 1/4 scale. The dilated blocks after them see the whole image at 1/8 scale."""
ENCODE_HALO = 6
"""Cells (8 pixels) around a cell that the local encoder reads: 47 pixels to each side."""
DECODE_HALO = 4
"""Cells around an output pixel's cell that the decoders read: 3 before it and 4 after it."""


class Encoder(nn.Module):
    """``(B, C_in, *S)`` → ``(B, 128, *S/8)``: :meth:`local` then :meth:`context`."""

    def __init__(self, spatial_dims: int, in_channels: int) -> None:
        super().__init__()
        self.initial = Down(spatial_dims, in_channels, 16)
        layers: list[nn.Module] = [Down(spatial_dims, 16, 64)]
        layers += [NonBottleneck1d(spatial_dims, 64, 0.03, 1) for _ in range(5)]
        layers.append(Down(spatial_dims, 64, 128))
        for _ in range(2):
            layers += [NonBottleneck1d(spatial_dims, 128, 0.3, d) for d in (2, 4, 8, 16)]
        self.layers = nn.ModuleList(layers)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution stages: ``(B, C_in, *S)`` → ``(B, 128, *S/8)``, bounded receptive field."""
        x = self.initial(x)
        for layer in self.layers[:LOCAL_LAYERS]:
            x = layer(x)
        return x

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The dilated blocks at 1/8 scale: shape preserving, reading the whole grid."""
        for layer in self.layers[LOCAL_LAYERS:]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context(self.local(x))


class Decoder(nn.Module):
    """``(B, 128, *S/8)`` → ``(B, out_channels, *S)``."""

    def __init__(self, spatial_dims: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                Up(spatial_dims, 128, 64),
                NonBottleneck1d(spatial_dims, 64, 0.0, 1),
                NonBottleneck1d(spatial_dims, 64, 0.0, 1),
                Up(spatial_dims, 64, 16),
                NonBottleneck1d(spatial_dims, 16, 0.0, 1),
                NonBottleneck1d(spatial_dims, 16, 0.0, 1),
            ]
        )
        self.output_conv = conv_transpose_layer(spatial_dims)(16, out_channels, 2, stride=2, padding=0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.output_conv(x)


class BranchedERFNet(nn.Module):
    """The EmbedSeg network: ``(B, in_channels, *S)`` → ``(B, 2*D + 1, *S)`` float raw outputs.

    Channels: offsets ``[0, D)``, sigma ``[D, 2D)``, seed logit ``2D`` (vectors in x, y[, z] order).
    Each spatial size must be a positive multiple of 8. At construction the offset channels of the
    output layer have weight 0 and bias 0, the sigma channels weight 0 and bias 1; the seed branch
    keeps torch's default initialisation.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.out_channels = 2 * spatial_dims + 1
        self.encoder = Encoder(spatial_dims, self.in_channels)
        self.decoders = nn.ModuleList([Decoder(spatial_dims, 2 * spatial_dims), Decoder(spatial_dims, 1)])
        self.init_output()

    def init_output(self) -> None:
        """Offsets weight 0 / bias 0; sigma weight 0 / bias 1 (λ = e¹⁰ at the start of training)."""
        d = self.spatial_dims
        decoder = self.decoders[0]
        if not isinstance(decoder, Decoder):  # nn.ModuleList does not keep the element type
            raise TypeError(f"the first decoder is a {type(decoder).__name__}")
        conv = decoder.output_conv  # transposed conv: weight is (in, out, *k)
        bias = conv.bias
        if bias is None:
            raise ValueError("the output convolution has no bias")
        with torch.no_grad():
            conv.weight.zero_()
            bias[:d].fill_(0.0)
            bias[d : 2 * d].fill_(1.0)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *S)`` with every size a multiple of 8."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"expected a tensor (B, C, *spatial) with {self.spatial_dims} spatial axes, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        spatial = tuple(x.shape[2:])
        if any(s <= 0 or s % SIZE_MULTIPLE for s in spatial):
            raise ValueError(
                f"every spatial size must be a positive multiple of {SIZE_MULTIPLE}, got {spatial}; "
                "pad the input (embedseg_service.core.inference.predict pads and crops back automatically)"
            )

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Both decoders on encoder features ``(B, 128, *S/8)``: raw outputs ``(B, 2*D + 1, *S)``."""
        return torch.cat([decoder(features) for decoder in self.decoders], dim=1)

    def stages(self) -> NetworkStages:
        """The network split for exact tiled prediction
        (:func:`embedseg_service.core.inference.tiling.predict_tiled`)."""
        return NetworkStages(encode=self.encoder.local, context=self.encoder.context, decode=self.decode,
                             cell=SIZE_MULTIPLE, encode_halo=ENCODE_HALO, decode_halo=DECODE_HALO)  # fmt: skip

    def context_steps(self) -> list[tuple[nn.Module, int]]:
        """The context stage as steps for prediction out of memory
        (:mod:`embedseg_service.core.inference.stream_net`): each dilated block, and the cells it reads on
        each side of a cell (one for its first convolutions, its dilation for the second ones)."""
        steps: list[tuple[nn.Module, int]] = []
        for layer in self.encoder.layers[LOCAL_LAYERS:]:
            assert isinstance(layer, NonBottleneck1d)
            first = layer.convs2[0]
            assert isinstance(first, (nn.Conv2d, nn.Conv3d))
            steps.append((layer, 1 + max(int(d) for d in first.dilation)))
        return steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.decode(self.encoder(x))


def _reference_conv_name(spatial_dims: int, axis: int, half: int) -> str:
    kernel = "x".join("3" if a == axis else "1" for a in range(spatial_dims))
    return f"conv{kernel}_{half}"


def _reference_key_map(model: BranchedERFNet) -> dict[str, str]:
    """Our state-dict key → the reference (juglab EmbedSeg) key."""
    d = model.spatial_dims
    mapping: dict[str, str] = {}
    for key in model.state_dict():
        ref = key.replace("encoder.initial.", "encoder.initial_block.", 1)
        for half in (1, 2):
            for axis in range(d):
                ref = ref.replace(f".convs{half}.{axis}.", f".{_reference_conv_name(d, axis, half)}.")
        mapping[key] = ref
    return mapping


def load_reference_state_dict(model: BranchedERFNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a reference ``BranchedERFNet`` / ``BranchedERFNet_3d`` state dict into ``model``.

    Keys may carry a ``module.`` prefix (DataParallel). The reference's unused encoder output
    head (``encoder.output_conv.*``) is skipped; any other missing, unexpected or mis-shaped
    entry raises ``ValueError``.
    """
    source = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    source = {k: v for k, v in source.items() if not k.startswith("encoder.output_conv.")}
    mapping = _reference_key_map(model)
    missing = sorted(ref for ref in mapping.values() if ref not in source)
    unexpected = sorted(set(source) - set(mapping.values()))
    if missing or unexpected:
        raise ValueError(
            f"not a reference {model.spatial_dims}D BranchedERFNet state dict with {model.in_channels} input "
            f"channel(s): missing {missing[:5]}{'…' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    ours = model.state_dict()
    converted = {}
    for key, ref in mapping.items():
        value = source[ref]
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(
                f"shape mismatch for {ref!r}: reference {tuple(value.shape)}, expected {tuple(ours[key].shape)}"
            )
        converted[key] = value
    model.load_state_dict(converted, strict=True)
