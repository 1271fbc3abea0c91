"""Exact attention with a trained additive bias, one band of query rows at a time, keeping no tokens x tokens tensor.

Each bias family (LESA's relative logits, LIT's offset grid) is one custom operator, forward and backward; while
``torch.onnx.export`` traces, the same function is recorded in standard ops, one grid row per step of a ``Scan``.
Derivation: docs/attention.md §1.
"""
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan

__all__ = ['banded_bias_attention', 'banded_bias_attention_op', 'default_max_chunk_logits',
           'exported_bias_attention']


def default_max_chunk_logits(device: torch.device) -> int:
    """Logits per band when none is set: bands that stay in a CPU's caches, larger on CUDA where each band is a
    kernel launch (chosen in ``benchmarks/results/``)."""
    return 2 ** 26 if device.type == 'cuda' else 2 ** 22


def _rows_per_band(batch_heads: int, width: int, keys: int, max_logits: Optional[int], device: torch.device) -> int:
    """Whole grid rows of queries whose logits fit ``max_logits`` (default per device), at least one."""
    max_logits = max_logits or default_max_chunk_logits(device)
    return max(1, max_logits // max(1, batch_heads * width * keys))


def _bands(q: torch.Tensor, k: torch.Tensor, grid: Sequence[int], max_logits: Optional[int]) -> List[Tuple[int, int]]:
    """Query ranges of whole grid rows, as many rows as fit ``max_logits`` logits (at least one)."""
    length, width = q.shape[-2], grid[1]
    band_size = _rows_per_band(q.shape[0] * q.shape[1], width, k.shape[-2], max_logits, q.device) * width
    return [(start, min(start + band_size, length)) for start in range(0, length, band_size)]


# bias_fn(query_bias_band, shared_bias, first_row, num_rows, grid) -> bias of the queries in grid rows
# [first_row, first_row + num_rows) against every key, broadcastable to (N, heads, num_rows * W, keys); first_row is
# an int, or a 0-d tensor in a step of the exported form (one row; shared_bias then as export_shared_bias made it)
BiasFn = Callable[[Optional[torch.Tensor], Optional[torch.Tensor], Union[int, torch.Tensor], int, Sequence[int]],
                  torch.Tensor]
# bias_vjp(grad_bias, query_bias_band, shared_bias, first_row, num_rows, grid) -> (gradient of query_bias_band,
# gradient of shared_bias), each None where that input is None; grad_bias has the shape bias_fn returned
BiasVjp = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], int, int, Sequence[int]],
                   Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def _grid_rows(start: int, stop: int, grid: Sequence[int]) -> Tuple[int, int]:
    """First grid row and number of rows of the query range ``[start, stop)`` (whole rows)."""
    return start // grid[1], (stop - start) // grid[1]


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim to ``size`` (exact for q/k/v of attention); always contiguous."""
    return F.pad(x, (0, size - x.shape[-1])) if x.shape[-1] < size else x.contiguous()


def _sdpa_takes_unequal_head_dims(device: torch.device) -> bool:
    """Whether SDPA's fused kernels on ``device`` take q, k and v of different head dims (the CPU's flash kernel
    does not)."""
    return device.type == 'cuda'


def _band_forward(q, k, v, bias, scale):
    """SDPA of one band; the fused kernels need a 4-D mask and, on CPU, one head dim for q, k and v."""
    bias = bias.view((1,) * (q.dim() - bias.dim()) + bias.shape)
    if q.shape[-1] == v.shape[-1] or _sdpa_takes_unequal_head_dims(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    dim = max(q.shape[-1], v.shape[-1])
    out = F.scaled_dot_product_attention(
        _pad_last(q, dim), _pad_last(k, dim), _pad_last(v, dim), attn_mask=bias, scale=scale)
    return out[..., :v.shape[-1]]


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient to ``shape`` (the bias may be shared over batch or heads)."""
    return grad.sum_to_size(shape) if grad.shape != shape else grad


def _band_rows(query_bias: Optional[torch.Tensor], start: int, stop: int) -> Optional[torch.Tensor]:
    return query_bias.narrow(-2, start, stop - start) if query_bias is not None else None


def _new_output(q: torch.Tensor, v: torch.Tensor, out_transposed: bool) -> torch.Tensor:
    if out_transposed:
        return q.new_empty(*q.shape[:-2], v.shape[-1], q.shape[-2]).transpose(-1, -2)
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _new_like(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``t``'s shape, or an empty one for an absent input (operators return no None)."""
    return t.new_empty(t.shape) if t is not None else fallback.new_empty(0)


def _banded_forward(bias_fn: BiasFn, q, k, v, query_bias, shared_bias, grid: Sequence[int],
                    max_logits: Optional[int], scale: float, out_transposed: bool) -> torch.Tensor:
    out = _new_output(q, v, out_transposed)
    for start, stop in _bands(q, k, grid, max_logits):
        bias = bias_fn(_band_rows(query_bias, start, stop), shared_bias, *_grid_rows(start, stop, grid), grid)
        out[..., start:stop, :] = _band_forward(q[..., start:stop, :], k, v, bias, scale)
    return out


def _banded_backward(bias_fn: BiasFn, bias_vjp: BiasVjp, grad_out, q, k, v, out, query_bias, shared_bias,
                     grid: Sequence[int], max_logits: Optional[int], scale: float) -> List[torch.Tensor]:
    acc = torch.promote_types(q.dtype, torch.float32)  # sums over bands kept in at least float32
    grad_out = grad_out.contiguous()
    grad_q = _new_like(q, q)
    grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    grad_query_bias = _new_like(query_bias, q)
    grad_shared_bias = torch.zeros(shared_bias.shape, dtype=acc, device=shared_bias.device) \
        if shared_bias is not None else q.new_empty(0)
    row_dot = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO * O) = sum_j P_ij dP_ij
    k_t, v_t = k.transpose(-1, -2), v.transpose(-1, -2)
    for start, stop in _bands(q, k, grid, max_logits):
        q_band, grad_out_band = q[..., start:stop, :], grad_out[..., start:stop, :]
        band_query_bias = _band_rows(query_bias, start, stop)
        bias = bias_fn(band_query_bias, shared_bias, *_grid_rows(start, stop, grid), grid)
        probs = torch.matmul(q_band, k_t).mul_(scale).add_(bias).softmax(-1)
        grad_v += torch.matmul(probs.transpose(-1, -2), grad_out_band)
        # dS = P * (dO v^T - rowsum(dO * O)), in place over dP
        grad_logits = torch.matmul(grad_out_band, v_t).sub_(row_dot[..., start:stop, :]).mul_(probs)
        del probs
        grad_q[..., start:stop, :] = torch.matmul(grad_logits, k).mul_(scale)
        grad_k += torch.matmul(grad_logits.transpose(-1, -2), q_band).mul_(scale)
        grad_band_bias, grad_shared = bias_vjp(
            _sum_to(grad_logits, bias.shape), band_query_bias, shared_bias, *_grid_rows(start, stop, grid), grid)
        if query_bias is not None:
            grad_query_bias[..., start:stop, :] = grad_band_bias
        if shared_bias is not None:
            grad_shared_bias += grad_shared
    return [grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_query_bias, grad_shared_bias.to(q.dtype)]


# the exported softmax's logits are raised to at least (row max - this): probabilities below e^-80 (1.8e-35) do not
# change a float32 result, and onnxruntime's softmax (and the matmul after it) runs ~10x slower on rows whose
# probabilities underflow to subnormals (benchmarks: docs/compile-export.md)
EXPORT_LOGIT_RANGE = 80.


def exported_bias_attention(op: Callable[..., torch.Tensor], q, k, v, query_bias, shared_bias, grid: Sequence[int],
                            scale: float, out_transposed: bool) -> torch.Tensor:
    """The function of ``op`` (:func:`banded_bias_attention_op`) in plain ``matmul`` / ``softmax``, one grid row of
    queries per step of a ``scan`` (ONNX ``Scan``): what an ONNX export records. The graph holds one row's subgraph
    at every input size, and a runtime keeps one row's logits at a time."""
    height, width = grid
    bias_fn = op.bias_fn
    if shared_bias is not None and op.export_shared_bias is not None:
        shared_bias = op.export_shared_bias(shared_bias, grid)
    k_t, v = k.transpose(-1, -2).clone(), v.clone()  # a scan's inputs must not alias (k and v may share storage)

    def rows_first(t: torch.Tensor) -> torch.Tensor:  # (H, ..., W, C): the scan steps over dim 0
        return t.unflatten(-2, (height, width)).movedim(-3, 0)

    def attend_row(carry, row_inputs):
        bias = bias_fn(row_inputs.get('query_bias'), shared_bias, row_inputs['row'], 1, grid)
        logits = torch.matmul(row_inputs['q'], k_t).mul(scale).add(bias)
        logits = torch.maximum(logits, logits.amax(-1, keepdim=True) - EXPORT_LOGIT_RANGE)
        return carry.clone(), logits.softmax(-1).matmul(v)

    rows = torch.arange(height, device=q.device)
    row_inputs = {'row': rows, 'q': rows_first(q)}
    if query_bias is not None:
        row_inputs['query_bias'] = rows_first(query_bias)
    _, out = scan(attend_row, rows.new_zeros(()), row_inputs)  # the carry is unused: a scan needs one
    out = out.movedim(0, -3).flatten(-3, -2)
    return out.transpose(-1, -2).contiguous().transpose(-1, -2) if out_transposed else out


def banded_bias_attention_op(name: str, bias_fn: BiasFn, bias_vjp: BiasVjp,
                             export_shared_bias: Optional[Callable[[torch.Tensor, Sequence[int]], torch.Tensor]] = None
                             ) -> Callable[..., torch.Tensor]:
    """Register ``lesa_lit_models::<name>``, the banded attention with bias function ``bias_fn`` and its vjp
    ``bias_vjp``, as a custom operator with a custom-operator backward, opaque to ``torch.compile`` and
    ``torch.export`` so that the bands follow the actual input size (docs/attention.md §1).
    ``export_shared_bias(shared_bias, grid)``, if given, recasts the shared bias once before the exported form's scan,
    whose steps then pass its result to ``bias_fn`` (with a tensor ``first_row``)."""
    qualname = f'lesa_lit_models::{name}'

    @torch.library.custom_op(qualname, mutates_args=())
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_bias: Optional[torch.Tensor],
               shared_bias: Optional[torch.Tensor], grid: List[int], max_logits: Optional[int], scale: float,
               out_transposed: bool) -> torch.Tensor:
        return _banded_forward(bias_fn, q, k, v, query_bias, shared_bias, grid, max_logits, scale, out_transposed)

    @attend.register_fake
    def _(q, k, v, query_bias, shared_bias, grid, max_logits, scale, out_transposed):
        return _new_output(q, v, out_transposed)

    @torch.library.custom_op(f'{qualname}_backward', mutates_args=())
    def attend_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        out: torch.Tensor, query_bias: Optional[torch.Tensor], shared_bias: Optional[torch.Tensor],
                        grid: List[int], max_logits: Optional[int], scale: float) -> List[torch.Tensor]:
        return _banded_backward(bias_fn, bias_vjp, grad_out, q, k, v, out, query_bias, shared_bias, grid,
                                max_logits, scale)

    @attend_backward.register_fake
    def _(grad_out, q, k, v, out, query_bias, shared_bias, grid, max_logits, scale):
        return [_new_like(t, q) for t in (q, k, v, query_bias, shared_bias)]

    def setup_context(ctx, inputs, output):
        q, k, v, query_bias, shared_bias, grid, max_logits, scale, _ = inputs
        ctx.save_for_backward(q, k, v, output, query_bias, shared_bias)
        ctx.grid, ctx.max_logits, ctx.scale = grid, max_logits, scale

    def backward(ctx, grad_out):
        q, k, v, out, query_bias, shared_bias = ctx.saved_tensors
        grad_q, grad_k, grad_v, grad_query_bias, grad_shared_bias = attend_backward(
            grad_out, q, k, v, out, query_bias, shared_bias, ctx.grid, ctx.max_logits, ctx.scale)
        return (grad_q, grad_k, grad_v, grad_query_bias if query_bias is not None else None,
                grad_shared_bias if shared_bias is not None else None, None, None, None, None)

    attend.register_autograd(backward, setup_context=setup_context)
    attend.bias_fn, attend.export_shared_bias = bias_fn, export_shared_bias  # the ONNX form (exported_bias_attention)
    return attend


def banded_bias_attention(
        op: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: Sequence[int],
        query_bias: Optional[torch.Tensor] = None,
        shared_bias: Optional[torch.Tensor] = None,
        max_logits: Optional[int] = None,
        scale: Optional[float] = None,
        out_transposed: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` over an ``H x W`` grid (raster order), the bias of each band of whole
    query rows from the bias function of ``op`` (:func:`banded_bias_attention_op`).

    Args:
        q: (N, heads, H * W, d); k: (N, heads, L, d); v: (N, heads, L, dv).
        grid: (H, W); bands are whole rows of it.
        query_bias: Tensor with one row per query (dim -2), sliced to each band; or None.
        shared_bias: Tensor every band reads whole (e.g. an offset table); or None.
        max_logits: Logits per band (at least one row), default :func:`default_max_chunk_logits`.
        scale: Logit scale (default ``d ** -0.5``).
        out_transposed: Return the output as a view of (N, heads, dv, Lq) storage, so that a channel-first caller's
            view shares the storage kept for backward.

    Under autocast the operands are cast to the autocast dtype, as a fused kernel would compute.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    device_type = q.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype
    tensors = tuple(t.to(dtype) if t is not None else None for t in (q, k, v, query_bias, shared_bias))
    with torch.autocast(device_type, enabled=False):
        if torch.onnx.is_in_onnx_export():
            return exported_bias_attention(op, *tensors, grid, scale, out_transposed)
        return op(*tensors, list(grid), max_logits, scale, out_transposed)
