"""Reading original (upstream) checkpoint files, with errors that say what is wrong and how to fix it.

Shared by every model family: each family's ``checkpoint_filter_fn`` renames keys and resamples
tables, then calls :func:`verify_state_dict`; ``_create_*`` calls :func:`resolve_pretrained_file`
so that ``pretrained_cfg_overlay=dict(file=PATH)`` accepts every upstream format (including mmdet
2.x checkpoints whose ``meta`` holds numpy objects, which timm's ``weights_only`` loader refuses).
"""
import logging
import os
import pickle
import zipfile
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'load_checkpoint_file', 'unwrap_state_dict', 'strip_prefix', 'verify_state_dict',
    'resolve_pretrained_file',
]

_logger = logging.getLogger(__name__)

# Wrapper keys used by the upstream training scripts, in lookup order:
# mmdet/mmcv ('state_dict'), Swin/DeiT style ('model'), LESA_classification ('net').
_WRAPPER_KEYS = ('state_dict', 'model', 'net')


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or belongs to another architecture."""


def load_checkpoint_file(path: str) -> Any:
    """Load a checkpoint file (``.pth``/``.pt``/``.bin`` or ``.safetensors``) onto the CPU.

    Tries ``weights_only=True`` first; files that carry non-tensor objects (mmcv ``meta`` with numpy
    arrays) are retried with full unpickling, which is only safe for files you trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f'Checkpoint file not found: {path!r}. Check the path (it is resolved relative to '
            f'{os.getcwd()!r}), or download the original weights from the link in the model\'s pretrained_cfg.')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f'Cannot read safetensors file {path!r} ({e}); it is corrupt or truncated: '
                                  f're-download or re-convert it.') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights_only' not in str(e) and 'Weights only load failed' not in str(e):
            raise _corrupt(path, e) from e
        _logger.warning(f'{path} holds non-tensor objects; loading it with weights_only=False (trusted files only).')
        try:
            return torch.load(path, map_location='cpu', weights_only=False)
        except Exception as e2:
            raise _corrupt(path, e2) from e2
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise _corrupt(path, e) from e


def _corrupt(path: str, error: Exception) -> CheckpointError:
    size = os.path.getsize(path)
    return CheckpointError(
        f'Cannot read checkpoint {path!r} ({size} bytes): {type(error).__name__}: {error}. The file is corrupt '
        f'or truncated (an interrupted download?); download it again and compare its size/hash with the release.')


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
    return strip_prefix(state_dict, 'module.')


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str, keep_others: bool = True) -> Dict[str, torch.Tensor]:
    """Remove ``prefix`` from keys that carry it; drop the other keys unless ``keep_others``."""
    if not any(k.startswith(prefix) for k in state_dict):
        return state_dict
    return {
        (k[len(prefix):] if k.startswith(prefix) else k): v
        for k, v in state_dict.items() if keep_others or k.startswith(prefix)
    }


def verify_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        ignore_shape_of: Iterable[str] = (),
        max_listed: int = 8,
) -> Dict[str, torch.Tensor]:
    """Check that ``state_dict`` fits ``model`` key for key and shape for shape; return it unchanged.

    ``ignore_shape_of`` names key prefixes whose shapes timm adapts after filtering (the classifier
    when ``num_classes`` differs, the first conv when ``in_chans`` differs).
    Raises :class:`CheckpointError` listing missing, unexpected and mis-shaped keys.
    """
    expected = model.state_dict()
    ignore_shape_of = tuple(ignore_shape_of)
    missing = [k for k in expected if k not in state_dict]
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
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        raise CheckpointError(
            f'Checkpoint does not match architecture {name!r}:'
            + listing('missing keys', missing) + listing('unexpected keys', unexpected)
            + listing('shape mismatches', mismatched)
            + '\n  Is this a checkpoint of another model or size? Pick the model name that matches the file.')
    return state_dict


def resolve_pretrained_file(pretrained: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Read ``pretrained_cfg_overlay['file']`` ourselves and hand timm the tensors as ``state_dict``.

    timm's own file loader raises a bare ``FileNotFoundError`` and refuses mmdet checkpoints; this
    gives clear errors and accepts every upstream format. The family's ``checkpoint_filter_fn`` then
    sees the raw checkpoint.
    """
    overlay: Optional[Dict[str, Any]] = kwargs.get('pretrained_cfg_overlay')
    if pretrained and overlay and overlay.get('file') and overlay.get('state_dict') is None:
        overlay = dict(overlay)
        overlay['state_dict'] = load_checkpoint_file(overlay.pop('file'))
        kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
    return kwargs
