"""Convert the authors' COCO checkpoints (mmdetection 2.x) into checkpoints of this package's detectors.

The authors' files are ``{'meta': ..., 'state_dict': {...}}`` with ``backbone.*``, ``neck.*``, ``rpn_head.*``,
``roi_head.*`` / ``bbox_head.*`` keys. Neck and head parameters keep their names in mmdetection 3.x; the
backbone keys are translated by building the config's backbone from the file, which runs the model family's
``checkpoint_filter_fn`` (key renames, table resampling to the config's sizes, output norms), and reading the
adapter's state dict back. Every key and shape of the result is checked against the config's model.
"""
import os
import os.path as osp
from typing import Dict, Optional

import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

from lesa_lit_models._checkpoint import CheckpointError, load_checkpoint_file, unwrap_state_dict, verify_state_dict

from .engine import load_config

__all__ = ['convert_coco_checkpoint']


def convert_coco_checkpoint(config: str, upstream: str, out: str, cfg_options: Optional[Dict] = None) -> Dict:
    """Write ``out`` (an mmengine checkpoint for ``config``) from the authors' checkpoint ``upstream``.

    Returns a summary: number of backbone and other tensors. Raises :class:`CheckpointError` when the file is
    not an mmdet detector checkpoint or does not fit the config's model (for instance another backbone).
    """
    state_dict = unwrap_state_dict(load_checkpoint_file(upstream))
    if not any(k.startswith('backbone.') for k in state_dict):
        raise CheckpointError(f'{upstream} has no backbone.* keys: it is not an mmdetection detector checkpoint '
                              f'(an ImageNet checkpoint goes into model.backbone.pretrained instead).')
    if any(k.startswith('backbone.body.') for k in state_dict):
        raise CheckpointError(f'{upstream} is already in this package\'s layout; test it directly.')

    register_all_modules()
    cfg = load_config(config, cfg_options)
    if cfg.model.backbone.get('type') != 'TimmBackbone':
        raise CheckpointError(f'{config} does not use TimmBackbone: its checkpoints need no conversion.')
    cfg.model.backbone.pretrained = upstream
    try:
        model = MODELS.build(cfg.model)
    except CheckpointError as e:
        raise CheckpointError(f'The backbone of {upstream} does not fit {config}: {e}') from e

    converted = {f'backbone.{k}': v for k, v in model.backbone.state_dict().items()}
    converted.update({k: v for k, v in state_dict.items() if not k.startswith('backbone.')})
    try:
        verify_state_dict(converted, model)
    except CheckpointError as e:
        raise CheckpointError(f'The neck/heads of {upstream} do not fit {config}: {e}') from e

    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    meta = dict(converted_from=osp.basename(upstream), config=osp.basename(config))
    torch.save({'meta': meta, 'state_dict': converted}, out)
    backbone = sum(k.startswith('backbone.') for k in converted)
    return dict(backbone_tensors=backbone, other_tensors=len(converted) - backbone, out=out)
