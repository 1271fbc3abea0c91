"""Any timm model with ``forward_intermediates`` as an mmdetection 3.x backbone (LESA, LIT and stock timm models).

The adapter translates mmdet's backbone arguments (``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp``,
``init_cfg``) into timm's feature extractor over ``forward_intermediates`` (``features_only=True,
feature_cls='getter'``: the whole model under ``body.model``, with its own module names) and returns its feature
maps as a tuple. The only layers it adds are
optional output LayerNorms (``out_norms``), which LIT-S's COCO backbone puts on feature levels 2-4.

Building it reads no weights. As every mmdet backbone, it loads them in :meth:`TimmBackbone.init_weights` (which
mmengine's Runner calls before training) from ``init_cfg=dict(type='Pretrained', checkpoint=PATH_OR_URL)``. The
file is read by the package's safe loader (through mmengine's ``CheckpointLoader``), translated by the model
family's ``checkpoint_filter_fn`` and loaded into the backbone's model by timm's ``load_pretrained``.
"""
import logging
import os.path as osp
import re
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from mmengine.runner import CheckpointLoader
from timm.layers import LayerNorm2d
from timm.models import load_pretrained
from torch.nn.modules.batchnorm import _BatchNorm

from lesa_lit_models import CheckpointError, backbone_state_dict, strict_filter, verify_state_dict
from lesa_lit_models import lesa, lit

from .loading import HF_HUB_PREFIX

__all__ = ['TimmBackbone', 'read_checkpoint']

_logger = logging.getLogger(__name__)

_REMOTE_PREFIXES = ('http://', 'https://', HF_HUB_PREFIX)
_OUTPUT_NORM_KEY = re.compile(r'^norm(\d+)\.')  # the authors' mmdet backbones name output norms norm<level>.*


class _Family(NamedTuple):
    """What a model family adds to loading weights into the adapter."""
    # the authors' checkpoint layouts -> the model's state dict (timm's pretrained_filter_fn)
    checkpoint_filter: Optional[Callable[[Dict[str, Any], nn.Module], Dict[str, torch.Tensor]]] = None
    # (checkpoint, model) -> keys the checkpoint leaves at their init: their BatchNorms keep training under norm_eval
    keys_kept_at_init: Callable[[Dict[str, Any], nn.Module], List[str]] = lambda checkpoint, model: []


_FAMILIES = {
    lesa.LesaResNet: _Family(lesa.checkpoint_filter_fn, lesa.keys_kept_at_init),
    lit.LIT: _Family(lit.checkpoint_filter_fn),
}


def _family(model: nn.Module) -> _Family:
    """The hooks of ``model``'s family; other timm models get their model file's ``checkpoint_filter_fn``, if any."""
    model_file = sys.modules[type(model).__module__]
    return _FAMILIES.get(type(model)) or _Family(getattr(model_file, 'checkpoint_filter_fn', None))


@MODELS.register_module()
class TimmBackbone(BaseModule):
    """A timm feature extractor with mmdet's backbone conventions.

    Args:
        model_name: timm model name, optionally with a pretrained tag (``'lesa_resnet50_det'``, ``'lit_s'``).
        out_indices: feature levels to return, indices into the model's ``feature_info``. C2-C5 are
            ``(1, 2, 3, 4)`` for ResNet-like models (level 0 is the stride-2 stem) and ``(0, 1, 2, 3)`` for LIT.
        frozen_stages: as mmdet's ResNet: -1 trains everything, 0 freezes the stem, ``k`` freezes the stem and the
            first ``k`` stages (the levels of stride >= 4). Frozen parts also stay in eval mode.
        norm_eval: keep the BatchNorms in eval mode while training (frozen running statistics). BatchNorms whose
            statistics the ``init_cfg`` checkpoint does not provide (LESA's ``bn_similarity`` / ``bn_output`` when
            a COCO backbone starts from the classification weights, see
            :func:`~lesa_lit_models.lesa.keys_kept_at_init`) keep training, so that their statistics get estimated.
        out_norms: feature levels (values of ``out_indices``) followed by a channel LayerNorm (eps 1e-5), e.g.
            ``(1, 2, 3)`` for LIT-S's COCO backbone. Their weights are ``out_norms.<level>.*``, loaded from the
            authors' ``norm<level>.*``.
        with_cp: gradient checkpointing as the model defines it (LESA: unary and binary terms; LIT: blocks).
        init_cfg: None (timm's random init) or ``dict(type='Pretrained', checkpoint=...)``: a path, an http(s)
            URL or ``hf-hub:ORG/NAME`` of an ImageNet checkpoint (the authors' release or a converted file), an
            authors' COCO checkpoint (mmdet 2.x, its ``backbone.*`` keys) or a checkpoint of this backbone
            (mmdet 3.x). An optional ``origin_url`` names where to download the file when ``checkpoint`` is a
            local path that does not exist.
        **model_kwargs: passed on to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ``attn_impl``, ...).
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            out_norms: Sequence[int] = (),
            with_cp: bool = False,
            init_cfg: Optional[dict] = None,
            **model_kwargs: Any,
    ):
        if 'pretrained' in model_kwargs:
            raise ValueError(
                f'TimmBackbone loads weights in init_weights(), not when it is built: replace '
                f'pretrained={model_kwargs["pretrained"]!r} by init_cfg=dict(type="Pretrained", '
                f'checkpoint=PATH_OR_URL) (or init_cfg=None for a random init).')
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained'
                                     or not init_cfg.get('checkpoint')):
            raise ValueError(
                f'TimmBackbone takes init_cfg=None or dict(type="Pretrained", checkpoint=PATH_OR_URL), got '
                f'{init_cfg!r}. Replacing a ResNet backbone needs backbone=dict(_delete_=True, '
                f'type="TimmBackbone", ...).')
        super().__init__(init_cfg=init_cfg)
        self.model_name = model_name
        self.out_indices = tuple(out_indices)
        missing_levels = set(out_norms) - set(self.out_indices)
        if missing_levels:
            raise ValueError(f'out_norms {tuple(out_norms)} names levels that are not in out_indices '
                             f'{self.out_indices}: {sorted(missing_levels)}.')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._model_kwargs = dict(model_kwargs, features_only=True, feature_cls='getter', out_indices=self.out_indices)
        self.body = timm.create_model(model_name, pretrained=False, **self._model_kwargs)
        channels = self.body.feature_info.channels()
        self.out_norms = nn.ModuleDict({
            str(level): LayerNorm2d(channels[self.out_indices.index(level)], eps=1e-5) for level in out_norms})
        if with_cp:
            self.body.model.set_grad_checkpointing(True)  # the model's own: LESA's unary and binary terms, LIT's blocks
        self._untrained_norms: List[nn.Module] = []
        self._frozen_modules = self._find_frozen_modules()
        self._freeze()

    def init_weights(self):
        """Load the ``init_cfg`` checkpoint (timm already initialised every weight when the model was built)."""
        if self.init_cfg is not None and not self._is_init:
            source = self.init_cfg['checkpoint']
            self.load_weights(read_checkpoint(source, self.init_cfg.get('origin_url')), source)
        self._is_init = True

    def load_weights(self, checkpoint: Dict[str, Any], source: str):
        """Load a checkpoint in any layout :class:`TimmBackbone` takes (see ``init_cfg``); ``source`` names it in
        messages. Notes the BatchNorms whose statistics the checkpoint does not provide (see ``norm_eval``)."""
        state_dict = backbone_state_dict(checkpoint)
        model = self.body.model
        family = _family(model)
        if any(k.startswith('body.') for k in state_dict):
            try:
                verify_state_dict(state_dict, self)
            except CheckpointError as e:
                raise CheckpointError(f'{source} is a checkpoint of this adapter for another backbone: {e}') from e
            self.load_state_dict(state_dict)
            kept_at_init = []
        else:
            try:
                load_pretrained(model, dict(model.pretrained_cfg, source='', state_dict=state_dict), num_classes=0,
                                in_chans=self._model_kwargs.get('in_chans', 3),
                                filter_fn=strict_filter(self._checkpoint_filter(family.checkpoint_filter)))
            except CheckpointError as e:
                raise CheckpointError(f'{source} does not fit backbone {self.model_name!r}: {e}') from e
            if self.out_norms:
                self._load_out_norms(state_dict, source)
            kept_at_init = family.keys_kept_at_init(state_dict, model)
        self._untrained_norms = [model.get_submodule(k.rsplit('.', 1)[0]) for k in kept_at_init
                                 if k.endswith('.running_mean')]
        if self._untrained_norms:
            _logger.info(f'{len(self._untrained_norms)} BatchNorms of {self.model_name} have no statistics in '
                         f'{source}: they keep training under norm_eval.')
        _logger.info(f'Loaded the {self.model_name} backbone from {source}.')
        self.train(self.training)

    def _checkpoint_filter(self, family_filter: Optional[Callable]) -> Callable:
        """The family's ``checkpoint_filter_fn``, then the keys of what the feature extractor pruned are dropped."""
        model = self.body.model
        pruned_stages = tuple(f'{info["module"]}.' for info in model.feature_info[max(self.body.out_indices) + 1:])

        def filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
            state_dict = family_filter(state_dict, model) if family_filter is not None else state_dict
            return {k: v for k, v in state_dict.items() if not _pruned(model, k, pruned_stages)}

        return filter_fn

    def _load_out_norms(self, state_dict: Dict[str, torch.Tensor], source: str):
        """Output norms ``out_norms.<level>.*`` from the authors' ``norm<level>.*`` (LIT-S's COCO backbone)."""
        state = {}
        for k, v in state_dict.items():
            level = _OUTPUT_NORM_KEY.match(k)
            if level and level[1] in self.out_norms:
                state[f'{level[1]}.{k[level.end():]}'] = v
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
            return _modules_before(self.body.model, stage_modules[0], inclusive=False)
        return _modules_before(self.body.model, stage_modules[self.frozen_stages - 1], inclusive=True)

    def _freeze(self):
        for module in self._frozen_modules:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            untrained = {id(m) for m in self._untrained_norms}
            for module in self.modules():
                if isinstance(module, _BatchNorm) and id(module) not in untrained:
                    module.eval()
        self._freeze()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = list(self.body(x))
        for i, level in enumerate(self.out_indices):
            if str(level) in self.out_norms:
                features[i] = self.out_norms[str(level)](features[i])
        return tuple(features)


def read_checkpoint(source: str, origin_url: Optional[str] = None) -> Dict[str, Any]:
    """Read a checkpoint (local path, http(s) URL or ``hf-hub:ORG/NAME``) through mmengine's ``CheckpointLoader``,
    whose schemes for them are the package's safe loaders (see :mod:`lesa_lit_det.loading`).

    A local file that does not exist stops with where to get it (``origin_url``, when given).
    """
    if not source.startswith(_REMOTE_PREFIXES) and not osp.isfile(osp.expanduser(source)):
        where = f'Download it from {origin_url} and put it there' if origin_url else 'Check the path'
        raise CheckpointError(f'Checkpoint not found: {source!r} (relative to the directory you run from). {where}, '
                              f'or point the config at another copy (e.g. --cfg-options '
                              f'model.backbone.init_cfg.checkpoint=PATH).')
    checkpoint = CheckpointLoader.load_checkpoint(source, map_location='cpu', logger='current')
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a checkpoint dict.')
    return checkpoint


def _pruned(model: nn.Module, key: str, pruned_stages: Tuple[str, ...]) -> bool:
    """Whether ``key`` belongs to what a feature extractor pruned from ``model``: a stage after the last output, or
    a module or tensor replaced by an Identity or None (classifier, final norm, class token)."""
    if key.startswith(pruned_stages):
        return True
    owner, _, name = key.rpartition('.')
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(module, nn.Identity) or (hasattr(module, name) and getattr(module, name) is None)


def _modules_before(root: nn.Module, path: str, inclusive: bool) -> Sequence[nn.Module]:
    """Children of ``root`` (recursively along ``path``) registered before the module at ``path``.

    Relies on timm's feature-extraction assumption that modules are registered in execution order.
    """
    name, _, rest = path.partition('.')
    modules = []
    for child_name, child in root.named_children():
        if child_name == name:
            if not rest:
                return modules + ([child] if inclusive else [])
            return modules + list(_modules_before(child, rest, inclusive))
        modules.append(child)
    raise ValueError(f'Module {path!r} of feature_info is not a child of {type(root).__name__}.')
