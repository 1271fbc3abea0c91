"""mmdet's ``DetInferencer`` on this package's checkpoints and on the authors' (converted on the fly)."""
import warnings
from typing import Optional

import torch.nn as nn
from mmdet.apis import DetInferencer
from mmengine.config import Config

from .convert import load_detector_checkpoint

__all__ = ['DetectorInferencer']


class DetectorInferencer(DetInferencer):
    """``DetInferencer`` whose weights load through :func:`~lesa_lit_det.convert.load_detector_checkpoint`: a path
    or URL, this package's layout or the authors' mmdet 2.x layout, read by the safe loader and checked key for key.

    Class names come from the checkpoint (``dataset_meta``, or mmdet 2.x ``CLASSES``), else from the config's
    dataset (COCO's 80 classes for the shipped configs).
    """

    def _init_model(self, cfg: Config, weights: Optional[str], device: str = 'cpu') -> nn.Module:
        if weights is None:
            raise ValueError('DetectorInferencer needs the detector weights (a checkpoint path or URL).')
        with warnings.catch_warnings():  # the parent's "weights is None, use COCO classes by default"
            warnings.simplefilter('ignore', UserWarning)
            model = super()._init_model(cfg, None, device)
        meta = load_detector_checkpoint(model, weights)
        classes = (meta.get('dataset_meta') or {}).get('classes', meta.get('CLASSES'))
        if classes is not None:
            model.dataset_meta['classes'] = tuple(str(c) for c in classes)
        return model
