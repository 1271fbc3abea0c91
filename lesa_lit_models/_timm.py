"""The timm helpers this package uses that timm does not export, imported here only (a timm release that moves them
breaks this file alone); everything else comes from timm's public ``timm.models`` / ``timm.layers`` / ``timm.data``.
"""
from timm.models._builder import _resolve_pretrained_source  # the source priority of timm's own load_pretrained
from timm.models._features import feature_take_indices  # forward_intermediates' index rule, as timm's models use it
from timm.models._hub import generate_readme  # the model card push_to_hf_hub writes; save_for_hf writes none

__all__ = ['_resolve_pretrained_source', 'feature_take_indices', 'generate_readme']
