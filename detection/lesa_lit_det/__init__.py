"""mmdetection 3.x adapter for the timm models of ``lesa_lit_models`` (and any timm feature extractor).

Importing this package registers :class:`~lesa_lit_det.backbone.TimmBackbone` in ``mmdet.registry.MODELS``;
configs load it with ``custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'])``.
"""
from .backbone import TimmBackbone

__all__ = ['TimmBackbone']
