"""mmdetection 3.x adapter for the timm models of ``lesa_lit_models`` (and any timm feature extractor).

Importing this package registers :class:`~lesa_lit_det.backbone.TimmBackbone` in ``mmdet.registry.MODELS`` and
:class:`~lesa_lit_det.hooks.TrainingTimeHook` in mmengine's ``HOOKS``, and makes the package's safe checkpoint
loader mmengine's loader for local files and http(s) URLs (``load_from``, ``resume``, ``init_cfg``,
``DetInferencer``): checkpoints are read as tensors and plain data, never as code. Local files that mmengine writes
(checkpoints) are written whole or not at all (:mod:`lesa_lit_det.resume`).
Configs load it with ``custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'])``.
"""
try:
    import mmdet  # noqa: F401
except ImportError as error:
    raise ImportError("lesa_lit_det needs mmdetection 3.3 and mmcv 2.1 with compiled ops: `make setup` in your clone "
                      "of lesa-lit-models compiles mmcv's ops and installs lesa-lit-models[detection] (see the "
                      "README's install section)") from error

from .backbone import TimmBackbone
from .hooks import TrainingTimeHook
from .loading import register_checkpoint_loader
from .resume import register_atomic_local_backend

register_checkpoint_loader()
register_atomic_local_backend()

__all__ = ['TimmBackbone', 'TrainingTimeHook', 'register_checkpoint_loader', 'register_atomic_local_backend']
