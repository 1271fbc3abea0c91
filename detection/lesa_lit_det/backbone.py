"""Any timm model with ``features_only=True`` as an mmdetection 3.x backbone (LESA, LIT and stock timm models).

The adapter translates mmdet's backbone arguments (``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp``,
pretrained weights) into a timm feature extractor and returns its feature maps as a tuple. The only layers it adds
are optional output LayerNorms (``out_norms``), which LIT-S's COCO backbone puts on feature levels 2-4.

Checkpoints are read in one place per model family (its ``checkpoint_filter_fn``, reached through timm's
pretrained loading); the adapter only finds the file (local path or hub) and loads the output norms.
"""
import logging
import re
import sys
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from torch.nn.modules.batchnorm import _BatchNorm

from lesa_lit_models._checkpoint import CheckpointError, load_checkpoint_file, strip_prefix, unwrap_state_dict, \
    verify_state_dict

__all__ = ['TimmBackbone']

_logger = logging.getLogger(__name__)

_HUB_PREFIX = 'hf-hub:'
_OUT_NORM = re.compile(r'^norm(\d+)\.')


@MODELS.register_module()
class TimmBackbone(BaseModule):
    """A timm feature extractor with mmdet's backbone conventions.

    Args:
        model_name: timm model name, optionally with a pretrained tag (``'lesa_resnet50_det.in1k'``, ``'lit_s'``).
        out_indices: feature levels to return, indices into the model's ``feature_info``. C2-C5 are
            ``(1, 2, 3, 4)`` for ResNet-like models (level 0 is the stride-2 stem) and ``(0, 1, 2, 3)`` for LIT.
        frozen_stages: as mmdet's ResNet: -1 trains everything, 0 freezes the stem, ``k`` freezes the stem and the
            first ``k`` stages (the levels of stride >= 4). Frozen parts also stay in eval mode.
        norm_eval: keep every BatchNorm in eval mode while training (frozen running statistics).
        out_norms: feature levels (values of ``out_indices``) followed by a channel LayerNorm (eps 1e-5), e.g.
            ``(1, 2, 3)`` for LIT-S's COCO backbone. Their weights are ``out_norms.<level>.*``.
        pretrained: ``False`` (random init), ``True`` (the weights named by the model's pretrained tag: its hub
            id), ``'hf-hub:org/name[@revision]'``, or a local file: an ImageNet checkpoint (original or converted),
            an authors' COCO checkpoint (mmdet 2.x, its ``backbone.*`` keys), or a checkpoint of this backbone
            (mmdet 3.x, trained or converted with this package).
        with_cp: gradient checkpointing as the model defines it (LESA: unary and binary terms; LIT: blocks), per
            top-level module for models that define none.
        init_cfg: must be None: weights come from ``pretrained`` and are not overwritten by ``init_weights()``.
        **model_kwargs: passed on to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ``attn_impl``, ...).
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            out_norms: Sequence[int] = (),
            pretrained: Union[bool, str] = False,
            with_cp: bool = False,
            init_cfg: Optional[dict] = None,
            **model_kwargs: Any,
    ):
        if init_cfg is not None:
            raise ValueError(
                f'TimmBackbone takes no init_cfg (got {init_cfg}): set pretrained=<hub id or checkpoint path>. '
                f'Replacing a ResNet backbone needs backbone=dict(_delete_=True, type="TimmBackbone", ...).')
        super().__init__(init_cfg=None)
        self.out_indices = tuple(out_indices)
        missing_levels = set(out_norms) - set(self.out_indices)
        if missing_levels:
            raise ValueError(f'out_norms {tuple(out_norms)} names levels that are not in out_indices '
                             f'{self.out_indices}: {sorted(missing_levels)}.')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        checkpoint = _read_pretrained(pretrained, model_name)
        own_layout = checkpoint is not None and any(k.startswith('body.') for k in checkpoint)
        if checkpoint is not None and not own_layout:
            model_kwargs['pretrained_cfg_overlay'] = dict(state_dict=checkpoint)
        try:
            self.body = timm.create_model(
                model_name, features_only=True, out_indices=self.out_indices,
                pretrained=bool(pretrained) and not own_layout, **model_kwargs)
        except CheckpointError as e:
            raise CheckpointError(f'pretrained={pretrained!r} does not fit backbone {model_name!r}: {e}') from e

        channels = self.body.feature_info.channels()
        self.out_norms = nn.ModuleDict({
            str(level): LayerNorm2d(channels[self.out_indices.index(level)], eps=1e-5) for level in out_norms})
        if checkpoint is not None:
            if own_layout:
                self._load_own_layout(checkpoint, pretrained)
            elif out_norms:
                self._load_out_norms(checkpoint, model_name, pretrained)
        if with_cp:
            _enable_grad_checkpointing(self.body)
        # timm initialised (or loaded) every weight; keep Runner.init_weights() from touching them
        self._is_init = True
        self._frozen_modules = self._find_frozen_modules()
        self._freeze()

    @property
    def channels(self) -> Tuple[int, ...]:
        """Channels of each output, in order: the neck's ``in_channels``."""
        return tuple(self.body.feature_info.channels())

    @property
    def strides(self) -> Tuple[int, ...]:
        return tuple(self.body.feature_info.reduction())

    def _load_own_layout(self, state_dict: Dict[str, torch.Tensor], source: str):
        try:
            verify_state_dict(state_dict, self)
        except CheckpointError as e:
            raise CheckpointError(f'{source} is a checkpoint of this adapter for another backbone: {e}') from e
        self.load_state_dict(state_dict)

    def _load_out_norms(self, checkpoint: Dict[str, torch.Tensor], model_name: str, source: str):
        """Output norms come from the model family's ``detection_output_norms`` (upstream ``norm<level>.*``)."""
        family = sys.modules[timm.models.model_entrypoint(timm.models.get_arch_name(model_name)).__module__]
        reader = getattr(family, 'detection_output_norms', None)
        norms = reader(checkpoint) if reader is not None else {}
        state = {_OUT_NORM.sub(lambda m: f'{m[1]}.', k): v for k, v in norms.items()
                 if _OUT_NORM.match(k)[1] in self.out_norms}
        if not state:
            _logger.info(f'{source} has no output norms for levels {list(self.out_norms)}: they start as identity.')
            return
        missing, unexpected = self.out_norms.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f'Output norms of {source} do not fit levels {list(self.out_norms)}: '
                                  f'missing {missing}, unexpected {unexpected}.')
        _logger.info(f'Loaded output norms {sorted(state)} from {source}.')

    def _find_frozen_modules(self) -> Sequence[nn.Module]:
        """The stem and the first ``frozen_stages`` stages, as modules in execution order."""
        if self.frozen_stages < 0:
            return []
        info = self.body.feature_info.info
        stage_modules = [f['module'] for f in info if f['reduction'] >= 4]
        if self.frozen_stages > len(stage_modules):
            raise ValueError(f'frozen_stages={self.frozen_stages} but the model has {len(stage_modules)} stages.')
        if self.frozen_stages == 0:
            return _modules_before(self._root(), stage_modules[0], inclusive=False)
        return _modules_before(self._root(), stage_modules[self.frozen_stages - 1], inclusive=True)

    def _root(self) -> nn.Module:
        # FeatureGetterNet keeps the whole model (original module names); FeatureListNet is the model, flattened
        return getattr(self.body, 'model', self.body)

    def _freeze(self):
        for module in self._frozen_modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = list(self.body(x))
        for i, level in enumerate(self.out_indices):
            if str(level) in self.out_norms:
                features[i] = self.out_norms[str(level)](features[i])
        return tuple(features)


def _read_pretrained(pretrained: Union[bool, str, None], model_name: str) -> Optional[Dict[str, torch.Tensor]]:
    """The raw tensors ``pretrained`` names (its ``backbone.*`` part for detector checkpoints), or None.

    None means: no weights, or ``pretrained=True`` for a model without a hub id (timm fetches its url itself).
    """
    if not pretrained:
        return None
    filename = None
    if pretrained is True:
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if pretrained_cfg is None or not pretrained_cfg.hf_hub_id:
            return None
        hub_id, filename = pretrained_cfg.hf_hub_id, pretrained_cfg.hf_hub_filename
    elif isinstance(pretrained, str) and pretrained.startswith(_HUB_PREFIX):
        hub_id = pretrained[len(_HUB_PREFIX):]
    elif isinstance(pretrained, str):
        return strip_prefix(unwrap_state_dict(load_checkpoint_file(pretrained)), 'backbone.', keep_others=False)
    else:
        raise TypeError(f'pretrained must be a bool or a str (path or "hf-hub:org/name"), got {pretrained!r}.')
    try:
        checkpoint = timm.models.load_state_dict_from_hf(hub_id, **({'filename': filename} if filename else {}))
    except Exception as e:  # network, authentication and missing-file errors of huggingface_hub
        raise CheckpointError(
            f'Cannot fetch the pretrained weights of {model_name!r} from the Hugging Face Hub ({hub_id}): '
            f'{type(e).__name__}: {e}. Offline, download the checkpoint (the original release or a converted '
            f'file) and set pretrained="/path/to/checkpoint.pth" instead.') from e
    return strip_prefix(unwrap_state_dict(checkpoint), 'backbone.', keep_others=False)


def _modules_before(root: nn.Module, path: str, inclusive: bool) -> Sequence[nn.Module]:
    """Children of ``root`` (recursively along ``path``) registered before the module at ``path``.

    Relies on timm's feature-extraction assumption that modules are registered in execution order.
    FeatureListNet flattens ``stages.0`` into a child named ``stages_0``; both spellings are matched.
    """
    parts = path.split('.')
    modules = []
    for name, child in root.named_children():
        if name == parts[0] or name == '_'.join(parts[:2]):
            consumed = 1 if name == parts[0] else 2
            if consumed == len(parts):
                return modules + ([child] if inclusive else [])
            return modules + list(_modules_before(child, '.'.join(parts[consumed:]), inclusive))
        modules.append(child)
    raise ValueError(f'Module {path!r} of feature_info is not a child of {type(root).__name__}.')


def _enable_grad_checkpointing(body: nn.Module):
    """Use the model's own checkpointing where it has one, else timm's per-module feature checkpointing."""
    model = getattr(body, 'model', None)
    if model is not None and hasattr(model, 'set_grad_checkpointing'):
        model.set_grad_checkpointing(True)
        return
    flagged = [m for m in body.modules() if m is not body and hasattr(m, 'grad_checkpointing')]
    for module in flagged:
        module.grad_checkpointing = True
    if not flagged:
        body.set_grad_checkpointing(True)
