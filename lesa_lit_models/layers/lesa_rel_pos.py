"""Relative position logits of LESA's ``detection_qr`` embedding and the offset index of both embeddings.

A relative table holds one row per offset along one axis: row ``o + S - 1`` is offset ``o`` for a side of ``S``
tokens, so a table covers ``2S - 1`` offsets. ``detection_qr`` has one table per axis, ``rel_height`` (2H-1, d) and
``rel_width`` (2W-1, d), read by the queries only; they are resampled to the grid of each input
(:func:`resample_rel_table`). The reference binary term and the fused one build their logits from the same helpers.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ['offset_index', 'relative_tables_2d', 'relative_logits_2d', 'relative_logits_of_rows',
           'expand_relative_logits', 'resample_rel_table']


def offset_index(size: int, device: torch.device) -> torch.Tensor:
    """``index[a, b] = a - b + size - 1``: row of a relative table for the offset ``a - b``."""
    pos = torch.arange(size, device=device)
    return pos[:, None] - pos[None, :] + size - 1


def relative_tables_2d(
        rel_height: torch.Tensor, rel_width: torch.Tensor, grid: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``height_table[x, x'] = rel_height[x' - x + H - 1]`` (H, H, d), the key-row offset seen from query row x, and
    ``width_table[y, y'] = rel_width[y' - y + W - 1]`` (W, W, d)."""
    height, width = grid
    return tuple(rel.index_select(0, offset_index(size, rel.device).t().flatten()).view(size, size, rel.shape[1])
                 for rel, size in ((rel_height, height), (rel_width, width)))


def relative_logits_2d(
        q: torch.Tensor,
        rel_height: torch.Tensor,
        rel_width: torch.Tensor,
        grid: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query against every key row and key column offset: ``rh`` (N, G, L, H) and ``rw`` (N, G, L, W).

    Tokens are in raster order over ``grid = (H, W)``: token i sits at row ``x_i = i // W``, column ``y_i = i % W``;
    ``rh[i, x'] = q_i . rel_height[x' - x_i + H - 1]`` and ``rw[i, y'] = q_i . rel_width[y' - y_i + W - 1]``.
    q: (N, G, H*W, d); rel_height: (2H-1, d); rel_width: (2W-1, d). The 2-D relative logits are
    :func:`expand_relative_logits` of the pair.
    """
    return relative_logits_of_rows(q, *relative_tables_2d(rel_height, rel_width, grid))


def relative_logits_of_rows(
        q: torch.Tensor, height_table: torch.Tensor, width_table: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`relative_logits_2d` of queries that fill whole rows of the grid, q (N, G, rows * W, d), from the rows
    of ``height_table`` they sit on (rows, H, d) and ``width_table`` (W, W, d) (:func:`relative_tables_2d`)."""
    batch, groups, tokens, dim = q.shape
    (rows, height), width = height_table.shape[:2], width_table.shape[0]
    q_grid = q.reshape(batch, groups, rows, width, dim)
    # matmuls batched over the query row (rh) and column (rw), not einsum: OpenVINO fails on an exported Einsum
    # inside a Loop (the exported banded attention)
    rh = torch.matmul(q_grid, height_table.transpose(-1, -2)).reshape(batch, groups, tokens, height)
    rw = torch.matmul(q_grid.transpose(2, 3), width_table.transpose(-1, -2)).transpose(2, 3).reshape(
        batch, groups, tokens, width)
    return rh, rw


def expand_relative_logits(rh: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
    """``qr[..., i, j] = rh[..., i, x_j] + rw[..., i, y_j]`` for every key j of the grid: (..., Lq, H * W)."""
    return (rh[..., :, None] + rw[..., None, :]).flatten(-2)


def resample_rel_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resample a (2S-1, d) table of 1-D relative offsets to (length, d), length = 2S'-1.

    Linear interpolation along the offset axis with ``align_corners=True``: the zero offset (centre row)
    and the two extreme offsets stay put, and offset ``o`` on the new grid reads the old table at
    ``o * (S-1) / (S'-1)``, i.e. offsets scale with the image, as when resizing the input.
    """
    # a size only known as a symbol (torch.export / dynamic shapes) interpolates: exact at equal sizes, no specialising
    if statically_known_true(table.shape[0] == length):
        return table
    if length == 1:  # a 1-token side only has the zero offset
        centre = (table.shape[0] - 1) // 2
        return table[centre:centre + 1]
    return F.interpolate(table.t()[None], size=length, mode='linear', align_corners=True)[0].t()
