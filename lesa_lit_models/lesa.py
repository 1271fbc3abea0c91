""" LESA-ResNet: ResNet-50 / Wide-ResNet-50 with Locally Enhanced Self-Attention

Paper: `Locally Enhanced Self-Attention: Combining Self-Attention and Convolution as Local and Context Terms`
    - https://arxiv.org/abs/2107.05637

Rebuilt from the authors' ImageNet (https://github.com/Chenglin-Yang/LESA_classification) and COCO
(https://github.com/Chenglin-Yang/LESA_detection, an mmdetection 2.x fork) code; the mmcv parts use
``torchvision.ops.deform_conv2d``. Parameter names are the authors' (torchvision ResNet names plus those of
:class:`~lesa_lit_models.layers.lesa_attention.Lesa`), so their checkpoints load without renaming.

The four models, their weights and the deviations from the authors' code are described in docs/lesa.md.
"""
import logging
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, create_classifier, get_device_dtype, to_2tuple
from timm.models import generate_default_cfgs, register_model

from ._builder import ReleasePretrainedCfg, build_model_with_weights
from ._state_dict import backbone_state_dict
from ._timm import feature_take_indices
from .layers.attn_impl import set_attn_impl
from .layers.deform_conv import DeformConv2dPack
from .layers.lesa_attention import Lesa
from .layers.lesa_rel_pos import resample_rel_table

__all__ = ['LesaResNet', 'LesaBottleneck', 'checkpoint_filter_fn', 'keys_kept_at_init']

_logger = logging.getLogger(__name__)


class LesaBottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3) whose 3x3 is a conv, a DCN v1, or a LESA module.

    A LESA block has no ``bn2``: the LESA output (normalised inside) goes straight to the activation.
    """
    expansion = 4

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            base_width: int = 64,
            spatial_mixer: str = 'conv',
            feat_size: Optional[Tuple[int, int]] = None,
            input_reduction: Optional[int] = None,
            attn_kwargs: Optional[Dict[str, Any]] = None,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chs: Input channels.
            planes: Bottleneck planes; output channels are ``planes * 4``.
            stride: Stride of the 3x3 position (LESA: attend on the input grid, then average-pool).
            downsample: Shortcut projection.
            base_width: 64 for ResNet-50, 128 for Wide-ResNet-50-2.
            spatial_mixer: ``'conv'``, ``'dcn'`` or ``'lesa'``.
            feat_size: Token grid of the block input (LESA only).
            input_reduction: Stride of the block input w.r.t. the image (LESA error messages only).
            attn_kwargs: Further :class:`Lesa` kwargs (groups, pos_embed, deformable, attn_impl, max_chunk_logits,
                recompute_gate).
            drop_path: Stochastic depth rate.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        width = planes * base_width // 64
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(width, **dd)
        self.act1 = nn.ReLU(inplace=True)
        if spatial_mixer == 'lesa':
            self.conv2 = Lesa(
                width, feat_size, stride=stride, input_reduction=input_reduction, **(attn_kwargs or {}), **dd)
            self.bn2 = nn.Identity()
        elif spatial_mixer == 'dcn':
            self.conv2 = DeformConv2dPack(width, width, 3, stride=stride, padding=1, bias=False, **dd)
            self.bn2 = nn.BatchNorm2d(width, **dd)
        elif spatial_mixer == 'conv':
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False, **dd)
            self.bn2 = nn.BatchNorm2d(width, **dd)
        else:
            raise ValueError(f'Unknown spatial_mixer {spatial_mixer!r}; use "conv", "dcn" or "lesa".')
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(out_chs, **dd)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class LesaResNet(nn.Module):
    """ResNet-50 family with LESA in the last stages (torchvision / authors' module names).

    Children in forward order: ``conv1, bn1, act1, maxpool, layer1..layer4, global_pool, fc``.
    Feature taps: 0 ``act1`` (stride 2), 1-4 ``layer1..4``.
    """
    __jit_unused_properties__ = ['grad_checkpointing']

    def __init__(
            self,
            layers: Sequence[int] = (3, 4, 6, 3),
            base_width: int = 64,
            strides: Sequence[int] = (1, 2, 2, 1),
            img_size: Union[int, Tuple[int, int]] = 224,
            pos_embed: str = 'classification',
            lesa_stages: Sequence[bool] = (False, False, True, True),
            plain_first_block: Sequence[bool] = (True, True, True, False),
            dcn_stages: Sequence[bool] = (False, False, False, False),
            lesa_groups: int = 8,
            attn_impl: str = 'fused',
            max_chunk_logits: Optional[int] = None,
            recompute_gate: bool = True,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            layers: Blocks per stage.
            base_width: Bottleneck width per 64 planes (64: ResNet-50, 128: Wide-ResNet-50-2).
            strides: Stride of each stage's first block.
            img_size: Input size the position tables are built for (any size for ``detection_qr``, which
                resamples; exactly this size for ``classification``).
            pos_embed: ``'classification'`` or ``'detection_qr'``.
            lesa_stages: Stages whose 3x3 convs are LESA modules.
            plain_first_block: Keep a conv in the first block of a LESA stage.
            dcn_stages: Stages whose 3x3 convs (and LESA unary convs) are deformable.
            lesa_groups: Attention heads / unary conv groups.
            attn_impl: LESA ``detection_qr`` binary term, ``'fused'`` (default) or ``'reference'`` (same results;
                also :meth:`set_attn_impl`).
            max_chunk_logits: Logits per band of the fused binary term (see :class:`Lesa`).
            recompute_gate: In training, the LESA modules recompute their terms' norms and fusion gate in backward
                instead of keeping them (exact; see :class:`Lesa`). Independent of :meth:`set_grad_checkpointing`.
            num_classes: Classifier classes (0: no classifier).
            in_chans: Input channels.
            global_pool: Global pooling type.
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth, linearly increasing over blocks.
            zero_init_last: Zero-init the last BN of each block (the authors did not for ImageNet).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.pos_embed = pos_embed
        self.img_size = to_2tuple(img_size)
        net_stride = 4
        for s in strides:
            net_stride *= s
        if self.img_size[0] % net_stride or self.img_size[1] % net_stride:
            raise ValueError(f'img_size {self.img_size} must be a multiple of the network stride {net_stride}.')

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(64, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module='act1')]

        attn_kwargs = dict(groups=lesa_groups, pos_embed=pos_embed, attn_impl=attn_impl,
                           max_chunk_logits=max_chunk_logits, recompute_gate=recompute_gate)
        dpr = calculate_drop_path_rates(drop_path_rate, list(layers), stagewise=True)  # linear over all blocks
        in_chs = 64
        reduction = 4
        for stage_idx, (depth, stage_stride) in enumerate(zip(layers, strides)):
            planes = 64 * 2 ** stage_idx
            out_chs = planes * LesaBottleneck.expansion
            downsample = None
            if stage_stride != 1 or in_chs != out_chs:
                downsample = nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride=stage_stride, bias=False, **dd),
                    nn.BatchNorm2d(out_chs, **dd),
                )
            blocks = []
            for i in range(depth):
                use_lesa = lesa_stages[stage_idx] and not (i == 0 and plain_first_block[stage_idx])
                blocks.append(LesaBottleneck(
                    in_chs,
                    planes,
                    stride=stage_stride if i == 0 else 1,
                    downsample=downsample if i == 0 else None,
                    base_width=base_width,
                    spatial_mixer='lesa' if use_lesa else 'dcn' if dcn_stages[stage_idx] else 'conv',
                    feat_size=(self.img_size[0] // reduction, self.img_size[1] // reduction),
                    input_reduction=reduction,
                    attn_kwargs=dict(attn_kwargs, deformable=dcn_stages[stage_idx]),
                    drop_path=dpr[stage_idx][i],
                    **dd,
                ))
                in_chs = out_chs
                if i == 0:
                    reduction *= stage_stride
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'layer{stage_idx + 1}'))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False):
        """Kaiming (fan-out) convs as the authors' ResNet, zero DCN offsets; LESA tables keep their own init."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, DeformConv2dPack)):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        for m in self.modules():
            if isinstance(m, DeformConv2dPack):
                nn.init.zeros_(m.conv_offset.weight)
                nn.init.zeros_(m.conv_offset.bias)
            elif zero_init_last and isinstance(m, LesaBottleneck):
                m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        tables = ('.relative', '.rel_height', '.rel_width')
        return {name for name, _ in self.named_parameters() if name.endswith(tables)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute the LESA unary and binary terms in backward: the authors' ``with_cp_UB_terms_only``, which
        their detection configs switch on, not timm ResNet's whole-block checkpointing.

        Those two terms hold what grows with the token grid (the attention's inputs and the unary conv's
        activations); the conv blocks and the fusion gate keep their activations. Outputs, gradients and BatchNorm
        running statistics equal those without checkpointing: the recomputation does not update the statistics a
        second time (upstream's did; its detectors keep the pretrained norms in eval mode).
        """
        for m in self.modules():
            if isinstance(m, Lesa):
                m.grad_checkpointing = enable

    @torch.jit.ignore
    def set_attn_impl(self, attn_impl: str):
        """Switch every LESA module between ``'fused'`` and ``'reference'``."""
        set_attn_impl(self, attn_impl, Lesa)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether the LESA modules recompute their terms in backward; assigning it calls
        :meth:`set_grad_checkpointing` (timm's hybrid embeddings set a backbone's flag directly)."""
        return any(m.grad_checkpointing for m in self.modules() if isinstance(m, Lesa))

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool):
        self.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False):
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the feature taps of ``feature_info`` selected by ``indices``.

        Args:
            x: Input images.
            indices: Last n taps if int, all if None, else the listed taps (negative allowed).
            norm: Unused (no final norm); kept for the timm API.
            stop_early: Stop after the last requested tap.
            output_fmt: Only ``'NCHW'``.
            intermediates_only: Return only the taps.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'Only the NCHW output format is supported, got {output_fmt!r}.')
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if stop_early:
            layers = layers[:max_index]
        for feat_idx, layer in enumerate(layers, start=1):
            x = layer(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last tap in ``indices`` (and the head); return the absolute tap indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for n in ('layer1', 'layer2', 'layer3', 'layer4')[max_index:]:
            setattr(self, n, nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Keys the COCO backbones do not take from ImageNet weights: the authors' detector init re-creates them.
_IMAGENET_KEYS_DROPPED = ('.relative', '.flatten_index', '.rel_height', '.rel_width')
_DET_KEYS_NOT_IN_IMAGENET = ('.conv_offset.', '.rel_height', '.rel_width')
_DET_KEYS_RESHAPED_FROM_IMAGENET = ('.bn_similarity.', '.bn_output.')


def _is_imagenet(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith('fc.') or k.endswith('.relative') for k in state_dict)


def _norms_reshaped_from_imagenet(state_dict: Dict[str, torch.Tensor], model_sd: Dict[str, torch.Tensor]) -> Set[str]:
    """The ``bn_similarity`` / ``bn_output`` modules whose ImageNet tensors have the classification shapes."""
    return {k.rsplit('.', 1)[0] for k, v in state_dict.items() if any(
        p in k for p in _DET_KEYS_RESHAPED_FROM_IMAGENET) and k in model_sd and model_sd[k].shape != v.shape}


def keys_kept_at_init(checkpoint: Any, model: LesaResNet) -> List[str]:
    """Keys of ``model`` that :func:`checkpoint_filter_fn` takes from the model's own init, not from ``checkpoint``.

    None, except for ImageNet weights in a COCO backbone (as the authors' detector init): the DCN offset convs and
    the 2-D position tables, and from the classification layout ``bn_similarity`` / ``bn_output`` too (whose
    statistics the detection adapter then keeps training under ``norm_eval``).
    """
    state_dict = backbone_state_dict(checkpoint)
    if model.pos_embed != 'detection_qr' or not _is_imagenet(state_dict):
        return []
    model_sd = model.state_dict()
    fresh_norms = _norms_reshaped_from_imagenet(state_dict, model_sd)
    return [k for k in model_sd if (k not in state_dict or _dropped_from_imagenet(k, fresh_norms)) and (
        any(p in k for p in _DET_KEYS_NOT_IN_IMAGENET) or k.rsplit('.', 1)[0] in fresh_norms)]


def _dropped_from_imagenet(key: str, fresh_norms: Set[str]) -> bool:
    return key.startswith('fc.') or key.endswith(_IMAGENET_KEYS_DROPPED) or key.rsplit('.', 1)[0] in fresh_norms


def _imagenet_to_detection(state_dict: Dict[str, torch.Tensor], model: LesaResNet) -> Dict[str, torch.Tensor]:
    """ImageNet weights -> COCO backbone, as the authors' detector init does.

    Two ImageNet layouts exist. The authors' COCO backbones start from separate "detection pretrain" files whose
    LESA layers already have the detection shapes (``bn_similarity`` 2G channels, ``bn_output`` C); like their
    init, ``fc``, ``relative``, ``flatten_index``, ``rel_height`` and ``rel_width`` are dropped and every other
    tensor of the file loads (an unexpected key or shape is an error). The classification weights (3G / 2C
    shapes) load the same way except for ``bn_similarity`` / ``bn_output``, which keep their fresh init (this
    package's extension). :func:`keys_kept_at_init` names the tensors that keep the model's fresh init.
    """
    model_sd = model.state_dict()
    fresh_norms = _norms_reshaped_from_imagenet(state_dict, model_sd)
    fresh = keys_kept_at_init(state_dict, model)
    out = {k: v for k, v in state_dict.items() if not _dropped_from_imagenet(k, fresh_norms)}
    layout = 'classification' if fresh_norms else 'detection pretrain'
    _logger.info(f'ImageNet weights ({layout} layout) into a COCO backbone: {len(fresh)} tensors keep their fresh '
                 f'init (DCN offsets, 2-D position tables{", bn_similarity / bn_output" if fresh_norms else ""}).')
    out.update({k: model_sd[k] for k in fresh})
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: LesaResNet) -> Dict[str, torch.Tensor]:
    """Authors' checkpoints (any format) or timm-format weights -> this model's state dict.

    Accepts the ImageNet training checkpoint (``{'net': ...}`` with DDP ``module.`` prefixes), a bare state
    dict, an mmdet COCO checkpoint (``state_dict`` with ``backbone.*`` keys; neck and heads are ignored) and
    already converted weights. The ``flatten_index`` buffer is dropped (rebuilt on the fly).

    For the COCO backbones (``detection_qr``):

    * ImageNet weights (a file with the ``fc`` classifier or ``relative`` tables: the authors' detection pretrain
      or classification files) are adapted as the authors' detector init does (:func:`_imagenet_to_detection`);
    * COCO weights load completely; ``rel_height`` / ``rel_width`` are resampled
      (:func:`~lesa_lit_models.layers.lesa_rel_pos.resample_rel_table`) when ``img_size`` differs.

    A checkpoint without the ``fc`` classifier (a COCO backbone) keeps the model's own, as LIT's filter does.
    Loading through timm checks the result strictly (:func:`~lesa_lit_models.strict_filter`).
    """
    state_dict = {k: v for k, v in backbone_state_dict(state_dict).items() if not k.endswith('.flatten_index')}
    model_sd = model.state_dict()
    if model.pos_embed == 'detection_qr' and _is_imagenet(state_dict):
        state_dict = _imagenet_to_detection(state_dict, model)
    elif model.pos_embed == 'detection_qr':
        for k, v in state_dict.items():
            if k.endswith(('.rel_height', '.rel_width')) and k in model_sd and v.shape[1:] == model_sd[k].shape[1:]:
                state_dict[k] = resample_rel_table(v.float(), model_sd[k].shape[0]).to(v.dtype)
    if not any(k.startswith('fc.') for k in state_dict):  # a COCO backbone: the model's classifier, if any, stays
        state_dict.update({k: v for k, v in model_sd.items() if k.startswith('fc.')})
    return state_dict


def _create_lesa(variant: str, pretrained: bool = False, **kwargs) -> LesaResNet:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4))
    return build_model_with_weights(
        LesaResNet,
        variant,
        pretrained,
        checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


_PAPER = dict(
    paper_name='Locally Enhanced Self-Attention: Combining Self-Attention and Convolution as Local and Context Terms',
    paper_ids='arXiv:2107.05637',
)


def _cfg(**kwargs) -> ReleasePretrainedCfg:
    return ReleasePretrainedCfg(**{
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14),
        'fixed_input_size': True, 'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD, 'first_conv': 'conv1', 'classifier': 'fc',
        **_PAPER, **kwargs,
    })


def _det_cfg(img_size: int, **kwargs) -> ReleasePretrainedCfg:
    return _cfg(
        num_classes=0, input_size=(3, img_size, img_size), pool_size=(img_size // 32, img_size // 32),
        fixed_input_size=False, crop_pct=1.0, license='apache-2.0', **kwargs,
    )


_ONEDRIVE = 'https://livejohnshopkins-my.sharepoint.com/:f:/g/personal/cyang76_jh_edu/'

# The authors' weights are OneDrive folders (no direct download): no url / hf_hub_id; pretrained=True without a
# file stops, naming the origin_url folder and the release_file in it.
default_cfgs = generate_default_cfgs({
    'lesa_resnet50.in1k': _cfg(
        origin_url=_ONEDRIVE + 'EnO2WCZcRwJJh1YsdHEZXOMBueC6q0baT4kWl_sI5SqjFQ?e=Wh9uWt',
        notes=('ImageNet-1k top-1 79.55, top-5 94.79 at 224 (authors\' numbers).',),
        release_file=('checkpoint.pth in the lesa_resnet50 folder of the LESA_classification README\'s '
                      '"Download" link (a OneDrive folder, no direct download).'),
    ),
    'lesa_wrn50.in1k': _cfg(
        origin_url=_ONEDRIVE + 'EgHuW1XQefNNkLCkRE1Ag4UBA96d7lBasZ4esEh3Re1mXA?e=jU72GG',
        notes=('ImageNet-1k top-1 80.18, top-5 95.07 at 224 (authors\' numbers).',),
        release_file=('checkpoint.pth in the lesa_wrn50 folder of the LESA_classification README\'s '
                      '"Download" link (a OneDrive folder, no direct download).'),
    ),
    'lesa_resnet50_det.coco': _det_cfg(
        1024,
        origin_url=_ONEDRIVE + 'Egpo87VmMmlEg0jY_KHYAJsBS7EFDJ4YxJ2zhkTxcJCzWg?e=SGSKmx',
        notes=('Backbone of the authors\' Mask R-CNN (FPN, 1024x1024, 20 epochs): COCO val box AP 44.0, mask AP '
               '39.2; test-dev box AP 44.2, mask AP 39.6 (authors\' numbers).',),
        release_file=('epoch_20.pth (the whole mmdet 2.x detector; its backbone.* keys are used) in the '
                      'Mask-RCNN "Model" folder of the LESA_detection README (OneDrive, no direct '
                      'download).'),
    ),
    'lesa_wrn50_det.coco': _det_cfg(
        1280,
        origin_url=_ONEDRIVE + 'EmSPz8ToSK5GuYyWELj3Y0QBwP3Q_Jd4FhK1WDvf2FuADw?e=xRsbl5',
        notes=('Backbone of the authors\' HTC (FPN, semantic branch, 1280x1280, 20 epochs): COCO val box AP 50.1, '
               'mask AP 43.9; test-dev box AP 50.5, mask AP 44.4 (authors\' numbers).',),
        release_file=('epoch_20.pth (the whole mmdet 2.x detector; its backbone.* keys are used) in the '
                      'HTC "Model" folder of the LESA_detection README (OneDrive, no direct download).'),
    ),
})

_DET_ARGS = dict(
    strides=(1, 2, 2, 2), pos_embed='detection_qr', dcn_stages=(False, True, True, True), num_classes=0)


@register_model
def lesa_resnet50(pretrained: bool = False, **kwargs) -> LesaResNet:
    """LESA-ResNet-50, ImageNet-1k, 224x224 only (top-1 79.55 / top-5 94.79)."""
    model_args = dict(layers=(3, 4, 6, 3))
    return _create_lesa('lesa_resnet50', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lesa_wrn50(pretrained: bool = False, **kwargs) -> LesaResNet:
    """LESA-Wide-ResNet-50-2, ImageNet-1k, 224x224 only (top-1 80.18 / top-5 95.07)."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128)
    return _create_lesa('lesa_wrn50', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lesa_resnet50_det(pretrained: bool = False, **kwargs) -> LesaResNet:
    """LESA-ResNet-50 COCO backbone (Mask R-CNN), tables for 1024x1024; any multiple of 32 works."""
    model_args = dict(layers=(3, 4, 6, 3), img_size=1024, **_DET_ARGS)
    return _create_lesa('lesa_resnet50_det', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lesa_wrn50_det(pretrained: bool = False, **kwargs) -> LesaResNet:
    """LESA-Wide-ResNet-50-2 COCO backbone (HTC), tables for 1280x1280; any multiple of 32 works."""
    model_args = dict(layers=(3, 4, 6, 3), base_width=128, img_size=1280, **_DET_ARGS)
    return _create_lesa('lesa_wrn50_det', pretrained=pretrained, **dict(model_args, **kwargs))
