"""Exact, memory-lean ("fused") binary term of LESA (arXiv 2107.05637), ``detection_qr`` position embedding.

The reference binary term materialises the similarity stack ``[qk, qr]`` of shape (N, 2G, L, L), applies
``bn_similarity`` (a ``BatchNorm2d(2G)``), sums the two terms, takes a softmax over keys and multiplies by ``v``.
This module computes the same function, forward and backward, without any (L, L) tensor:

**1. BatchNorm is a per-channel affine map.** Whatever statistics it uses (running ones in eval / frozen mode,
batch ones in train mode), ``bn_similarity`` maps channel ``c`` to ``s_c * x + t_c`` with
``s_c = gamma_c / sqrt(var_c + eps)`` and ``t_c = beta_c - mean_c * s_c``. With ``a_g = s_g``, ``b_g = s_{G+g}``
and ``t_g + t_{G+g}`` the logits of group ``g`` are ``a_g qk + b_g qr + (t_g + t_{G+g})``.

**2. The logits are one scaled dot product.** With token ``i = (x_i, y_i)`` (raster order, ``x = i // W``) the
2-D relative term is ``qr[i, j] = rh[i, x_j] + rw[i, y_j]`` where ``rh[i, x'] = q_i . rel_height[x' - x_i + H - 1]``
(L x H) and ``rw[i, y'] = q_i . rel_width[y' - y_i + W - 1]`` (L x W). A one-hot key picks one entry, so

    q'_i = [a q_i,  b rh[i, :],  b rw[i, :]]        k'_j = [k_j,  onehot_H(x_j),  onehot_W(y_j)]

gives ``q'_i . k'_j = a qk[i, j] + b qr[i, j]``, the reference logits up to the per-group constant ``t``, which
cancels in the softmax. ``t`` still enters, as ``t - t.detach()`` (value exactly 0, so no rounding of a possibly
large constant in half precision) added to the ``rh`` entries (the one-hot picks one of them per key): its gradient
is the reference's (the sum of the logit gradients, zero up to rounding), and ``beta`` stays in the autograd graph
as in the reference, so DDP sees no unused parameter. The block is ``F.scaled_dot_product_attention(q', k', v,
scale=1)`` with head dim ``D = dqk + H + W``. Operands are contiguous and zero-padded to 8-aligned head dims
(exact): on CUDA q'/k' and v each to their own, which the memory-efficient kernel takes (v stays narrow, so less
is kept for backward); elsewhere all three to a common one, as the CPU flash kernel needs equal dims. The fused
kernels apply and nothing of size L x L is kept for backward.

**3. Train mode: exact batch statistics in closed form.** BatchNorm needs, per channel, the mean and the biased
variance over (n, i, j) of each term. By the law of total variance over query rows,
``mean = E_{n,i}[m_i]`` and ``var = E_{n,i}[v_i] + Var_{n,i}(m_i)`` with the row mean/variance over keys ``j``:

* content ``qk``: ``m_i = q_i . kbar``, ``v_i = q_i^T C_k q_i`` with ``kbar``, ``C_k`` the mean and (biased)
  covariance of the keys of the sample: O(L dqk^2) work, O(L) memory per (n, g);
* relative ``qr``: as ``j`` runs over the grid, ``x_j`` and ``y_j`` are independent and uniform, so
  ``m_i = mean(rh[i, :]) + mean(rw[i, :])`` and ``v_i = var(rh[i, :]) + var(rw[i, :])``: O(L (H + W)).

Every term is a sum of non-negative, centred quantities (no ``E[x^2] - E[x]^2`` cancellation). They are
computed in at least float32 (autocast off), differentiably, so gradients flow through the statistics exactly
as through ``BatchNorm2d``; ``running_mean`` / ``running_var`` (unbiased, n = N L^2) and ``num_batches_tracked``
are updated exactly as ``nn.BatchNorm2d`` does (``momentum=None`` = cumulative average). ``track_running_stats=
False`` uses batch statistics in both modes, like the module. Not supported (clear error): ``SyncBatchNorm`` in
train mode across several processes (the statistics would need a cross-process reduction).

Exactness: equal to the reference up to floating-point summation order (tested against a from-the-formulas
reference in float64 and float32, outputs and gradients, eval and train). Memory: O(N G L (dqk + H + W + dv))
for everything kept for backward, versus O(N G L^2) for the reference; time is the same O(N G L^2 D) as the
reference, inside one fused kernel.

``classification`` position embedding: not fused; the model keeps the reference computation for it. Its
relative terms index a free table by the *flattened* token offset ``i - j``: ``qr[i, j] = q_i . Eq[:, i - j]`` has
L^2 independent values per (n, g) (the table has 2L - 1 columns, each query meets L of them), so no exact
``q' . k'`` with a head dim below L exists, and an additive attention bias would itself be (N, G, L, L) (with an
(N, G, L, L) gradient in training). The ``sve`` output ``sum_j A[i, j] Ev[:, i - j]`` needs the attention
matrix A itself, which fused kernels never form. At the classification grid (14 x 14, L = 196) one (G, L, L)
fp32 tensor is 1.2 MB per image, so the reference is also the right path there.
"""
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['detection_qr_binary']


def _relative_logits_2d(
        q: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, grid: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``rh`` (N, G, L, H) and ``rw`` (N, G, L, W): each query against every key row / key column offset."""
    height, width = grid
    batch, groups, tokens, dim = q.shape
    rows = torch.arange(height, device=q.device)
    cols = torch.arange(width, device=q.device)
    # table[x, x'] = rel[x' - x + H - 1]: the key-row offset seen from query row x
    height_table = rel_height[rows[None, :] - rows[:, None] + height - 1]
    width_table = rel_width[cols[None, :] - cols[:, None] + width - 1]
    q_grid = q.reshape(batch, groups, height, width, dim)
    rh = torch.einsum('ngxyd,xad->ngxya', q_grid, height_table).reshape(batch, groups, tokens, height)
    rw = torch.einsum('ngxyd,ybd->ngxyb', q_grid, width_table).reshape(batch, groups, tokens, width)
    return rh, rw


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


def _check_sync_bn_supported(bn: nn.Module) -> None:
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training):
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(bn.process_group) > 1:
        raise NotImplementedError(
            'The fused LESA binary term computes batch statistics on this process only, but bn_similarity is a '
            'SyncBatchNorm in train mode across several processes. Use attn_impl="reference", keep '
            'bn_similarity in eval mode (norm_eval=True), or do not convert it to SyncBatchNorm.')


def _similarity_affine(
        bn: nn.modules.batchnorm._BatchNorm,
        q: torch.Tensor,
        k: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        grid: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) that ``bn`` applies to the similarity stack, mirroring ``_BatchNorm.forward``.

    In train mode this also updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` like
    ``nn.BatchNorm2d`` on the (N, 2G, L, L) stack would.
    """
    _check_sync_bn_supported(bn)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    if use_batch_stats:
        batch, _, tokens, _ = q.shape
        count = batch * tokens * tokens
        if bn.training and count == 1:
            raise ValueError(f'Expected more than 1 value per channel when training, got N={batch}, L={tokens}.')
        if count:
            mean, var = _similarity_batch_moments(q, k, *_relative_logits_2d(q, rel_height, rel_width, grid))
        else:  # an empty batch has no statistics and normalises nothing: finite stand-ins keep zero gradients
            mean, var = q.new_zeros(bn.num_features), q.new_ones(bn.num_features)
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


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim to ``size``; always contiguous (the fused kernels need a unit last-dim stride)."""
    return F.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x.contiguous()


def detection_qr_binary(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        grid: Tuple[int, int],
        bn_similarity: nn.modules.batchnorm._BatchNorm,
) -> torch.Tensor:
    """LESA binary term, ``detection_qr`` kind, through one ``F.scaled_dot_product_attention`` (see module doc).

    Args:
        q, k: (N, G, L, dqk) queries and keys; v: (N, G, L, dv) values; L = H * W tokens in raster order.
        rel_height: (2H - 1, dqk), rel_width: (2W - 1, dqk) relative tables of the grid.
        grid: (H, W).
        bn_similarity: ``BatchNorm2d(2G)`` applied (conceptually) to the stack ``[qk, qr]``, in its current
            mode; running statistics are updated in train mode.

    Returns:
        ``softmax(bn_similarity([qk, qr]) summed over the two terms) @ v``, shape (N, G, L, dv).
    """
    height, width = grid
    batch, groups, tokens, dim = q.shape
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
    if bn_similarity.num_features != 2 * groups:
        raise ValueError(f'bn_similarity must have 2G = {2 * groups} channels (one per group and term), '
                         f'got {bn_similarity.num_features}.')

    scale, shift = _similarity_affine(bn_similarity, q, k, rel_height, rel_width, grid)
    scale, shift = scale.to(q.dtype), shift.to(q.dtype)
    content_scale = scale[:groups, None, None]
    logit_shift = (shift[:groups] + shift[groups:])[:, None, None]
    logit_shift = logit_shift - logit_shift.detach()  # softmax-invariant: keep its gradient, add exact zeros
    # b * rh from (b * q): backward keeps that (N, G, L, dqk) query, not the (N, G, L, H + W) logits (train mode
    # also computes the unscaled ones, for the batch statistics: a small O(L (H + W) dqk) einsum twice)
    rh, rw = _relative_logits_2d(q * scale[groups:, None, None], rel_height, rel_width, grid)

    query = torch.cat([q * content_scale, rh + logit_shift, rw], dim=-1)
    token_index = torch.arange(tokens, device=q.device)[:, None]
    # one-hot key row and column (compared, not F.one_hot, whose class count torch.export would fix to one grid)
    key_position = torch.cat([
        token_index // width == torch.arange(height, device=q.device),
        token_index % width == torch.arange(width, device=q.device)], dim=-1).to(k.dtype)
    key = torch.cat([k, key_position.expand(batch, groups, tokens, height + width)], dim=-1)

    qk_dim, v_dim = (-(-d // 8) * 8 for d in (query.shape[-1], v.shape[-1]))
    if q.device.type != 'cuda':  # the CPU flash kernel needs equal q/k/v head dims
        qk_dim = v_dim = max(qk_dim, v_dim)
    out = F.scaled_dot_product_attention(
        _pad_last(query, qk_dim), _pad_last(key, qk_dim), _pad_last(v, v_dim), scale=1.0)
    return out[..., :v.shape[-1]]
