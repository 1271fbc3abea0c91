"""The attention switch of both families: ``'fused'`` (exact, no tokens x tokens tensor kept) or ``'reference'``
(the formulation of the papers, every tokens x tokens tensor materialised); see ``docs/attention.md``."""
import torch.nn as nn

__all__ = ['ATTN_IMPLS', 'check_attn_impl', 'set_attn_impl']

ATTN_IMPLS = ('fused', 'reference')


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl={attn_impl!r} is not supported: use one of {ATTN_IMPLS}.')
    return attn_impl


def set_attn_impl(model: nn.Module, attn_impl: str, attention_type: type):
    """Switch every ``attention_type`` module of ``model`` to ``attn_impl``."""
    attn_impl = check_attn_impl(attn_impl)
    for module in model.modules():
        if isinstance(module, attention_type):
            module.attn_impl = attn_impl
