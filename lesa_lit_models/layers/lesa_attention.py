""" Locally Enhanced Self-Attention (LESA)

Paper: `Locally Enhanced Self-Attention: Combining Self-Attention and Convolution as Local and Context Terms`
    - https://arxiv.org/abs/2107.05637

A unary (grouped 3x3 conv) and a binary (self-attention) term, coupled by a fusion gate; the two position
embeddings, the fused binary term and the deviations from the authors' code are described in docs/lesa.md.
"""
import math
from contextlib import contextmanager, nullcontext
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange, reduce
from timm.layers import register_notrace_module, to_2tuple
from timm.models import checkpoint as grad_checkpoint
from torch.nn.modules.batchnorm import _BatchNorm

from .attn_impl import check_attn_impl
from .deform_conv import DeformConv2dPack
from . import lesa_fused
from .lesa_rel_pos import expand_relative_logits, offset_index, relative_logits_2d, resample_rel_table

__all__ = ['Lesa', 'classification_binary_reference', 'detection_qr_binary_reference', 'POS_EMBED_TYPES']

POS_EMBED_TYPES = ('classification', 'detection_qr')


def classification_binary_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        relative: torch.Tensor,
        bn_similarity: nn.BatchNorm2d,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Binary term with the ``classification`` (1-D, flattened-token) position embedding.

    Args:
        q, k: (N, G, L, dqk) queries and keys; v: (N, G, L, dv) values.
        relative: (2*dqk+dv, 2L-1) table; ``E[c, a, b] = relative[c, a - b + L - 1]`` splits into Eq, Ek, Ev.
        bn_similarity: BatchNorm2d(3G) on the stack [qk, qr, kr] (channel t*G + g) with ``qk[g,i,j] = q_i . k_j``,
            ``qr[g,i,j] = sum_c q[c,i] Eq[c,i,j]``, ``kr[g,i,j] = sum_c k[c,j] Ek[c,j,i]``; logits: their sum.

    Returns:
        (sv, sve), each (N, G, L, dv): ``A @ v`` and ``sve[g,i,c] = sum_j A[g,i,j] Ev[c,i,j]``, A the softmax.
    """
    N, G, L, dqk = q.shape
    dv = v.shape[-1]
    embed = relative.index_select(1, offset_index(L, q.device).flatten()).view(-1, L, L)
    embed_q, embed_k, embed_v = embed.split([dqk, dqk, dv], dim=0)
    qk = q @ k.transpose(-1, -2)
    qr = torch.einsum('ngic,cij->ngij', q, embed_q)
    kr = torch.einsum('ngjc,cji->ngij', k, embed_k)
    logits = bn_similarity(torch.cat([qk, qr, kr], dim=1)).view(N, 3, G, L, L).sum(dim=1)
    attn = logits.softmax(dim=-1)
    sv = attn @ v
    sve = torch.einsum('ngij,cij->ngic', attn, embed_v)
    return sv, sve


def detection_qr_binary_reference(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        grid: Tuple[int, int],
        bn_similarity: nn.BatchNorm2d,
) -> torch.Tensor:
    """Binary term with the ``detection_qr`` (2-D, query-only) position embedding.

    Args:
        q, k: (N, G, L, dqk); v: (N, G, L, dv), L = H*W tokens in raster order over ``grid = (H, W)``.
        rel_height: (2H-1, dqk), rel_width: (2W-1, dqk), already resampled to the grid.
        bn_similarity: BatchNorm2d(2G) on the stack [qk, qr] (channel t*G + g), ``qr`` the 2-D relative logits;
            logits: their sum.

    Returns:
        ``softmax(logits, -1) @ v``: (N, G, L, dv).
    """
    N, G, L, _ = q.shape
    qk = q @ k.transpose(-1, -2)
    qr = expand_relative_logits(*relative_logits_2d(q, rel_height, rel_width, grid))
    logits = bn_similarity(torch.cat([qk, qr], dim=1)).view(N, 2, G, L, L).sum(dim=1)
    return logits.softmax(dim=-1) @ v



@contextmanager
def _running_stats_frozen(module: nn.Module):
    """Train-mode BatchNorms of ``module`` leave their running statistics as they were (momentum 0 inside)."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.training]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpoint_updating_stats_once(fn, *inputs: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """``fn(*inputs)`` recomputed in backward without updating ``owner``'s BatchNorm statistics a second time."""
    if torch.compiler.is_compiling():  # the traced recomputation applies no update (and dynamo takes no context_fn)
        return grad_checkpoint(fn, *inputs, use_reentrant=False)
    return grad_checkpoint(fn, *inputs, use_reentrant=False,
                           context_fn=lambda: (nullcontext(), _running_stats_frozen(owner)))


@register_notrace_module  # shape checks and grid-dependent tables: a leaf for FX
class Lesa(nn.Module):
    """LESA: unary conv term + binary self-attention term, coupled by a fusion gate (docs/lesa.md).

    Args:
        dim: Channels in and out (C).
        feat_size: Token grid (H, W) the binary term attends over: the *input* grid, also when ``stride`` > 1.
        stride: Average-pooling stride applied to the output.
        groups: Attention heads and groups of the unary 3x3 conv (G).
        pos_embed: ``'classification'`` (fixed grid) or ``'detection_qr'`` (any grid, tables resampled).
        deformable: Unary 3x3 conv is a DCN v1 (mmcv ``DeformConv2dPack`` layout, no bias).
        attn_impl: ``'fused'`` (default) or ``'reference'`` ``detection_qr`` binary term (same results).
        max_chunk_logits: Logits per band of the fused binary term (default: per device).
        input_reduction: Stride of this module's input w.r.t. the image; only used to word size errors.
        recompute_gate: In training, recompute the terms' norms and the fusion gate in backward instead of keeping
            their activations.
    """

    def __init__(
            self,
            dim: int,
            feat_size: Union[int, Tuple[int, int]],
            stride: int = 1,
            groups: int = 8,
            pos_embed: str = 'classification',
            deformable: bool = False,
            attn_impl: str = 'fused',
            max_chunk_logits: Optional[int] = None,
            input_reduction: Optional[int] = None,
            recompute_gate: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % (2 * groups):
            raise ValueError(f'LESA needs channels ({dim}) divisible by 2 * groups ({2 * groups}).')
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f'Unknown LESA pos_embed {pos_embed!r}; use one of {POS_EMBED_TYPES}.')
        self.dim = dim
        self.groups = groups
        self.qk_dim = dim // groups // 2
        self.v_dim = dim // groups
        self.feat_size = to_2tuple(feat_size)
        self.stride = stride
        self.pos_embed = pos_embed
        self.attn_impl = check_attn_impl(attn_impl)
        self.max_chunk_logits = max_chunk_logits
        self.input_reduction = input_reduction
        self.recompute_gate = recompute_gate
        self.grad_checkpointing = False

        # unary term
        if deformable:
            unary_conv = DeformConv2dPack(dim, dim, 3, padding=1, groups=groups, bias=False, **dd)
        else:
            unary_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=groups, bias=False, **dd)
        self.x_transform = nn.Sequential(unary_conv, nn.Conv2d(dim, dim, 1, bias=False, **dd))
        self.bn_x = nn.BatchNorm2d(dim, **dd)

        # binary term
        self.qkv_transform = nn.Conv1d(dim, 2 * dim, 1, bias=False, **dd)
        self.bn_qkv = nn.BatchNorm1d(2 * dim, **dd)
        num_terms = 3 if pos_embed == 'classification' else 2
        self.bn_similarity = nn.BatchNorm2d(num_terms * groups, **dd)
        self.bn_output = nn.BatchNorm1d(2 * dim if pos_embed == 'classification' else dim, **dd)
        H, W = self.feat_size
        if pos_embed == 'classification':
            self.relative = nn.Parameter(torch.empty(2 * self.qk_dim + self.v_dim, 2 * H * W - 1, **dd))
        else:
            self.rel_height = nn.Parameter(torch.empty(2 * H - 1, self.qk_dim, **dd))
            self.rel_width = nn.Parameter(torch.empty(2 * W - 1, self.qk_dim, **dd))

        # fusion gate
        self.reasoning = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * dim, dim, 1, bias=False, **dd),
            nn.BatchNorm2d(dim, **dd),
            nn.ReLU(inplace=True),
        )
        self.projection = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False, **dd), nn.BatchNorm2d(dim, **dd))
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()

        self.reset_parameters()

    def reset_parameters(self):
        """Authors' init of the attention weights."""
        nn.init.normal_(self.qkv_transform.weight, 0., math.sqrt(1. / self.dim))
        if self.pos_embed == 'classification':
            nn.init.normal_(self.relative, 0., math.sqrt(1. / self.v_dim))
        else:
            nn.init.normal_(self.rel_height, 0., self.qk_dim ** -0.5)
            nn.init.normal_(self.rel_width, 0., self.qk_dim ** -0.5)

    def _check_grid(self, H: int, W: int):
        r = self.input_reduction
        if self.pos_embed == 'classification' and (H, W) != self.feat_size:
            fH, fW = self.feat_size
            sizes = f' ({fH * r}x{fW * r} pixel images)' if r else ''
            got = f' (from {H * r}x{W * r} pixel images)' if r else ''
            raise ValueError(
                f'The LESA classification position embedding is tied to a {fH}x{fW} token grid{sizes}; got a '
                f'{H}x{W} grid{got}. Resize or crop the inputs to the supported size.')
        if self.stride > 1 and (H % self.stride or W % self.stride):
            need = f'image sides that are multiples of {r * self.stride} pixels' if r else 'an even grid'
            raise ValueError(
                f'A stride-{self.stride} LESA block needs a token grid divisible by {self.stride}, i.e. {need}; '
                f'got a {H}x{W} grid. Pad or resize the input.')

    def unary_pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Local term before its norm ``bn_x``: (N, C, H, W) -> (N, C, H, W)."""
        return self.x_transform(x)

    def binary_pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Context term before its norm ``bn_output``: (N, C, H, W) -> (N, C, L) (``classification``: (N, 2C, L))."""
        N, C, H, W = x.shape
        qkv = self.bn_qkv(self.qkv_transform(x.flatten(2)))
        # channels are group-major: g * (2dqk + dv) + [q | k | v]
        q, k, v = rearrange(qkv, 'n (g c) l -> n g l c', g=self.groups).split(
            [self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        if self.pos_embed == 'classification':
            sv, sve = classification_binary_reference(q, k, v, self.relative, self.bn_similarity)
            # bn_output channel 2 * (g * dv + c) + t normalises term t (sv, sve) of output channel g * dv + c
            return rearrange(torch.stack([sv, sve], dim=-1), 'n g l c t -> n (g c t) l')
        rel_height = resample_rel_table(self.rel_height, 2 * H - 1)
        rel_width = resample_rel_table(self.rel_width, 2 * W - 1)
        if self.attn_impl == 'fused' and lesa_fused.can_fold(self.bn_similarity):
            sv = lesa_fused.detection_qr_binary(
                q, k, v, rel_height, rel_width, (H, W), self.bn_similarity, self.max_chunk_logits)
        else:
            sv = detection_qr_binary_reference(q, k, v, rel_height, rel_width, (H, W), self.bn_similarity)
        return rearrange(sv, 'n g l c -> n (g c) l')  # a view of the fused term's output

    def fuse(self, unary: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        """``U + sigmoid(projection(reasoning([U, B]))) * B`` with ``U = bn_x(unary)``, ``B = bn_output(binary)``."""
        unary = self.bn_x(unary)
        binary = self.bn_output(binary)
        if self.pos_embed == 'classification':
            binary = reduce(binary, 'n (c t) l -> n c l', 'sum', t=2)
        binary = binary.reshape(unary.shape)
        gate = torch.sigmoid(self.projection(self.reasoning(torch.cat([unary, binary], dim=1))))
        return unary + gate * binary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_grid(x.shape[-2], x.shape[-1])
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # the authors' with_cp_UB_terms_only
            unary = _checkpoint_updating_stats_once(self.unary_pre_norm, x, owner=self)
            binary = _checkpoint_updating_stats_once(self.binary_pre_norm, x, owner=self)
        else:
            unary = self.unary_pre_norm(x)
            binary = self.binary_pre_norm(x)
        if self.recompute_gate and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return self.pool(_checkpoint_updating_stats_once(self.fuse, unary, binary, owner=self))
        return self.pool(self.fuse(unary, binary))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, feat_size={self.feat_size}, stride={self.stride}, groups={self.groups}, '
                f'pos_embed={self.pos_embed!r}, attn_impl={self.attn_impl!r}')
