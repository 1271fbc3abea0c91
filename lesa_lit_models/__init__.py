"""LESA and LIT attention backbones as timm models.

Importing this package registers every model with timm, so ``timm.create_model('lesa_resnet50')``
and ``timm.create_model('lit_s')`` work after ``import lesa_lit_models``. The checkpoint helpers below are the
ones every entry point (timm, ``lesa-lit-convert``, the detection adapter) loads weights with.
"""
__version__ = '0.1.0'
from typing import List

import timm

from . import lit  # noqa: F401  (registers models)
from . import lesa  # noqa: F401  (registers models)
from ._download import DownloadError, download_cached, is_url, load_checkpoint
from ._safe_load import CheckpointError, InertObject, UnsafeCheckpointError, allowed_globals, load_checkpoint_file
from ._state_dict import backbone_state_dict, strict_filter, strip_prefix, unwrap_state_dict, verify_state_dict

__all__ = [
    'package_models', 'CheckpointError', 'UnsafeCheckpointError', 'DownloadError', 'InertObject', 'allowed_globals',
    'load_checkpoint_file', 'load_checkpoint', 'download_cached', 'is_url', 'unwrap_state_dict', 'strip_prefix',
    'backbone_state_dict', 'verify_state_dict', 'strict_filter',
]


def package_models() -> List[str]:
    """Names of the timm models this package registers."""
    return timm.list_models(module=['lesa', 'lit'])  # timm files models under their module's last name
