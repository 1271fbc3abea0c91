"""Relative position bias tables spanning a whole feature map (LIT-S/M/B global attention).

Swin's table layout, resampled bicubically to each input's offset grid as the authors' detection backbone does, and
expanded with strided views of the live table instead of an index (docs/lit.md; bands: docs/attention.md §3).
"""
from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function, resize_rel_pos_bias_table_simple

__all__ = ['bias_table_size', 'resample_bias_table', 'relative_position_bias_grid', 'bias_rows_keys_reversed',
           'bias_rows_keys_reversed_vjp', 'bias_from_grid', 'column_windows', 'bias_row_keys_reversed']


def bias_table_size(grid_size: Tuple[int, int]) -> Tuple[int, int]:
    """The ``(2 * H - 1, 2 * W - 1)`` table grid that covers every offset within an ``H x W`` map."""
    return 2 * grid_size[0] - 1, 2 * grid_size[1] - 1


def _resample_grid(table_grid: torch.Tensor, new_table_size: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a ``(heads, th, tw)`` table to an odd-sized ``new_table_size`` (the authors' method)."""
    window = ((new_table_size[0] + 1) // 2, (new_table_size[1] + 1) // 2)
    return resize_rel_pos_bias_table_simple(table_grid, window, (table_grid.shape[0], *new_table_size))


def resample_bias_table(
        table: torch.Tensor,
        table_size: Tuple[int, int],
        new_table_size: Tuple[int, int],
) -> torch.Tensor:
    """Resample a flat ``(th * tw, heads)`` table laid out as ``table_size`` to ``new_table_size`` (checkpoints
    made for another grid, as the authors' detection loader does)."""
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
    """The ``(heads, 2H - 1, 2W - 1)`` offset grid of an ``H x W`` map from a flat ``(th * tw, heads)`` table,
    resampled where ``table_size`` differs; ``dtype`` casts the small grid rather than the bias expanded from it."""
    num_heads = table.shape[1]
    offset_bias = _resample_grid(table.t().reshape(num_heads, *table_size), bias_table_size(feat_size))
    return offset_bias if dtype is None else offset_bias.to(dtype)


@register_notrace_function  # FX: shapes depend on the input grid
def bias_rows_keys_reversed(
        offset_bias: torch.Tensor,
        feat_size: Tuple[int, int],
        first_row: int = 0,
        num_rows: Optional[int] = None,
) -> torch.Tensor:
    """Bias ``(heads, num_rows * W, H * W)`` of the queries in map rows ``[first_row, first_row + num_rows)`` (all
    rows by default) against every key, keys in *reverse* raster order: a strided view of ``offset_bias``
    (docs/attention.md §3)."""
    height, width = feat_size
    num_rows = height if num_rows is None else num_rows
    if torch.compiler.is_exporting():  # unfold's window sizes would fix the grid of the exported program
        arange = partial(torch.arange, device=offset_bias.device)
        rows = first_row + arange(num_rows)[:, None] + arange(height)
        cols = arange(width)[:, None] + arange(width)
        windows = offset_bias[:, rows[:, None, :, None], cols[None, :, None, :]]
    else:  # heads, rows, W, H, W
        windows = offset_bias[:, first_row:first_row + num_rows + height - 1].unfold(1, height, 1).unfold(2, width, 1)
    return windows.reshape(offset_bias.shape[0], num_rows * width, height * width)


def column_windows(offset_bias: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """``(heads, W, 2H - 1, W)`` table ``c[:, y, a, y'] = offset_bias[:, a, y + y']``: the offset grid's window of
    each query column, whole rows, from which one grid row's bias is a slice (:func:`bias_row_keys_reversed`); the
    exported attention's form of the offset grid, gathered once per attention."""
    arange = partial(torch.arange, device=offset_bias.device)
    cols = arange(feat_size[1])[:, None] + arange(feat_size[1])
    return offset_bias[:, :, cols].transpose(1, 2).contiguous()


def bias_row_keys_reversed(windows: torch.Tensor, feat_size: Tuple[int, int], row: torch.Tensor) -> torch.Tensor:
    """Bias ``(heads, W, H * W)`` of the queries in map row ``row`` (a 0-d tensor: a step of the exported scan)
    against every key in reverse raster order, from :func:`column_windows`: one contiguous run of ``H * W`` per
    query; equals ``bias_rows_keys_reversed(offset_bias, feat_size, row, 1)``."""
    height, width = feat_size
    rows = row + torch.arange(height, device=windows.device)
    return windows.index_select(2, rows).reshape(windows.shape[0], width, height * width)


@register_notrace_function  # FX: shapes depend on the input grid
def bias_rows_keys_reversed_vjp(
        grad: torch.Tensor,
        feat_size: Tuple[int, int],
        first_row: int = 0,
        num_rows: Optional[int] = None,
) -> torch.Tensor:
    """Gradient ``(heads, 2H - 1, 2W - 1)`` of the offset bias from that of a :func:`bias_rows_keys_reversed` band:
    the overlapping windows' gradients summed by ``F.fold`` (col2im)."""
    height, width = feat_size
    num_rows = height if num_rows is None else num_rows
    rows = F.fold(grad.transpose(-1, -2), (num_rows + height - 1, 2 * width - 1), (height, width)).squeeze(1)
    return F.pad(rows, (0, 0, first_row, height - first_row - num_rows))


def bias_from_grid(offset_bias: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """Dense bias ``(heads, H * W, H * W)`` of every query against every key in raster order."""
    return bias_rows_keys_reversed(offset_bias, feat_size).flip(-1)
