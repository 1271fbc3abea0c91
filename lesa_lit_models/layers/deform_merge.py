"""Deformable Token Merging (DTM) from LIT.

Paper: `Less is More: Pay Less Attention in Vision Transformers` - https://arxiv.org/abs/2105.14217

DTM replaces the fixed 2x2 patch merging between stages: a DCN v1 convolution (kernel 2, stride 2, no
padding, a real bias) samples each 2x2 neighbourhood at learned offsets, then BatchNorm and GELU follow.
The offsets (one (dy, dx) pair per kernel point, shared by all channels) come from a plain 2x2/stride-2
conv on the same input that starts at zero, so a fresh DTM is ``conv2d(k=2, s=2) -> BN -> GELU``.

The parameter names are the upstream ones (``dconv.{weight,bias,conv_offset.*}``, ``norm_layer.*``), so
checkpoints of both LIT code bases load without renaming inside the module.
"""
from typing import Type

import torch
import torch.nn as nn

from .deform_conv import DeformConv2dPack

__all__ = ['DeformableTokenMerging']


class DeformableTokenMerging(nn.Module):
    """DTM: ``GELU(BN(DCN_k2s2(x)))`` on an NCHW map; output is ``(B, out_chs, H // 2, W // 2)``.

    The deformable convolution runs in float32 under autocast, as the authors' CUDA op did, and has no
    batch-size restriction (the upstream op crashed on odd batch sizes >= 5 through its im2col step).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dconv = DeformConv2dPack(in_chs, out_chs, kernel_size=2, stride=2, padding=0, bias=True, **dd)
        self.norm_layer = norm_layer(out_chs, **dd)  # upstream name, kept for checkpoint compatibility
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm_layer(self.dconv(x)))
