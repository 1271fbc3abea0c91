"""Relative position bias tables spanning a whole feature map (LIT-S/M/B global attention).

Layout (Swin's): a table of shape ``((2 * Gh - 1) * (2 * Gw - 1), num_heads)`` is a row-major
``(2 * Gh - 1, 2 * Gw - 1)`` grid per head; the entry at ``(dy + Gh - 1, dx + Gw - 1)`` is the bias of a
query at ``(y, x)`` attending to the key at ``(y - dy, x - dx)``. In Swin's index notation the bias of a
map of ``H x W`` tokens is ``table[index]`` with
``index[i, j] = (y_i - y_j + H - 1) * (2 * W - 1) + (x_i - x_j + W - 1)``.

For a map whose size differs from the table's, LIT's detection backbone first resamples the table
bicubically (``align_corners=False``) to ``(2 * H - 1, 2 * W - 1)``. :func:`relative_position_bias_grid` does the
same; :func:`bias_from_grid` expands the table into the dense ``(num_heads, H * W, H * W)`` bias with a strided view
(``unfold``) of the live table instead of gathering through an ``(H * W)^2`` index: the result is
bit-identical to ``table[index]``, differentiable, never stale when the table is trained, and needs no
index tensor or cache (the index alone is 141 MB at an 800x1344 input), so nothing is rebuilt on the CPU.
:func:`bias_rows_keys_reversed` expands only the rows of a band of queries, against the keys in reverse order (a
plain strided copy), for attention computed a band at a time.
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, resize_rel_pos_bias_table_simple

__all__ = ['bias_table_size', 'resample_bias_table', 'relative_position_bias_grid', 'bias_rows_keys_reversed',
           'bias_rows_keys_reversed_vjp', 'bias_from_grid']


def bias_table_size(grid_size: Tuple[int, int]) -> Tuple[int, int]:
    """The ``(2 * H - 1, 2 * W - 1)`` table grid that covers every offset within an ``H x W`` map."""
    return 2 * grid_size[0] - 1, 2 * grid_size[1] - 1


def _resample_grid(table_grid: torch.Tensor, new_table_size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic (``align_corners=False``) resampling of a ``(heads, th, tw)`` table to an odd-sized
    ``new_table_size`` (timm's ``resize_rel_pos_bias_table_simple``, the authors' method); identity when equal."""
    window = ((new_table_size[0] + 1) // 2, (new_table_size[1] + 1) // 2)
    return resize_rel_pos_bias_table_simple(table_grid, window, (table_grid.shape[0], *new_table_size))


def resample_bias_table(
        table: torch.Tensor,
        table_size: Tuple[int, int],
        new_table_size: Tuple[int, int],
) -> torch.Tensor:
    """Resample a flat ``(th * tw, heads)`` table laid out as ``table_size`` to ``new_table_size``.

    Used when loading a checkpoint whose tables were made for another grid (e.g. ImageNet 27x27 into a
    COCO-sized 99x99 table, as the authors' detection loader does).
    """
    num_heads = table.shape[1]
    if table.shape[0] != table_size[0] * table_size[1]:
        raise ValueError(f'Bias table has {table.shape[0]} rows, expected {table_size[0]}x{table_size[1]}.')
    per_head = table.t().reshape(num_heads, *table_size)
    per_head = _resample_grid(per_head.float(), new_table_size).to(table.dtype)
    return per_head.reshape(num_heads, -1).t().contiguous()


@register_notrace_function  # FX: shapes depend on the input grid
def relative_position_bias_grid(
        table: torch.Tensor,
        table_size: Tuple[int, int],
        feat_size: Tuple[int, int],
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The ``(heads, 2H - 1, 2W - 1)`` offset grid of an ``H x W`` map from a flat ``(th * tw, heads)`` table.

    The table is resampled bicubically when its grid ``table_size`` differs. ``dtype`` casts the small grid (the
    attention dtype under autocast), so the large bias expanded from it is only ever materialised once.
    """
    num_heads = table.shape[1]
    offset_bias = _resample_grid(table.t().reshape(num_heads, *table_size), bias_table_size(feat_size))
    return offset_bias if dtype is None else offset_bias.to(dtype)


@register_notrace_function  # FX: shapes depend on the input grid
def bias_rows_keys_reversed(
        offset_bias: torch.Tensor,
        feat_size: Tuple[int, int],
        query_rows: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Bias of the queries in map rows ``[start, stop)`` against every key, keys in *reverse* raster order.

    Returns ``(heads, (stop - start) * W, H * W)``. With the keys reversed, key ``u * W + w`` is the token at
    ``(H - 1 - u, W - 1 - w)`` and the bias of query ``(y, x)`` is ``offset_bias[:, y + u, x + w]``: the keys of each
    query read one contiguous ``H x W`` window of the offset grid, so the band is a strided view of it, copied once.
    Attention is the same with keys and values reversed together (see ``docs/attention.md``).
    """
    height, width = feat_size
    start, stop = query_rows or (0, height)
    if torch.compiler.is_exporting():  # unfold's window sizes would fix the grid of the exported program
        arange = partial(torch.arange, device=offset_bias.device)
        rows, cols = arange(start, stop)[:, None] + arange(height), arange(width)[:, None] + arange(width)
        windows = offset_bias[:, rows[:, None, :, None], cols[None, :, None, :]]
    else:  # heads, rows, W, H, W
        windows = offset_bias[:, start:stop + height - 1].unfold(1, height, 1).unfold(2, width, 1)
    return windows.reshape(offset_bias.shape[0], (stop - start) * width, height * width)


@register_notrace_function  # FX: shapes depend on the input grid
def bias_rows_keys_reversed_vjp(
        grad: torch.Tensor,
        feat_size: Tuple[int, int],
        query_rows: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Gradient of the offset bias from that of :func:`bias_rows_keys_reversed`'s ``(heads, rows * W, H * W)`` band.

    Each query's keys read an ``H x W`` window of the grid, so the windows' gradients add up where they overlap:
    ``F.fold`` (col2im) of the band, one channel per head, into the grid rows the band read; (heads, 2H - 1, 2W - 1).
    """
    height, width = feat_size
    start, stop = query_rows or (0, height)
    rows = F.fold(grad.transpose(-1, -2), (stop - start + height - 1, 2 * width - 1), (height, width)).squeeze(1)
    return F.pad(rows, (0, 0, start, height - stop))


def bias_from_grid(
        offset_bias: torch.Tensor,
        feat_size: Tuple[int, int],
        query_rows: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Dense bias of the queries in map rows ``[start, stop)`` (all rows by default) against every key.

    Returns ``(heads, (stop - start) * W, H * W)``, keys in raster order (:func:`bias_rows_keys_reversed` with the
    keys put back in order).
    """
    return bias_rows_keys_reversed(offset_bias, feat_size, query_rows).flip(-1)

