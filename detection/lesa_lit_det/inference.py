"""mmdet's ``DetInferencer`` on this package's checkpoints and on the authors' (converted on the fly)."""
from typing import Optional

import torch.nn as nn
from mmdet.apis import DetInferencer
from mmengine.config import Config

from .convert import detector_state_dict

__all__ = ['DetectorInferencer']


class DetectorInferencer(DetInferencer):
    """``DetInferencer`` for checkpoints in this package's layout or the authors' mmdet 2.x layout (a path or a URL).

    mmengine reads the checkpoint through the package's safe loader (:mod:`lesa_lit_det.loading`); the weights are
    converted if need be and checked key for key against the model (mmengine alone would only warn). Class names
    come from the checkpoint (``dataset_meta``, or mmdet 2.x ``CLASSES``), else COCO's.
    """

    def __init__(self, model: Config, weights: str, device: Optional[str] = None, **kwargs):
        self.weights = weights
        super().__init__(model, weights, device, **kwargs)

    def _load_weights_to_model(self, model: nn.Module, checkpoint: Optional[dict], cfg: Optional[Config]):
        # the one step between reading and loading the weights, which no public hook of DetInferencer reaches
        if checkpoint is not None:
            checkpoint = dict(checkpoint, state_dict=detector_state_dict(model, checkpoint, self.weights))
        super()._load_weights_to_model(model, checkpoint, cfg)
