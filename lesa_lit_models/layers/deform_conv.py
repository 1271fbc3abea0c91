"""Deformable convolution (DCN v1) with mmcv's ``DeformConv2dPack`` parameter layout.

Both papers use DCN v1 with offsets predicted by a plain convolution of the same geometry as the
main convolution (``conv_offset``, zero-initialised so a fresh layer starts as a plain conv):

* LESA's detection backbone uses mmcv's ``DCN`` (3x3, no bias on the main conv) in stages 2-4,
  including the unary branch of the LESA module.
* LIT's Deformable Token Merging uses the authors' ``DeformConv2dPack`` (2x2, stride 2) which has a
  real bias on the main convolution.

On CUDA the op is ``torchvision.ops.deform_conv2d``. Elsewhere :func:`deform_conv2d_sampled` computes the same
function with ``F.grid_sample`` (one bilinear sampling per kernel point, then one grouped matmul), whose backward
is cheaper than torchvision's on a CPU (docs/attention.md §4). Offsets use mmcv's channel layout (channel ``2n`` =
dy, ``2n + 1`` = dx of kernel point ``n``, row-major, repeated per deformable group). Under autocast the op runs in
(at least) float32, as both upstream implementations do. ``torch.onnx.export`` records the sampled form on any
device: standard ``GridSample`` (opset 16) and ``MatMul``.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from timm.layers import register_notrace_module
from timm.models import checkpoint
from torchvision.ops import deform_conv2d

__all__ = ['DeformConv2dPack', 'deform_conv2d_sampled']


def _sample_columns(x, offset, kernel_size, stride, padding, dilation):
    """Bilinear samples of every kernel point: (N, C, kh * kw, Ho, Wo), zero outside the map as in DCN."""
    batch, channels, height, width = x.shape
    kh, kw = kernel_size
    out_h, out_w = offset.shape[-2:]
    deform_groups = offset.shape[1] // (2 * kh * kw)
    offset = offset.view(batch, deform_groups, kh * kw, 2, out_h, out_w).flatten(0, 1)
    x = x.reshape(batch * deform_groups, channels // deform_groups, height, width)
    base_y = torch.arange(out_h, dtype=x.dtype, device=x.device)[:, None] * stride[0] - padding[0]
    base_x = torch.arange(out_w, dtype=x.dtype, device=x.device) * stride[1] - padding[1]
    columns = []
    for n in range(kh * kw):
        i, j = divmod(n, kw)
        y = base_y + i * dilation[0] + offset[:, n, 0]
        x_pos = base_x + j * dilation[1] + offset[:, n, 1]
        # pixel -> grid_sample coordinates (align_corners=False maps them back exactly for any size)
        grid = torch.stack([(2 * x_pos + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)
        columns.append(F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    return torch.stack(columns, dim=2).view(batch, channels, kh * kw, out_h, out_w)


def _deform_conv2d_sampled(x, offset, weight, stride, padding, dilation):
    batch, channels = x.shape[:2]
    out_channels, group_channels, kh, kw = weight.shape
    groups = channels // group_channels
    columns = _sample_columns(x, offset, (kh, kw), stride, padding, dilation)
    out_h, out_w = columns.shape[-2:]
    columns = columns.view(batch, groups, group_channels * kh * kw, out_h * out_w)
    out = weight.view(groups, out_channels // groups, group_channels * kh * kw) @ columns
    return out.view(batch, out_channels, out_h, out_w)


def deform_conv2d_sampled(
        x: torch.Tensor,
        offset: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: Tuple[int, int] = (1, 1),
        padding: Tuple[int, int] = (0, 0),
        dilation: Tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``torchvision.ops.deform_conv2d`` (DCN v1, no mask) through ``F.grid_sample`` and a grouped matmul.

    The sampled columns (kernel points x input size) are recomputed in backward rather than kept, as torchvision
    does (here with the matmul: backward runs the forward once more, checkpointed). Equal to torchvision's op up
    to floating-point rounding (tested in float64, outputs and gradients).
    """
    args = (x, offset, weight, stride, padding, dilation)
    out = checkpoint(_deform_conv2d_sampled, *args) if torch.is_grad_enabled() else _deform_conv2d_sampled(*args)
    return out if bias is None else out + bias.view(-1, 1, 1)


def _uses_torchvision_kernel(device: torch.device) -> bool:
    """torchvision's ``deform_conv2d`` on CUDA (its fused kernel); elsewhere, and in an ONNX export, the exact
    ``grid_sample`` form (it keeps no sampled columns for backward and exports with standard operators)."""
    return device.type == 'cuda' and not torch.onnx.is_in_onnx_export()


@register_notrace_module  # FX leaf: the autocast guard needs a concrete device
class DeformConv2dPack(nn.Module):
    """DCN v1 layer whose offsets come from a zero-initialised conv on the same input.

    State-dict keys: ``weight``, ``bias`` (only with ``bias=True``), ``conv_offset.weight``,
    ``conv_offset.bias``, which is the layout of mmcv's ``DeformConv2dPack`` / ``DCN`` and of LIT's
    ``DeformConv2dPack``.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: Union[int, Tuple[int, int]],
            stride: Union[int, Tuple[int, int]] = 1,
            padding: Union[int, Tuple[int, int]] = 0,
            dilation: Union[int, Tuple[int, int]] = 1,
            groups: int = 1,
            deform_groups: int = 1,
            bias: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'in_channels ({in_channels}) and out_channels ({out_channels}) '
                             f'must be divisible by groups ({groups})')
        if in_channels % deform_groups:
            raise ValueError(f'in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups})')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.conv_offset = nn.Conv2d(
            in_channels,
            deform_groups * 2 * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
            **dd,
        )
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 under autocast, fp64 stays fp64
        op = deform_conv2d if _uses_torchvision_kernel(x.device) else deform_conv2d_sampled
        with torch.autocast(device_type=x.device.type, enabled=False):
            return op(
                x.to(dtype),
                offset.to(dtype),
                self.weight.to(dtype),
                None if self.bias is None else self.bias.to(dtype),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
            )

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, '
             f'padding={self.padding}')
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.deform_groups != 1:
            s += f', deform_groups={self.deform_groups}'
        return s + f', bias={self.bias is not None}'
