"""State-dict utilities: unwrap training checkpoints, strip prefixes, and check weights strictly against a model.

Families' ``checkpoint_filter_fn`` map keys and resample tables, and timm's ``load_pretrained`` adapts the result
(classifier, input channels) and loads it; :func:`strict_filter` checks what timm finally loads with
:func:`verify_state_dict`, the one strict check of weights.
"""
from functools import wraps
from typing import Any, Callable, Dict, Iterable

import torch
import torch.nn as nn
from timm.models import clean_state_dict

from ._safe_load import CheckpointError

__all__ = ['FilterFn', 'unwrap_state_dict', 'strip_prefix', 'backbone_state_dict', 'verify_state_dict', 'strict_filter']

# Wrapper keys used by the upstream training scripts, in lookup order:
# mmdet/mmcv ('state_dict'), Swin/DeiT style ('model'), LESA_classification ('net').
_WRAPPER_KEYS = ('state_dict', 'model', 'net')

FilterFn = Callable[[Dict[str, Any], nn.Module], Dict[str, torch.Tensor]]


def unwrap_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """Return the tensor dict inside a training checkpoint, without a DDP ``module.`` prefix."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'Expected a checkpoint dict, got {type(checkpoint).__name__}.')
    for key in _WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(
            f'No tensors found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]}); expected a state '
            f'dict, optionally wrapped in one of {_WRAPPER_KEYS}.')
    return dict(clean_state_dict(state_dict))


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str, keep_others: bool = True) -> Dict[str, torch.Tensor]:
    """Remove ``prefix`` from keys that carry it; drop the other keys unless ``keep_others``."""
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {
        (k[len(prefix):] if k.startswith(prefix) else k): v
        for k, v in state_dict.items() if keep_others or k.startswith(prefix)
    }


def backbone_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint (:func:`unwrap_state_dict`); of an mmdet detector only its ``backbone.*`` ones,
    without the prefix."""
    return strip_prefix(unwrap_state_dict(checkpoint), 'backbone.', keep_others=False)


def verify_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        ignore_shape_of: Iterable[str] = (),
        may_miss: Iterable[str] = (),
        max_listed: int = 8,
) -> Dict[str, torch.Tensor]:
    """Check that ``state_dict`` fits ``model`` key for key and shape for shape; return it unchanged.

    ``ignore_shape_of`` names key prefixes whose shapes are not checked, ``may_miss`` keys that may be absent.
    Raises :class:`CheckpointError` listing missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    ignore_shape_of, may_miss = tuple(ignore_shape_of), set(may_miss)
    missing = [k for k in expected if k not in state_dict and k not in may_miss]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape and not k.startswith(ignore_shape_of)
    ]
    if missing or unexpected or mismatched:
        def listing(title, items):
            if not items:
                return ''
            more = f' ... and {len(items) - max_listed} more' if len(items) > max_listed else ''
            return f'\n  {len(items)} {title}: ' + ', '.join(items[:max_listed]) + more
        name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture', type(model).__name__)
        raise CheckpointError(
            f'Checkpoint does not match architecture {name!r}:'
            + listing('missing keys', missing) + listing('unexpected keys', unexpected)
            + listing('shape mismatches', mismatched)
            + '\n  Is this a checkpoint of another model or size? Pick the model name that matches the file.')
    return state_dict


def strict_filter(filter_fn: FilterFn) -> FilterFn:
    """``filter_fn`` for timm's ``load_pretrained``, followed by :func:`verify_state_dict` of what timm then loads.

    timm adapts the filtered weights (drops a classifier of other classes, adapts the stem to ``in_chans``) and
    loads them strictly, with torch's terse error; the check runs at that load (a ``load_state_dict`` pre-hook), on
    timm's result: keys timm dropped may be missing, anything else that does not fit is a :class:`CheckpointError`
    that lists it.
    """
    @wraps(filter_fn)
    def filter_and_check(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        state_dict = filter_fn(state_dict, model)
        filtered_keys = set(state_dict)

        def check(module, loaded, prefix, *args):
            hook.remove()
            verify_state_dict(loaded, module, may_miss=filtered_keys - loaded.keys())

        hook = model.register_load_state_dict_pre_hook(check)
        return state_dict

    return filter_and_check
