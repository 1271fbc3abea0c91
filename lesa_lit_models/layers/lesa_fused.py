"""Exact, memory-lean ("fused") binary term of LESA (arXiv 2107.05637), ``detection_qr`` position embedding.

Same function, forward and backward, as ``detection_qr_binary_reference`` (which materialises the (N, 2G, L, L)
similarity stack), without any (L, L) tensor: ``bn_similarity`` is a per-channel affine map, so the logits are
``a * qk + b * qr + t``; ``t`` cancels in the softmax, ``a`` scales the queries, and ``b * qr`` is the per-query
relative logits ``rh`` (L x H), ``rw`` (L x W) of the scaled queries, formed and expanded one band of queries at a
time inside :func:`~lesa_lit_models.layers.banded_attention.banded_bias_attention` (in forward and again in
backward, so only the scaled queries are kept, not the L x (H + W) logits). In train mode the batch statistics of the
(never formed) stack are computed exactly in closed form, and the running statistics are updated as
``nn.BatchNorm2d`` does. Derivation, exactness argument and why the ``classification`` embedding has no such
form: ``docs/attention.md``.
"""
import logging
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .banded_attention import banded_bias_attention, banded_bias_attention_op
from .lesa_rel_pos import expand_relative_logits, relative_logits_2d, relative_logits_of_rows, relative_tables_2d

__all__ = ['can_fold', 'detection_qr_binary']

_logger = logging.getLogger(__name__)


def _pool_row_moments(row_mean: torch.Tensor, row_var: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per group over (n, i, j) from per-row (over j) moments of shape (N, G, L)."""
    mean = row_mean.mean(dim=(0, 2))
    var = row_var.mean(dim=(0, 2)) + (row_mean - mean[:, None]).square().mean(dim=(0, 2))
    return mean, var


def _similarity_batch_moments(
        q: torch.Tensor, k: torch.Tensor, rh: torch.Tensor, rw: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance of the 2G channels ``[qk, qr]`` over (n, i, j), without any (L, L) tensor."""
    stats_dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, rh, rw = (t.to(stats_dtype) for t in (q, k, rh, rw))
        key_mean = k.mean(dim=2, keepdim=True)  # (N, G, 1, d)
        key_centred = k - key_mean
        key_cov = key_centred.transpose(-1, -2) @ key_centred / k.shape[2]  # (N, G, d, d)
        qk_mean, qk_var = _pool_row_moments(
            (q @ key_mean.transpose(-1, -2)).squeeze(-1),
            ((q @ key_cov) * q).sum(-1),
        )
        qr_mean, qr_var = _pool_row_moments(
            rh.mean(-1) + rw.mean(-1),
            rh.var(-1, correction=0) + rw.var(-1, correction=0),
        )
    return torch.cat([qk_mean, qr_mean]), torch.cat([qk_var, qr_var])


def _is_frozen_batch_norm(norm: nn.Module) -> bool:
    """A per-channel affine map from fixed statistics, as torchvision's, timm's and transformers' frozen batch norms
    are: no submodules, ``weight``, ``bias``, ``running_mean`` and ``running_var`` tensors, no batch statistics."""
    return (not isinstance(norm, _BatchNorm) and next(norm.children(), None) is None
            and all(isinstance(getattr(norm, name, None), torch.Tensor)
                    for name in ('weight', 'bias', 'running_mean', 'running_var')))


def _uses_batch_statistics(norm: _BatchNorm) -> bool:
    return norm.training or (norm.running_mean is None and norm.running_var is None)


def _unfoldable_reason(norm: nn.Module) -> Optional[str]:
    if _is_frozen_batch_norm(norm):
        return None
    if not (isinstance(norm, _BatchNorm) and type(norm).forward in (_BatchNorm.forward, nn.SyncBatchNorm.forward)):
        return f'{type(norm).__qualname__} is neither a batch norm nor a frozen batch norm'
    if (isinstance(norm, nn.SyncBatchNorm) and _uses_batch_statistics(norm) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size(norm.process_group) > 1):
        return ('a SyncBatchNorm pooling batch statistics across processes (the fused term computes them per '
                'process)')
    return None


_reported_unfoldable = set()


def can_fold(norm: nn.Module) -> bool:
    """Whether :func:`detection_qr_binary` computes what ``norm`` (the module in the ``bn_similarity`` slot) does:
    a batch norm (batch statistics in closed form, or running ones) or a frozen batch norm. Otherwise the caller
    runs the reference term; the first such norm of each kind is logged."""
    reason = _unfoldable_reason(norm)
    if reason is not None and reason not in _reported_unfoldable:
        _reported_unfoldable.add(reason)
        _logger.warning(f'LESA bn_similarity: {reason}; these blocks run the reference binary term '
                        f'(exact, but it materialises the (N, 2G, L, L) similarity stack).')
    return reason is None


def _frozen_affine(norm: nn.Module, channels: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a frozen batch norm, read off what it computes at 0 and 1, whatever its eps and form."""
    probe = torch.arange(2, dtype=dtype, device=norm.running_mean.device).view(2, 1, 1, 1).expand(2, channels, 1, 1)
    at_zero, at_one = norm(probe).flatten(1)
    return at_one - at_zero, at_zero


def _similarity_affine(
        bn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        grid: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) that ``bn`` applies to the similarity stack, mirroring ``_BatchNorm.forward``
    (or a frozen batch norm's).

    In train mode this also updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` like
    ``nn.BatchNorm2d`` on the (N, 2G, L, L) stack would.
    """
    if _is_frozen_batch_norm(bn):
        return _frozen_affine(bn, 2 * q.shape[1], torch.promote_types(q.dtype, bn.running_mean.dtype))
    if _uses_batch_statistics(bn):
        batch, _, tokens, _ = q.shape
        count = batch * tokens * tokens
        if bn.training and count == 1:
            raise ValueError(f'Expected more than 1 value per channel when training, got N={batch}, L={tokens}.')
        if count:
            mean, var = _similarity_batch_moments(q, k, *relative_logits_2d(q, rel_height, rel_width, grid))
        else:  # an empty batch has no statistics and normalises nothing: finite stand-ins keep zero gradients
            mean, var = q.new_zeros(2 * q.shape[1]), q.new_ones(2 * q.shape[1])
        if bn.training and bn.track_running_stats:
            momentum = bn.momentum
            with torch.no_grad():
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
                    if momentum is None:
                        momentum = 1.0 / float(bn.num_batches_tracked)
                momentum = 0.0 if momentum is None else momentum
                if count:  # an empty batch leaves the running statistics as they are, as nn.BatchNorm2d does
                    bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), momentum)
                    unbiased_var = var.detach() * (count / (count - 1))
                    bn.running_var.lerp_(unbiased_var.to(bn.running_var.dtype), momentum)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _split_tables(tables: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[height_table; width_table]`` flattened over their first two dims, back to (H, H, d) and (W, W, d)."""
    height, width = grid
    return (tables[:height * height].unflatten(0, (height, height)),
            tables[height * height:].unflatten(0, (width, width)))


def _relative_bias(query_rel: torch.Tensor, tables: torch.Tensor, first_row: Union[int, torch.Tensor],
                   num_rows: int, grid: Sequence[int]) -> torch.Tensor:
    """Bias of the queries in grid rows ``[first_row, first_row + num_rows)`` against every key: the 2-D relative
    logits of their scaled queries ``query_rel[..., :-1]`` plus the logit shift ``query_rel[..., -1:]``; ``first_row``
    is a 0-d tensor in a step of the exported scan."""
    height_table, width_table = _split_tables(tables, grid)
    if isinstance(first_row, torch.Tensor):
        band_table = height_table.index_select(0, first_row + torch.arange(num_rows, device=first_row.device))
    else:
        band_table = height_table.narrow(0, first_row, num_rows)
    rh, rw = relative_logits_of_rows(query_rel[..., :-1], band_table, width_table)
    return expand_relative_logits(rh + query_rel[..., -1:], rw)


def _relative_bias_vjp(grad: torch.Tensor, query_rel: torch.Tensor, tables: torch.Tensor, first_row: int,
                       num_rows: int, grid: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_relative_bias`'s ``query_rel`` rows and ``tables``: the bias gradient summed over key
    columns (for ``rh``) and key rows (for ``rw``), through the two einsums of :func:`relative_logits_of_rows`."""
    width = grid[1]
    height_table, width_table = _split_tables(tables, grid)
    rows = slice(first_row, first_row + num_rows)
    grad = grad.unflatten(-1, grid)
    grad_rh = grad.sum(-1).unflatten(-2, (-1, width))  # (N, G, rows, W, H)
    grad_rw = grad.sum(-2).unflatten(-2, (-1, width))  # (N, G, rows, W, W)
    q_grid = query_rel[..., :-1].unflatten(-2, (-1, width))
    grad_q = torch.einsum('ngxya,xad->ngxyd', grad_rh, height_table[rows]) + torch.einsum(
        'ngxyb,ybd->ngxyd', grad_rw, width_table)
    grad_query_rel = torch.cat([grad_q, grad_rh.sum(-1, keepdim=True)], dim=-1).flatten(2, 3)
    grad_height = torch.zeros_like(height_table)
    grad_height[rows] = torch.einsum('ngxya,ngxyd->xad', grad_rh, q_grid)
    grad_width = torch.einsum('ngxyb,ngxyd->ybd', grad_rw, q_grid)
    return grad_query_rel, torch.cat([grad_height.flatten(0, 1), grad_width.flatten(0, 1)])


_relative_bias_attention = banded_bias_attention_op('lesa_relative_bias_attention', _relative_bias,
                                                    _relative_bias_vjp)


def detection_qr_binary(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        grid: Tuple[int, int],
        bn_similarity: nn.Module,
        max_chunk_logits: Optional[int] = None,
) -> torch.Tensor:
    """LESA binary term, ``detection_qr`` kind, attending in bands of query rows (see module doc).

    Args:
        q, k: (N, G, L, dqk) queries and keys; v: (N, G, L, dv) values; L = H * W tokens in raster order.
        rel_height: (2H - 1, dqk), rel_width: (2W - 1, dqk) relative tables of the grid.
        grid: (H, W).
        bn_similarity: ``BatchNorm2d(2G)`` (or a frozen batch norm, see :func:`can_fold`) applied (conceptually)
            to the stack ``[qk, qr]``, in its current mode; running statistics are updated in train mode.
        max_chunk_logits: Logits per band (N x G x queries x keys), at least one row of the grid per band.

    Returns:
        ``softmax(bn_similarity([qk, qr]) summed over the two terms) @ v``, shape (N, G, L, dv), a view of
        (N, G, dv, L) storage (LESA goes on channel-first).
    """
    height, width = grid
    _, groups, tokens, dim = q.shape
    if tokens != height * width:
        raise ValueError(f'q has {tokens} tokens but grid {tuple(grid)} has {height * width}; pass grid=(H, W) of '
                         f'the feature map the tokens were flattened from.')
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f'q, k, v must share (N, G, L) and q, k their channel dim; got q {tuple(q.shape)}, '
                         f'k {tuple(k.shape)}, v {tuple(v.shape)}.')
    if rel_height.shape != (2 * height - 1, dim) or rel_width.shape != (2 * width - 1, dim):
        raise ValueError(f'For grid {tuple(grid)} and dqk={dim} rel_height must be {(2 * height - 1, dim)} and '
                         f'rel_width {(2 * width - 1, dim)}, got {tuple(rel_height.shape)} and '
                         f'{tuple(rel_width.shape)}; resample the tables to the grid first.')
    if not can_fold(bn_similarity):
        raise ValueError(f'The fused LESA binary term cannot apply this bn_similarity: '
                         f'{_unfoldable_reason(bn_similarity)}. Use detection_qr_binary_reference.')
    channels = getattr(bn_similarity, 'num_features', None) or bn_similarity.running_mean.numel()
    if channels != 2 * groups:
        raise ValueError(f'bn_similarity must have 2G = {2 * groups} channels (one per group and term), '
                         f'got {channels}.')

    scale, shift = _similarity_affine(bn_similarity, q, k, rel_height, rel_width, grid)
    scale, shift = scale.to(q.dtype), shift.to(q.dtype)
    logit_shift = (shift[:groups] + shift[groups:])[:, None, None]
    logit_shift = logit_shift - logit_shift.detach()  # softmax-invariant: keep its gradient, add exact zeros
    # b * qr = the relative logits of b * q, formed per band from [b * q | shift] (N, G, L, dqk + 1), which is all
    # that is kept of them for backward
    query_rel = torch.cat([q * scale[groups:, None, None], logit_shift.expand(*q.shape[:-1], 1)], dim=-1)
    tables = torch.cat([table.flatten(0, 1) for table in relative_tables_2d(rel_height, rel_width, grid)])
    return banded_bias_attention(
        _relative_bias_attention, q * scale[:groups, None, None], k, v, grid, query_bias=query_rel,
        shared_bias=tables, max_logits=max_chunk_logits, scale=1.0, out_transposed=True)
