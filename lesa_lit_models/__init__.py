"""LESA and LIT attention backbones as timm models.

Importing this package registers every model with timm, so ``timm.create_model('lesa_resnet50')``
and ``timm.create_model('lit_s')`` work after ``import lesa_lit_models``.
"""
__version__ = '0.1.0'
from . import lit  # noqa: F401  (registers models)
from . import lesa  # noqa: F401  (registers models)
