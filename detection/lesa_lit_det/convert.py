"""Detector checkpoints in this package's layout or in the authors' (mmdetection 2.x), loaded or converted.

The authors' files are ``{'meta': ..., 'state_dict': {...}}`` with ``backbone.*``, ``neck.*``, ``rpn_head.*``,
``roi_head.*`` / ``bbox_head.*`` keys. Neck and head parameters keep their names in mmdetection 3.x; the
backbone keys go through :meth:`~lesa_lit_det.backbone.TimmBackbone.load_weights`, i.e. the model family's
``checkpoint_filter_fn`` (key renames, table resampling to the config's sizes, output norms). Every key and shape
of the result is checked against the config's model, so a checkpoint of another detector is a clear error.
``detection/test.sh`` and ``tools/infer.py`` convert on the fly; ``tools/convert_coco_checkpoint.py`` writes the
converted file.
"""
import os
import os.path as osp
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.model import is_model_wrapper

from lesa_lit_models import CheckpointError, unwrap_state_dict, verify_state_dict

from .backbone import TimmBackbone, read_checkpoint
from .engine import load_config

__all__ = ['detector_state_dict', 'load_detector_checkpoint', 'convert_coco_checkpoint']


def _is_authors_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith('backbone.') for k in state_dict) and not any(
        k.startswith('backbone.body.') for k in state_dict)


def detector_state_dict(model: nn.Module, checkpoint: Dict[str, Any], source: str) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` in ``checkpoint`` (this package's layout, or the authors' converted), checked key
    for key and shape for shape against ``model``. Raises :class:`CheckpointError` naming what does not fit."""
    state_dict = unwrap_state_dict(checkpoint)
    if _is_authors_layout(state_dict) and isinstance(getattr(model, 'backbone', None), TimmBackbone):
        model.backbone.load_weights(checkpoint, source)
        converted = {f'backbone.{k}': v for k, v in model.backbone.state_dict().items()}
        converted.update({k: v for k, v in state_dict.items() if not k.startswith('backbone.')})
        state_dict = converted
    try:
        return verify_state_dict(state_dict, model)
    except CheckpointError as e:
        raise CheckpointError(f'{source} does not fit the model of this config. {e}') from e


def load_detector_checkpoint(model: nn.Module, source: str) -> Dict:
    """Load a detector checkpoint (local path or URL; ours or the authors') strictly; return its ``meta``.

    mmengine's own loading would only warn about keys that do not fit.
    """
    if is_model_wrapper(model):
        model = model.module
    checkpoint = read_checkpoint(source)
    model.load_state_dict(detector_state_dict(model, checkpoint, source))
    return checkpoint.get('meta') or {}


def convert_coco_checkpoint(config: str, upstream: str, out: str, cfg_options: Optional[Dict] = None) -> Dict:
    """Write ``out`` (an mmengine checkpoint for ``config``) from the authors' checkpoint ``upstream`` (path or
    URL). Returns a summary: number of backbone and other tensors. Raises :class:`CheckpointError` when the file
    is not an mmdet detector checkpoint in the authors' layout or does not fit the config's model."""
    checkpoint = read_checkpoint(upstream)
    state_dict = unwrap_state_dict(checkpoint)
    if not any(k.startswith('backbone.') for k in state_dict):
        raise CheckpointError(f'{upstream} has no backbone.* keys: it is not an mmdetection detector checkpoint '
                              f'(an ImageNet checkpoint goes into model.backbone.init_cfg instead).')
    if not _is_authors_layout(state_dict):
        raise CheckpointError(f'{upstream} is already in this package\'s layout; test it directly.')

    register_all_modules()
    cfg = load_config(config, cfg_options)
    if cfg.model.backbone.get('type') != 'TimmBackbone':
        raise CheckpointError(f'{config} does not use TimmBackbone: its checkpoints need no conversion.')
    cfg.model.backbone.init_cfg = None  # every backbone weight comes from the checkpoint
    converted = detector_state_dict(MODELS.build(cfg.model), checkpoint, upstream)

    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    meta = dict(converted_from=osp.basename(upstream), config=osp.basename(config))
    classes = (checkpoint.get('meta') or {}).get('CLASSES')
    if classes is not None:  # mmdet 2.x class names, as mmdet 3.x keeps them
        meta['dataset_meta'] = dict(classes=tuple(str(c) for c in classes))
    torch.save({'meta': meta, 'state_dict': converted}, out)
    backbone = sum(k.startswith('backbone.') for k in converted)
    return dict(backbone_tensors=backbone, other_tensors=len(converted) - backbone, out=out)
