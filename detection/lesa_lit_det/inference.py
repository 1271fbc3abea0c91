"""mmdet's ``DetInferencer`` on this package's checkpoints and on the authors' (converted on the fly)."""
import io
import os
import os.path as osp
from typing import List, Optional, Tuple

import mmcv
import torch.nn as nn
from mmdet.apis import DetInferencer
from mmdet.apis.det_inferencer import IMG_EXTENSIONS
from mmengine.config import Config
from mmengine.logging import print_log
from PIL import Image

from .convert import detector_state_dict

__all__ = ['DetectorInferencer', 'unreadable_image_reason']


def unreadable_image_reason(path: str) -> Optional[str]:
    """Why ``path`` cannot be a detector input (missing, unreadable, empty, no image, truncated), or None."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        return f'cannot be read ({e.strerror})'
    if not data:
        return 'empty file'
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Image.UnidentifiedImageError:
        return 'not an image'
    except (OSError, SyntaxError, ValueError) as e:  # PIL's words for a damaged file
        return f'damaged or truncated image ({e})'
    if mmcv.imfrombytes(data) is None:
        return 'an image format the detector\'s image decoder (OpenCV) does not read'
    return None


class DetectorInferencer(DetInferencer):
    """``DetInferencer`` for checkpoints in this package's layout or the authors' mmdet 2.x layout (a path or a URL).

    mmengine reads the checkpoint through the package's safe loader (:mod:`lesa_lit_det.loading`); the weights are
    converted if need be and checked key for key against the model (mmengine alone would only warn). Class names
    come from the checkpoint (``dataset_meta``, or mmdet 2.x ``CLASSES``), else COCO's.

    Files that cannot be read as images (missing, empty, truncated, not an image) are skipped with a warning naming
    the file and why; they are listed in ``skipped`` as ``(path, reason)``.
    """

    def __init__(self, model: Config, weights: str, device: Optional[str] = None, **kwargs):
        self.weights = weights
        self.skipped: List[Tuple[str, str]] = []
        super().__init__(model, weights, device, **kwargs)

    def _load_weights_to_model(self, model: nn.Module, checkpoint: Optional[dict], cfg: Optional[Config]):
        # the one step between reading and loading the weights, which no public hook of DetInferencer reaches
        if checkpoint is not None:
            checkpoint = dict(checkpoint, state_dict=detector_state_dict(model, checkpoint, self.weights))
        super()._load_weights_to_model(model, checkpoint, cfg)

    def _inputs_to_list(self, inputs) -> list:
        if isinstance(inputs, str) and osp.isdir(inputs):  # every file of the folder, to report the ones skipped
            inputs = [osp.join(inputs, name) for name in sorted(os.listdir(inputs))
                      if osp.isfile(osp.join(inputs, name))]
        readable = []
        for item in super()._inputs_to_list(inputs):
            reason = None
            if isinstance(item, str) and '://' not in item:  # a local file (URLs are read by mmengine)
                reason = ('not an image file name (' + ', '.join(IMG_EXTENSIONS) + ')'
                          if not item.lower().endswith(IMG_EXTENSIONS) else unreadable_image_reason(item))
            if reason is None:
                readable.append(item)
            else:
                self.skipped.append((item, reason))
                print_log(f'skipped {item}: {reason}', logger='current', level=30)
        return readable
