""" LIT: Less attention vIsion Transformer

Paper: `Less is More: Pay Less Attention in Vision Transformers` - https://arxiv.org/abs/2105.14217 (AAAI 2022)

@inproceedings{pan2022litv1,
  title={Less is More: Pay Less Attention in Vision Transformers},
  author={Pan, Zizheng and Zhuang, Bohan and He, Haoyu and Liu, Jing and Cai, Jianfei},
  booktitle={AAAI},
  year={2022}
}

Re-implemented from the paper and the authors' Apache-2.0 code at https://github.com/ziplab/LIT; the flavours
(LIT-Ti, LIT-S/M/B) and the deviations from that code are described in docs/lit.md.

Modifications and timm support for lesa-lit-models.
"""
import logging
import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, get_device_dtype, \
    register_notrace_function, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import checkpoint as grad_checkpoint, generate_default_cfgs, register_model

from ._builder import build_model_with_weights
from ._state_dict import backbone_state_dict
from ._timm import feature_take_indices
from .layers.deform_merge import DeformableTokenMerging
from .layers.attn_impl import check_attn_impl, set_attn_impl
from .layers.banded_attention import banded_bias_attention, banded_bias_attention_op
from .layers.rel_pos import bias_from_grid, bias_row_keys_reversed, bias_rows_keys_reversed, \
    bias_rows_keys_reversed_vjp, bias_table_size, column_windows, relative_position_bias_grid, resample_bias_table

__all__ = ['LIT', 'checkpoint_filter_fn', 'OUTPUT_NORM_KEY']

_logger = logging.getLogger(__name__)


@register_notrace_function  # FX leaf (no leading underscore: FX does not autowrap private names)
def check_input_size(x: torch.Tensor, patch: int, num_stages: int):
    # the last kept stage needs at least one token: ceil(side / patch) >= 2 ** (num_stages - 1)
    need = 2 ** (num_stages - 1)
    if math.ceil(x.shape[-2] / patch) < need or math.ceil(x.shape[-1] / patch) < need:
        raise ValueError(
            f'Input of {x.shape[-2]}x{x.shape[-1]} pixels is too small: this LIT needs at least '
            f'{patch * (need - 1) + 1} pixels per side (stride {patch * need}); resize or pad the image.')


@register_notrace_function  # FX leaf: the output size is the input grid's
def resample_grid_pos_embed(pos_embed: torch.Tensor, pos_embed_grid: Tuple[int, int], feat_size: Tuple[int, int]):
    """Bilinear resampling of a ``(1, Gh * Gw, C)`` embedding of grid ``pos_embed_grid`` to ``feat_size``, in the
    embedding's precision (timm's ``resample_abs_pos_embed`` rounds float64 to float32)."""
    embed_map = pos_embed.unflatten(1, pos_embed_grid).permute(0, 3, 1, 2)
    embed_map = F.interpolate(embed_map.to(torch.promote_types(embed_map.dtype, torch.float32)), size=feat_size,
                              mode='bilinear', align_corners=False)
    return embed_map.to(pos_embed.dtype).flatten(2).transpose(1, 2)


# banded_bias_attention's bias function and its vjp; the shared bias is the offset grid
def _bias_of_rows(query_bias, offset_bias, first_row, num_rows, feat_size):
    if isinstance(first_row, torch.Tensor):  # a step of the exported scan: offset_bias is column_windows' table
        return bias_row_keys_reversed(offset_bias, feat_size, first_row).unsqueeze(0)
    return bias_rows_keys_reversed(offset_bias, feat_size, first_row, num_rows).unsqueeze(0)


def _bias_of_rows_vjp(grad, query_bias, offset_bias, first_row, num_rows, feat_size):
    return None, bias_rows_keys_reversed_vjp(grad.squeeze(0), feat_size, first_row, num_rows)


_offset_bias_attention = banded_bias_attention_op('lit_offset_bias_attention', _bias_of_rows, _bias_of_rows_vjp,
                                                   export_shared_bias=column_windows)


@register_notrace_function  # FX leaf: it reads the shapes, the device and the autocast state of its inputs
def attend_in_row_bands(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        offset_bias: torch.Tensor,
        feat_size: Tuple[int, int],
        max_logits: Optional[int] = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` over an ``H x W`` map, one band of at most ``max_logits`` logits at a
    time, the bias of each band expanded from ``offset_bias`` against keys and values in reverse order."""
    return banded_bias_attention(_offset_bias_attention, q, k.flip(-2), v.flip(-2), feat_size,
                                 shared_bias=offset_bias, max_logits=max_logits)


class LITAttention(nn.Module):
    """Global multi-head self-attention over all tokens of a stage, with a relative position bias table over the
    ``rel_pos_grid`` grid (LIT-S/M/B) if given.

    ``attn_impl='fused'`` attends through SDPA, in bands of query rows where there is a bias
    (:func:`attend_in_row_bands`); ``'reference'`` materialises the attention as the authors' code does.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            rel_pos_grid: Optional[Tuple[int, int]] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            attn_impl: str = 'fused',
            max_chunk_logits: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads}).')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.attn_impl = check_attn_impl(attn_impl)
        self.max_chunk_logits = max_chunk_logits

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if rel_pos_grid is not None:
            self.table_size = bias_table_size(rel_pos_grid)
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros(self.table_size[0] * self.table_size[1], num_heads, **dd))
            trunc_normal_(self.relative_position_bias_table, std=.02)
        else:
            self.table_size = None
            self.register_parameter('relative_position_bias_table', None)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        offset_bias = None
        if self.relative_position_bias_table is not None:
            offset_bias = relative_position_bias_grid(
                self.relative_position_bias_table, self.table_size, feat_size, q.dtype)
        dropout_p = self.attn_drop.p if self.training else 0.
        if offset_bias is None and self.attn_impl == 'fused':
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        elif self.attn_impl == 'fused' and not dropout_p:
            x = attend_in_row_bands(q, k, v, offset_bias, feat_size, self.max_chunk_logits)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if offset_bias is not None:
                attn = attn + bias_from_grid(offset_bias, feat_size).unsqueeze(0)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class MLPBlock(nn.Module):
    """Stage 1-2 block: ``x + DropPath(MLP(LN(x)))``, no token mixing; the norm keeps its upstream name ``norm2``.

    ``recompute_act`` keeps only ``fc1``'s output for backward in training and recomputes the rest of the MLP.
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Any = nn.LayerNorm,
            recompute_act: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.recompute_act = recompute_act
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def mlp_after_fc1(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rest of timm's ``Mlp.forward`` after ``fc1``."""
        mlp = self.mlp
        return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(hidden)))))

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        hidden = self.mlp.fc1(self.norm2(x))
        if self.recompute_act and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            out = grad_checkpoint(self.mlp_after_fc1, hidden)
        else:
            out = self.mlp_after_fc1(hidden)
        return x + self.drop_path(out)


class AttentionBlock(nn.Module):
    """Stage 3-4 block: ``x + DropPath(MSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``; ``attn_kwargs`` go to
    :class:`LITAttention`."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Any = nn.LayerNorm,
            attn_kwargs: Optional[Dict[str, Any]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = LITAttention(dim, num_heads=num_heads, proj_drop=proj_drop, **(attn_kwargs or {}), **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class LITStage(nn.Module):
    """One LIT stage on NHWC maps: optional DTM (stages 2-4), optional absolute position embedding (LIT-Ti, prefix
    slots first, resampled to each input grid), blocks. ``prefix_tokens`` (LIT-Ti's class token) join the attention,
    and the stage then returns the ``(B, num_prefix + H * W, C)`` tokens."""

    def __init__(
            self,
            dim: int,
            dim_out: int,
            depth: int,
            downsample: bool,
            use_attn: bool,
            num_heads: int,
            mlp_ratio: float = 4.,
            pos_embed_grid: Optional[Tuple[int, int]] = None,
            num_prefix_tokens: int = 0,
            proj_drop: float = 0.,
            drop_path: Sequence[float] = (),
            norm_layer: Any = nn.LayerNorm,
            attn_kwargs: Optional[Dict[str, Any]] = None,
            recompute_mlp_act: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.downsample = DeformableTokenMerging(dim, dim_out, **dd) if downsample else None
        self.pos_embed_grid = pos_embed_grid
        self.num_prefix_tokens = num_prefix_tokens
        if pos_embed_grid is not None:
            num_pos = num_prefix_tokens + pos_embed_grid[0] * pos_embed_grid[1]
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, dim_out, **dd))
            trunc_normal_(self.pos_embed, std=.02)
        else:
            self.register_parameter('pos_embed', None)
        drop_path = list(drop_path) or [0.] * depth
        if use_attn:
            block_fn = partial(AttentionBlock, num_heads=num_heads, attn_kwargs=attn_kwargs)
        else:
            block_fn = partial(MLPBlock, recompute_act=recompute_mlp_act)
        self.blocks = nn.ModuleList([
            block_fn(
                dim_out, mlp_ratio=mlp_ratio, proj_drop=proj_drop, drop_path=drop_path[i], norm_layer=norm_layer, **dd)
            for i in range(depth)])

    def grid_pos_embed(self, feat_size: Tuple[int, int]) -> torch.Tensor:
        """The grid part of the position embedding, resampled to ``feat_size`` (the identity at its own size)."""
        return resample_grid_pos_embed(self.pos_embed[:, self.num_prefix_tokens:], self.pos_embed_grid, feat_size)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's token merging (DTM) of an NHWC map, identity for the first stage."""
        if self.downsample is None:
            return x
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, prefix_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_blocks(self.merge(x), prefix_tokens)

    def forward_blocks(self, x: torch.Tensor, prefix_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Position embedding and blocks on a merged NHWC map; with ``prefix_tokens``, returns the tokens
        ``(B, prefix + H * W, C)`` instead of the map."""
        B, H, W, C = x.shape
        feat_size = (H, W)
        x = x.reshape(B, H * W, C)
        if self.pos_embed is not None:
            x = x + self.grid_pos_embed(feat_size)
        if prefix_tokens is not None:
            if self.pos_embed is not None:
                prefix_tokens = prefix_tokens + self.pos_embed[:, :self.num_prefix_tokens]
            x = torch.cat([prefix_tokens, x], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = grad_checkpoint(block, x, feat_size)
            else:
                x = block(x, feat_size)
        if prefix_tokens is not None:
            return x
        return x.reshape(B, H, W, C)


class LIT(nn.Module):
    """LIT (Less attention vIsion Transformer), both flavours (docs/lit.md).

    Args:
        in_chans: Input channels.
        num_classes: Classifier classes (0 for none).
        global_pool: ``'token'`` (class token, LIT-Ti), ``'avg'`` (LIT-S/M/B) or ``''``.
        embed_dims, depths, num_heads, mlp_ratios: Per-stage widths, block counts, heads, MLP ratios.
        attn_stages: Which stages use attention blocks (the others MLP-only blocks).
        patch_size: Stem patch size.
        qkv_bias: Bias on the qkv projection.
        pos_embed: ``'abs'`` (absolute embedding per stage, LIT-Ti) or ``'rel'`` (bias table per block, LIT-S/M/B).
        class_token: Class token joining the last stage (LIT-Ti).
        img_size: Input size the position parameters are laid out for; any input size runs.
        norm_eps: LayerNorm eps of the blocks and the final norm (the stem's is 1e-5).
        drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: Classifier, projection, attention dropout and
            stochastic depth (linear over all blocks).
        attn_impl: ``'fused'`` (default) or ``'reference'`` (:class:`LITAttention`).
        max_chunk_logits: Logits per band of the fused biased attention (default: per device).
        recompute_mlp_act: Recompute the stage 1-2 MLP activations in backward (:class:`MLPBlock`).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            mlp_ratios: Sequence[float] = (4., 4., 4., 4.),
            attn_stages: Sequence[bool] = (False, False, True, True),
            patch_size: int = 4,
            qkv_bias: bool = True,
            pos_embed: str = 'rel',
            class_token: bool = False,
            img_size: Union[int, Tuple[int, int]] = 224,
            norm_eps: float = 1e-5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            attn_impl: str = 'fused',
            max_chunk_logits: Optional[int] = None,
            recompute_mlp_act: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if pos_embed not in ('abs', 'rel'):
            raise ValueError(f"pos_embed={pos_embed!r}: use 'abs' (LIT-Ti) or 'rel' (LIT-S/M/B).")
        if class_token and pos_embed != 'abs':
            raise ValueError("class_token=True needs pos_embed='abs' (the LIT-Ti layout).")
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(attn_stages) == num_stages):
            raise ValueError('embed_dims, depths, num_heads, mlp_ratios and attn_stages need one entry per stage.')
        attn_kwargs = dict(
            qkv_bias=qkv_bias, attn_drop=attn_drop_rate, attn_impl=check_attn_impl(attn_impl),
            max_chunk_logits=max_chunk_logits)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_prefix_tokens = 1 if class_token else 0
        self.output_fmt = 'NHWC'
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dims[0],
            norm_layer=partial(nn.LayerNorm, eps=1e-5),
            output_fmt='NHWC',
            strict_img_size=False,  # any input size (also tells timm's export that the size is not fixed)
            dynamic_img_pad=True,
            **dd,
        )
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1], **dd))
            trunc_normal_(self.cls_token, std=.02)
        else:
            self.register_parameter('cls_token', None)

        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            stride = patch_size * 2 ** i
            stage_grid = (self.img_size[0] // stride, self.img_size[1] // stride)
            stages.append(LITStage(
                dim=embed_dims[max(i - 1, 0)],
                dim_out=embed_dims[i],
                depth=depths[i],
                downsample=i > 0,
                use_attn=attn_stages[i],
                num_heads=num_heads[i],
                mlp_ratio=mlp_ratios[i],
                pos_embed_grid=stage_grid if pos_embed == 'abs' else None,
                num_prefix_tokens=self.num_prefix_tokens if i == num_stages - 1 else 0,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                attn_kwargs=dict(attn_kwargs, rel_pos_grid=stage_grid if pos_embed == 'rel' else None),
                recompute_mlp_act=recompute_mlp_act,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.norm = norm_layer(self.num_features, **dd)
        self.global_pool = self._check_global_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_global_pool(self, global_pool: str) -> str:
        if global_pool not in ('token', 'avg', ''):
            raise ValueError(f"global_pool={global_pool!r}: use 'token', 'avg' or ''.")
        if global_pool == 'token' and self.cls_token is None:
            raise ValueError("global_pool='token' needs the class token (LIT-Ti, before any head pruning).")
        return global_pool

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {
            name for name, _ in self.named_parameters()
            if name == 'cls_token' or name.endswith(('.pos_embed', '.relative_position_bias_table'))
        }

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(?:downsample|pos_embed)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^cls_token|^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_attn_impl(self, attn_impl: str):
        """Switch every attention block between ``'fused'`` and ``'reference'``."""
        set_attn_impl(self, attn_impl, LITAttention)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = self._check_global_pool(global_pool)
        self.head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) if num_classes > 0 \
            else nn.Identity()

    def _class_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_token.expand(x.shape[0], -1, -1)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stage outputs (after their blocks, before the next DTM).

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n stages if int, all if None, the listed ones if a sequence.
            norm: Apply the final norm to the last stage's map.
            stop_early: Stop after the last requested stage.
            output_fmt: ``'NCHW'`` or ``'NHWC'``.
            intermediates_only: Only return the intermediates.

        For LIT-Ti the stage-4 map is computed without the class token (the detection backbone's features), and
        the final output is that of :meth:`forward_features`, the map entering the class-token stage.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'.")
        check_input_size(x, self.patch_embed.patch_size[0], len(self.stages))
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early and not torch.jit.is_scripting() else self.stages
        class_token_stage = None
        if self.cls_token is not None and len(stages) == len(self.stages):
            *stages, class_token_stage = stages

        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self._intermediate(x, norm and i == last_index, output_fmt))
        if class_token_stage is not None and (last_index in take_indices or not intermediates_only):
            x = class_token_stage.merge(x)  # the final output, as forward_features
            if last_index in take_indices:  # the stage's blocks without the class token
                intermediates.append(self._intermediate(class_token_stage.forward_blocks(x), norm, output_fmt))

        if intermediates_only:
            return intermediates
        return (x if self.cls_token is not None else self.norm(x)), intermediates

    def _intermediate(self, x: torch.Tensor, norm: bool, output_fmt: str) -> torch.Tensor:
        x = self.norm(x) if norm else x
        return x.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else x

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices``; with the head also drop the class token."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.cls_token = None  # only the classifier reads it
            self.num_prefix_tokens = 0
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled NHWC map the head reads: the normalised last-stage output, or with a class token (LIT-Ti)
        the map entering the last stage, whose blocks attend over the class token and the map together and so
        belong to the class-token readout in :meth:`forward_head`."""
        check_input_size(x, self.patch_embed.patch_size[0], len(self.stages))
        x = self.patch_embed(x)
        if self.cls_token is None:
            return self.norm(self.stages(x))
        *stages, last = self.stages  # the installed stage modules (a slice would be a new, untraceable Sequential)
        for stage in stages:
            x = stage(x)
        return last.merge(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.cls_token is not None:  # the last stage with the class token, then the final norm
            B, H, W, C = x.shape
            tokens = self.norm(self.stages[-1].forward_blocks(x, prefix_tokens=self._class_tokens(x)))
            x = tokens[:, self.num_prefix_tokens:].reshape(B, H, W, C)
            if self.global_pool == 'token':
                x = tokens[:, 0]
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_UPSTREAM_TI_RENAMES = (
    (re.compile(r'^patch_embed1\.'), lambda m: 'patch_embed.'),
    (re.compile(r'^patch_embed([234])\.'), lambda m: f'stages.{int(m[1]) - 1}.downsample.'),
    (re.compile(r'^pos_embed([1234])$'), lambda m: f'stages.{int(m[1]) - 1}.pos_embed'),
    (re.compile(r'^block([1234])\.'), lambda m: f'stages.{int(m[1]) - 1}.blocks.'),
)
_UPSTREAM_SMB_RENAMES = (
    (re.compile(r'^layers\.(\d+)\.downsample\.'), lambda m: f'stages.{int(m[1]) + 1}.downsample.'),
    (re.compile(r'^layers\.(\d+)\.blocks\.'), lambda m: f'stages.{m[1]}.blocks.'),
)
# LayerNorms the authors' detection/segmentation LIT backbone applies to its outputs (norm1..3; mmseg also norm0)
OUTPUT_NORM_KEY = re.compile(r'^norm(\d+)\.')
_READOUT_KEYS = ('cls_token', 'norm.', 'head.')
_BIAS_TABLE_KEY = re.compile(r'^(?:layers|stages)\.(\d+)\.blocks\.\d+\.attn\.relative_position_bias_table$')


def _rename(key: str, renames) -> str:
    for pattern, repl in renames:
        key, count = pattern.subn(repl, key)
        if count:
            break
    return key


def _square_side(num_positions: int) -> Optional[int]:
    side = math.isqrt(num_positions)
    return side if side * side == num_positions else None


def _square_grid(num_positions: int, key: str) -> Tuple[int, int]:
    side = _square_side(num_positions)
    if side is None:
        raise ValueError(f'{key} has {num_positions} positions, not a square grid; cannot resample it.')
    return side, side


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: LIT) -> Dict[str, torch.Tensor]:
    """Convert an original LIT checkpoint (or pass through a timm-format one) to this model's state dict.

    Accepts the authors' classification checkpoints (LIT-Ti flat ``patch_embed1..4/pos_embed1..4/block1..4``
    layout, LIT-S/M/B ``layers.*`` layout; bare or under ``'model'``), their mmdet COCO checkpoints
    (``state_dict`` with ``backbone.*``; neck and heads are ignored) and already converted timm state dicts.
    Drops the rebuilt ``relative_position_index`` buffers and the detection output norms (the detection adapter's
    ``out_norms``), resamples bias tables (bicubic) and position embeddings (bilinear) whose
    grid differs from the model's, and keeps the model's own class token / final norm / classifier when the
    checkpoint is a detection backbone without them.
    """
    state_dict = backbone_state_dict(state_dict)
    if not any(k.startswith('stages.') for k in state_dict):
        renames = _UPSTREAM_TI_RENAMES if any(k.startswith('patch_embed1.') for k in state_dict) \
            else _UPSTREAM_SMB_RENAMES
        state_dict = {_rename(k, renames): v for k, v in state_dict.items()}

    dropped_norms = sorted(k for k in state_dict if OUTPUT_NORM_KEY.match(k))
    if dropped_norms:
        _logger.info(f'Dropping detection output norms {dropped_norms}; the detection adapter loads them.')
    model_state = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k.endswith('relative_position_index') or OUTPUT_NORM_KEY.match(k):
            continue
        target = model_state.get(k)
        if target is not None and v.shape != target.shape:
            if k.endswith('relative_position_bias_table') and v.shape[1] == target.shape[1]:
                table_size = model.get_submodule(k.rsplit('.', 1)[0]).table_size
                v = resample_bias_table(v, _square_grid(v.shape[0], k), table_size)
                _logger.info(f'Resampled {k} to {table_size[0]}x{table_size[1]}.')
            elif k.endswith('.pos_embed') and v.shape[2] == target.shape[2]:
                stage = model.get_submodule(k.rsplit('.', 1)[0])
                prefix = stage.num_prefix_tokens
                old_grid = _square_grid(v.shape[1] - prefix, k)
                v = resample_abs_pos_embed(
                    v, new_size=list(stage.pos_embed_grid), old_size=list(old_grid), num_prefix_tokens=prefix,
                    interpolation='bilinear', antialias=False, align_corners=False)
                _logger.info(f'Resampled {k} from {old_grid} to {stage.pos_embed_grid}.')
        out[k] = v

    if 'head.weight' not in out:
        # a detection backbone: keep the model's class token, final norm and classifier as initialised
        kept = [k for k in model_state if k.startswith(_READOUT_KEYS) and k not in out]
        out.update({k: model_state[k] for k in kept})
        if kept:
            _logger.info(f'Checkpoint has no classifier; keeping initial {kept}.')
    return out


def _checkpoint_img_size(state_dict: Dict[str, torch.Tensor], patch_size: int = 4) -> Optional[Tuple[int, int]]:
    """The ``img_size`` the relative bias tables of a checkpoint were laid out for (None if not derivable)."""
    sizes = set()
    for k, v in state_dict.items():
        m = _BIAS_TABLE_KEY.match(k)
        if m is None:
            continue
        side = _square_side(v.shape[0])
        if side is None or side % 2 == 0:
            return None
        sizes.add((side + 1) // 2 * patch_size * 2 ** int(m[1]))
    return (sizes.pop(),) * 2 if len(sizes) == 1 else None


def _kwargs_for_checkpoint(checkpoint: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if 'img_size' in kwargs:
        return kwargs
    # keep a checkpoint's bias tables at their own size (the COCO ones), so that the runtime resampling reproduces
    # the authors' detection backbone (docs/lit.md)
    img_size = _checkpoint_img_size(backbone_state_dict(checkpoint))
    if img_size is None or img_size == (224, 224):
        return kwargs
    _logger.info(f'Building LIT with img_size={img_size} to match the checkpoint tables.')
    return dict(kwargs, img_size=img_size)


def _create_lit(variant: str, pretrained: bool = False, **kwargs) -> LIT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_weights(
        LIT,
        variant,
        pretrained,
        checkpoint_filter_fn,
        kwargs_for_checkpoint=_kwargs_for_checkpoint,
        feature_cfg=dict(feature_cls='getter', flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2105.14217', 'paper_name': 'Less is More: Pay Less Attention in Vision Transformers',
        **kwargs,
    }


def _in1k_cfg(name: str, top1: float, params: str, flops: str, **kwargs) -> Dict[str, Any]:
    return _cfg(
        url=f'https://github.com/ziplab/LIT/releases/download/v1.0/{name}.pth',
        origin_url='https://github.com/ziplab/LIT',
        description=f'{name.upper().replace("_", "-")} ImageNet-1k classifier by the LIT authors.',
        notes=(
            f'Reported by the authors: {top1}% top-1 on ImageNet-1k val (224x224, center crop 0.875), '
            f'{params} parameters, {flops} FLOPs.',
        ),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'lit_ti.in1k': _in1k_cfg('lit_ti', 81.1, '19 M (19.89 M with the classifier)', '3.6 G'),
    'lit_s.in1k': _in1k_cfg('lit_s', 81.5, '27 M (27.97 M with the classifier)', '4.1 G'),
    'lit_m.in1k': _in1k_cfg('lit_m', 83.0, '48 M (49.37 M with the classifier)', '8.6 G'),
    'lit_b.in1k': _in1k_cfg('lit_b', 83.4, '86 M (87.29 M with the classifier)', '15.0 G'),
})


@register_model
def lit_ti(pretrained: bool = False, **kwargs) -> LIT:
    """LIT-Ti: absolute position embeddings per stage, class token in stage 4 (upstream drop_path_rate 0.1)."""
    model_args = dict(
        embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8., 8., 4., 4.),
        pos_embed='abs', class_token=True, global_pool='token', norm_eps=1e-6)
    return _create_lit('lit_ti', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lit_s(pretrained: bool = False, **kwargs) -> LIT:
    """LIT-S: relative position bias over each stage grid, mean pooling (upstream drop_path_rate 0.2)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_lit('lit_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lit_m(pretrained: bool = False, **kwargs) -> LIT:
    """LIT-M: LIT-S with 18 attention blocks in stage 3 (upstream drop_path_rate 0.3)."""
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_lit('lit_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lit_b(pretrained: bool = False, **kwargs) -> LIT:
    """LIT-B: width 128, 18 attention blocks in stage 3 (upstream drop_path_rate 0.5)."""
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_lit('lit_b', pretrained=pretrained, **dict(model_args, **kwargs))
