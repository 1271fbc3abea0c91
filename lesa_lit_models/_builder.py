"""timm's ``build_model_with_cfg`` for this package's families: pretrained weights go through the safe loader, the
family's ``checkpoint_filter_fn`` and :func:`~lesa_lit_models.strict_filter`."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Type

import torch.nn as nn
from timm.models import PretrainedCfg, build_model_with_cfg, resolve_pretrained_cfg

from ._download import load_checkpoint
from ._safe_load import CheckpointError, load_checkpoint_file
from ._state_dict import FilterFn, strict_filter
from ._timm import _resolve_pretrained_source

__all__ = ['ReleasePretrainedCfg', 'resolve_pretrained_weights', 'build_model_with_weights', 'release_loaded_weights']


@dataclass
class ReleasePretrainedCfg(PretrainedCfg):
    """timm's ``PretrainedCfg`` and ``release_file``: which file to download by hand from ``origin_url`` when the
    weights have no direct download (``pretrained=True`` without a file says so).

    ``to_dict()`` (the model's ``pretrained_cfg``) leaves it out: exported ``config.json`` files are read back
    with timm's ``PretrainedCfg``, which takes no other fields.
    """
    release_file: Optional[str] = None

    def to_dict(self, remove_source: bool = False, remove_null: bool = True) -> Dict[str, Any]:
        cfg = super().to_dict(remove_source=remove_source, remove_null=remove_null)
        cfg.pop('release_file', None)
        return cfg


def resolve_pretrained_weights(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Read a model's pretrained ``file`` or ``url`` with the safe loader; hand timm the contents as ``state_dict``.

    Called by each family's ``_create_*`` before ``build_model_with_cfg``, with the kwargs ``timm.create_model``
    passed (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``). The source is resolved as timm does
    (overlay ``state_dict`` > ``file`` > ``url``): a ``file`` is read from disk, a ``url`` downloaded once into the
    torch hub cache (or ``cache_dir``) with a progress bar. ``hf-hub:`` and ``local-dir:`` sources stay with timm
    (safetensors, or ``weights_only`` loading). The family's ``checkpoint_filter_fn`` then converts the raw
    checkpoint.

    Raises:
        CheckpointError: ``pretrained=True`` and the pretrained cfg names no weights that can be fetched (the
            message says where the authors publish them and how to use the downloaded file); nothing is fetched.
    """
    if not pretrained:
        return kwargs
    pretrained_cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    load_from, location = _resolve_pretrained_source(pretrained_cfg.to_dict())
    if load_from == 'file':
        checkpoint = load_checkpoint_file(location)
    elif load_from == 'url':
        checkpoint = load_checkpoint(location, cache_dir=kwargs.get('cache_dir'))  # with a progress bar
    elif load_from == '':
        raise CheckpointError(_no_weights_message(variant, pretrained_cfg))
    else:  # state_dict already in memory, hf-hub, local-dir
        return kwargs
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=checkpoint)
    return dict(kwargs, pretrained_cfg_overlay=overlay)


def _no_weights_message(variant: str, cfg: PretrainedCfg) -> str:
    name = '.'.join(filter(None, (cfg.architecture or variant, cfg.tag)))
    release_file = getattr(cfg, 'release_file', None)
    source = f'The authors publish them at {cfg.origin_url}' if cfg.origin_url else 'No source is known'
    return (
        f'{name} has no weights that can be downloaded automatically (no url or hf_hub_id in its pretrained cfg). '
        f'{source}' + (f': {release_file}' if release_file else '.') + '\n'
        f'Download the file by hand, then either load it directly:\n'
        f"    timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/file.pth'))\n"
        f'or convert it once and load the converted copy:\n'
        f'    lesa-lit-convert {name} /path/to/file.pth OUT_DIR\n'
        f"    timm.create_model('local-dir:OUT_DIR', pretrained=True)")


def build_model_with_weights(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: FilterFn,
        kwargs_for_checkpoint: Optional[Callable[[Dict[str, Any], Dict[str, Any]], Dict[str, Any]]] = None,
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a family of this package: the pretrained weights are read by
    :func:`resolve_pretrained_weights`, converted by ``filter_fn`` and checked by ``strict_filter``, and the
    model keeps no reference to the file (:func:`release_loaded_weights`).

    ``kwargs_for_checkpoint(checkpoint, kwargs)`` returns the model kwargs for a checkpoint that was read (e.g. a
    layout the checkpoint needs), before the model is built.
    """
    kwargs = resolve_pretrained_weights(variant, pretrained, kwargs)
    checkpoint = (kwargs.get('pretrained_cfg_overlay') or {}).get('state_dict')
    if pretrained and checkpoint is not None and kwargs_for_checkpoint is not None:
        kwargs = kwargs_for_checkpoint(checkpoint, kwargs)
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=strict_filter(filter_fn),
                                 **kwargs)
    return release_loaded_weights(model)


def release_loaded_weights(model: nn.Module) -> nn.Module:
    """Drop the checkpoint that :func:`resolve_pretrained_weights` put into the model's ``pretrained_cfg``.

    timm keeps the overlay's ``state_dict`` in ``model.pretrained_cfg``; without this the whole file (optimizer
    state included) would stay in memory as long as the model.
    """
    for module in model.modules():
        cfg = getattr(module, 'pretrained_cfg', None)
        if isinstance(cfg, dict):
            cfg.pop('state_dict', None)
    return model
