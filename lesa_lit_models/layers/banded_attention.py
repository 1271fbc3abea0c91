"""Exact attention with a trained additive bias, one band of queries at a time, without any tokens x tokens tensor.

``softmax(q k^T * scale + bias) v`` where the bias of a band of queries is built on the fly from small tensors
(LESA: per-query relative logits of key rows and columns; LIT: a relative-position offset grid). Every fused
kernel returns the gradient of a trained bias as one dense (tokens x tokens) tensor, so this computes, per band:

* forward: one ``F.scaled_dot_product_attention`` call with the band's bias as float mask (outside autograd, so
  the fused kernels take it); only ``q``, ``k``, ``v`` and the output are kept, as a fused kernel keeps them;
* backward: the band's logits once more, ``softmax``, then the textbook gradients of the band (``dS = P * (dP -
  rowsum(dO * O))``), which reach the bias inputs through the caller's explicit vjp of the band's bias function
  (no ``torch.autograd.grad`` in backward, so ``torch.compile(fullgraph=True)`` traces training in one graph).

See ``docs/attention.md`` for the derivation and the measurements that chose this split.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['ATTN_IMPLS', 'MAX_COMPILED_BANDS', 'banded_bias_attention', 'default_max_chunk_logits', 'row_band_size']

# the attention switch of both families: 'fused' (exact, no tokens x tokens tensor kept) or 'reference'
ATTN_IMPLS = ('fused', 'reference')


def default_max_chunk_logits(device: torch.device) -> int:
    """Logits per band when none is set: bands that stay in a CPU's caches (2^22, 16 MB in float32; on 2 cores
    LIT-S's stage-3 attention is ~3x faster than with 2^26), larger on CUDA, where each band is a kernel launch."""
    return 2 ** 26 if device.type == 'cuda' else 2 ** 22


# bands per attention at most while torch.compile traces (see row_band_size)
MAX_COMPILED_BANDS = 8


def row_band_size(q: torch.Tensor, num_keys: int, width: int, max_logits: Optional[int] = None) -> Optional[int]:
    """Queries per band for queries in raster order over rows of ``width``: whole rows, as many as fit ``max_logits``
    logits (batch x heads x queries x keys; at least one row).

    None (one band of all queries) while ``torch.export`` traces: the number of bands is a Python loop over the
    grid, so bands would fix the input size of the exported program. While ``torch.compile`` traces, at most
    :data:`MAX_COMPILED_BANDS` bands: dynamo unrolls the loop, forward and backward, into the graph, whose size and
    compile time would otherwise grow with the grid (at 1024x1024 the LESA backbone's 64 rows of stride 16 make
    32 bands per block with the CPU default).
    """
    if torch.compiler.is_exporting():
        return None
    max_logits = max_logits or default_max_chunk_logits(q.device)
    rows = max(1, max_logits // max(1, q.shape[0] * q.shape[1] * width * num_keys))
    if torch.compiler.is_compiling():
        rows = max(rows, -(-q.shape[-2] // (width * MAX_COMPILED_BANDS)))
    return rows * width


# bias_fn(query_bias_band, shared_bias, start, stop) -> bias of queries [start, stop) against every key,
# broadcastable to (N, heads, stop - start, keys)
BiasFn = Callable[[Optional[torch.Tensor], Optional[torch.Tensor], int, int], torch.Tensor]
# bias_vjp(grad_bias, query_bias_band, shared_bias, start, stop) -> (gradient of query_bias_band, gradient of
# shared_bias), each None where that input is None; grad_bias has the shape bias_fn returned
BiasVjp = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], int, int],
                   Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim to ``size`` (exact for q/k/v of attention); always contiguous."""
    return F.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x.contiguous()


def _band_forward(q, k, v, bias, scale):
    """SDPA of one band; the fused kernels need a 4-D mask and, on CPU, one head dim for q, k and v."""
    bias = bias.view((1,) * (q.dim() - bias.dim()) + bias.shape)
    if q.device.type == 'cuda' or q.shape[-1] == v.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    dim = max(q.shape[-1], v.shape[-1])
    out = F.scaled_dot_product_attention(
        _pad_last(q, dim), _pad_last(k, dim), _pad_last(v, dim), attn_mask=bias, scale=scale)
    return out[..., :v.shape[-1]]


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient to ``shape`` (the bias may be shared over batch or heads)."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


def _band_rows(query_bias: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    return query_bias[..., start:stop, :] if query_bias is not None else None


class _BandedBiasAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, bias_fn: BiasFn, bias_vjp: BiasVjp, bands: Sequence[Tuple[int, int]], scale: float,
                out_transposed: bool, q, k, v, query_bias, shared_bias):
        if out_transposed:
            out = q.new_empty(*q.shape[:-2], v.shape[-1], q.shape[-2]).transpose(-1, -2)
        else:
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for start, stop in bands:
            bias = bias_fn(_band_rows(query_bias, start, stop), shared_bias, start, stop)
            out[..., start:stop, :] = _band_forward(q[..., start:stop, :], k, v, bias, scale)
        ctx.bias_fn, ctx.bias_vjp, ctx.bands, ctx.scale = bias_fn, bias_vjp, bands, scale
        ctx.save_for_backward(q, k, v, out, query_bias, shared_bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, query_bias, shared_bias = ctx.saved_tensors
        scale = ctx.scale
        acc = torch.promote_types(q.dtype, torch.float32)  # sums over bands kept in at least float32
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        grad_query_bias = torch.empty_like(query_bias) if query_bias is not None else None
        grad_shared_bias = torch.zeros(shared_bias.shape, dtype=acc, device=shared_bias.device) \
            if shared_bias is not None else None
        row_dot = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO * O) = sum_j P_ij dP_ij
        k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
        for start, stop in ctx.bands:
            q_band, grad_out_band = q[..., start:stop, :], grad_out[..., start:stop, :]
            band_query_bias = _band_rows(query_bias, start, stop)
            bias = ctx.bias_fn(band_query_bias, shared_bias, start, stop)
            probs = torch.matmul(q_band, k_t).mul_(scale).add_(bias).softmax(-1)
            grad_v += torch.matmul(probs.transpose(-1, -2), grad_out_band)
            # dS = P * (dO v^T - rowsum(dO * O)), in place over dP
            grad_logits = torch.matmul(grad_out_band, v_t).sub_(row_dot[..., start:stop, :]).mul_(probs)
            del probs
            grad_q[..., start:stop, :] = torch.matmul(grad_logits, k).mul_(scale)
            grad_k += torch.matmul(grad_logits.transpose(-1, -2), q_band).mul_(scale)
            grad_band_bias, grad_shared = ctx.bias_vjp(
                _sum_to(grad_logits, bias.shape), band_query_bias, shared_bias, start, stop)
            if grad_query_bias is not None:
                grad_query_bias[..., start:stop, :] = grad_band_bias
            if grad_shared_bias is not None:
                grad_shared_bias += grad_shared
        return (None, None, None, None, None, grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_query_bias,
                grad_shared_bias.to(shared_bias.dtype) if shared_bias is not None else None)


def banded_bias_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias_fn: BiasFn,
        bias_vjp: BiasVjp,
        band_size: Optional[int],
        query_bias: Optional[torch.Tensor] = None,
        shared_bias: Optional[torch.Tensor] = None,
        scale: Optional[float] = None,
        out_transposed: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v``, with the bias of each band of ``band_size`` queries from ``bias_fn``.

    Args:
        q: (N, heads, Lq, d); k: (N, heads, L, d); v: (N, heads, L, dv).
        bias_fn: ``bias_fn(query_bias[..., start:stop, :], shared_bias, start, stop)`` returns the bias of queries
            ``[start, stop)``, broadcastable to (N, heads, stop - start, L).
        bias_vjp: ``bias_vjp(grad_bias, query_bias[..., start:stop, :], shared_bias, start, stop)`` returns the
            gradients of ``bias_fn``'s two tensor inputs given the gradient of the bias it returned (None for an
            input that is None).
        band_size: Queries per band (the caller aligns bands to its own structure, e.g. whole image rows, see
            :func:`row_band_size`); None: one band of all queries.
        query_bias: Tensor with one row per query (dim -2), sliced to each band; or None.
        shared_bias: Tensor every band reads whole (e.g. an offset table); or None.
        scale: Logit scale (default ``d ** -0.5``).
        out_transposed: Return the (N, heads, Lq, dv) output as a view of (N, heads, dv, Lq) storage, for callers
            that go on channel-first: their ``(N, heads * dv, Lq)`` view then shares the storage kept for backward.

    Under autocast every operand is cast to the autocast dtype (the dtype a fused kernel would compute in);
    gradients summed over bands are accumulated in at least float32.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    device_type = q.device.type
    tensors = (q, k, v, query_bias, shared_bias)
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = q.dtype
    tensors = tuple(t.to(dtype) if t is not None else None for t in tensors)
    length = q.shape[-2]
    if band_size is None:
        bands = ((0, length),)
    else:
        bands = tuple((start, min(start + band_size, length)) for start in range(0, length, band_size))
    with torch.autocast(device_type, enabled=False):
        return _BandedBiasAttention.apply(bias_fn, bias_vjp, bands, scale, out_transposed, *tensors)
