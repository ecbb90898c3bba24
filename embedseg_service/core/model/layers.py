"""Building blocks of the ERF-Net in 2D and 3D, chosen by ``spatial_dims`` (docs/method.md §2).

Every factory takes ``spatial_dims`` (2 or 3) and returns the matching torch layer, so one
network definition serves images ``(B, C, Y, X)`` and volumes ``(B, C, Z, Y, X)``.

In eval mode every batch normalisation is folded into the convolution before it (weights
rescaled on the fly, the parameters and state dict are unchanged) and ReLUs run in place: the
same function with fewer passes over the activations. Training mode runs the plain chain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

BN_EPS = 1e-3


def _check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_layer(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return (nn.Conv2d, nn.Conv3d)[_check_dims(spatial_dims) - 2]


def conv_transpose_layer(spatial_dims: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return (nn.ConvTranspose2d, nn.ConvTranspose3d)[_check_dims(spatial_dims) - 2]


def batch_norm(spatial_dims: int, channels: int) -> _BatchNorm:
    """Batch normalisation with ``eps = 1e-3``."""
    return (nn.BatchNorm2d, nn.BatchNorm3d)[_check_dims(spatial_dims) - 2](channels, eps=BN_EPS)


def max_pool(spatial_dims: int) -> nn.Module:
    """Max pooling, kernel 2, stride 2."""
    return (nn.MaxPool2d, nn.MaxPool3d)[_check_dims(spatial_dims) - 2](2, stride=2)


def channel_dropout(spatial_dims: int, p: float) -> nn.Module:
    """Dropout of whole channels (``Dropout2d`` / ``Dropout3d``)."""
    return (nn.Dropout2d, nn.Dropout3d)[_check_dims(spatial_dims) - 2](p)


class _AxisConv3d(nn.Conv3d):
    """A ``(3, 1, 1)`` or ``(1, 1, 3)`` 3D convolution run on the CPU as a 2D one over a view of its input.

    Along Z the volume is a ``(Z, Y·X)`` image, along X a ``(Z·Y, X)`` one; a length-3 kernel on one axis
    never reaches across the merged axes, so the result is the 3D convolution's. The CPU's 2D kernels
    are faster than its 3D ones on these shapes (``benchmarks/RESULTS.md``).
    """

    def __init__(self, channels: int, axis: int, dilation: int) -> None:
        def along(value: int, other: int) -> tuple[int, int, int]:
            return (value if axis == 0 else other, value if axis == 1 else other, value if axis == 2 else other)

        super().__init__(channels, channels, along(3, 1), padding=along(dilation, 0), dilation=along(dilation, 1))
        self.axis = axis

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.device.type != "cpu" or self.axis == 1 or not x.is_contiguous():
            return super()._conv_forward(x, weight, bias)
        b, c, z, y, xs = x.shape
        d = self.dilation[self.axis]
        if self.axis == 0:
            out = F.conv2d(x.view(b, c, z, y * xs), weight.view(*weight.shape[:2], 3, 1), bias,
                           padding=(d, 0), dilation=(d, 1))  # fmt: skip
        else:
            out = F.conv2d(x.view(b, c, z * y, xs), weight.view(*weight.shape[:2], 1, 3), bias,
                           padding=(0, d), dilation=(1, d))  # fmt: skip
        return out.view(b, -1, z, y, xs)


def axis_conv(spatial_dims: int, channels: int, axis: int, dilation: int = 1) -> nn.Conv2d | nn.Conv3d:
    """A length-3 convolution along one spatial ``axis`` (0 = first spatial axis), size preserving."""
    if axis not in range(_check_dims(spatial_dims)):
        raise ValueError(f"axis must be a spatial axis (0 to {spatial_dims - 1}), got {axis!r}")
    if spatial_dims == 3:
        return _AxisConv3d(channels, axis, dilation)

    def along(value: int, other: int) -> tuple[int, int]:
        return (value if axis == 0 else other, value if axis == 1 else other)

    return nn.Conv2d(
        channels, channels, along(3, 1), stride=1, padding=along(dilation, 0), dilation=along(dilation, 1), bias=True
    )


def _bn_scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode."""
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        raise ValueError("a batch norm without running statistics cannot be folded into a convolution")
    scale = bn.weight / torch.sqrt(var + bn.eps)
    return scale, bn.bias - mean * scale


def _folded(conv: _ConvNd, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``conv`` followed by ``x * scale + shift`` per output channel."""
    view = [1] * conv.weight.dim()
    view[1 if conv.transposed else 0] = -1
    weight = conv.weight * scale.view(view)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias


def conv_bn(conv: nn.Module, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))``; in eval mode as one convolution with the batch norm folded into it.

    ``conv`` is a ``Conv2d``/``Conv3d`` or ``ConvTranspose2d``/``ConvTranspose3d``.
    """
    if bn.training or bn.running_mean is None:
        return bn(conv(x))
    scale, shift = _bn_scale_shift(bn)
    if isinstance(conv, _ConvTransposeNd):
        weight, bias = _folded(conv, scale, shift)
        fn = F.conv_transpose2d if x.dim() == 4 else F.conv_transpose3d
        # torch types _ConvNd.padding as str | tuple; a transposed convolution refuses string padding
        return fn(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups,  # type: ignore[arg-type]
                  conv.dilation)  # fmt: skip
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"conv_bn folds a batch norm into a convolution, got {type(conv).__name__}")
    weight, bias = _folded(conv, scale, shift)
    return conv._conv_forward(x, weight, bias)


class Down(nn.Module):
    """Downsampler: concat[stride-2 conv (``out - in`` channels), max-pool of the input] → BN → ReLU.

    ``(B, in, *S)`` → ``(B, out, *S/2)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels <= in_channels:
            raise ValueError(f"Down needs out_channels > in_channels, got {in_channels} -> {out_channels}")
        self.conv = conv_layer(spatial_dims)(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=True)
        self.pool = max_pool(spatial_dims)
        self.bn = batch_norm(spatial_dims, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))
        n_conv = self.conv.out_channels
        scale, shift = _bn_scale_shift(self.bn)
        view = (1, -1) + (1,) * (x.dim() - 2)
        conv = self.conv._conv_forward(x, *_folded(self.conv, scale[:n_conv], shift[:n_conv]))
        pooled = torch.addcmul(shift[n_conv:].view(view), self.pool(x), scale[n_conv:].view(view))
        return F.relu_(torch.cat([conv, pooled], dim=1))


class NonBottleneck1d(nn.Module):
    """Residual block of factorised length-3 convolutions (one per spatial axis, array order).

    Half 1: axis convs with ReLU between them, BN, ReLU. Half 2: the same convs dilated by
    ``dilation``, BN; channel dropout when ``dropout > 0``; output ``ReLU(half2 + input)``.
    Shape preserving: ``(B, C, *S)`` → ``(B, C, *S)``.
    """

    def __init__(self, spatial_dims: int, channels: int, dropout: float, dilation: int) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(axis_conv(spatial_dims, channels, a) for a in range(spatial_dims))
        self.bn1 = batch_norm(spatial_dims, channels)
        self.convs2 = nn.ModuleList(axis_conv(spatial_dims, channels, a, dilation) for a in range(spatial_dims))
        self.bn2 = batch_norm(spatial_dims, channels)
        self.dropout = channel_dropout(spatial_dims, dropout) if dropout > 0 else None

    @staticmethod
    def _convs(convs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(convs):
            if i:
                x = F.relu(x)
            x = conv(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn1.training:
            out = F.relu(self.bn1(self._convs(self.convs1, x)))
            out = self.bn2(self._convs(self.convs2, out))
            if self.dropout is not None:
                out = self.dropout(out)
            return F.relu(out + x)
        out = x
        for convs, bn in ((self.convs1, self.bn1), (self.convs2, self.bn2)):
            for conv in convs[:-1]:
                out = F.relu_(conv(out))
            out = conv_bn(convs[-1], bn, out)
            if bn is self.bn1:
                out = F.relu_(out)
        if self.dropout is not None:
            out = self.dropout(out)
        out += x
        return F.relu_(out)


class Up(nn.Module):
    """Upsampler: transposed conv k3 s2 p1 output_padding 1 → BN → ReLU; ``*S`` → ``2*S``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_transpose_layer(spatial_dims)(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=True
        )
        self.bn = batch_norm(spatial_dims, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))) if self.bn.training else F.relu_(conv_bn(self.conv, self.bn, x))
