"""Convert an authors' COCO checkpoint (mmdetection 2.x: LESA_detection, LIT) for a config of this package.

    python detection/tools/convert_coco_checkpoint.py CONFIG UPSTREAM OUT.pth [--cfg-options KEY=VALUE ...]

UPSTREAM is a path or an http(s) URL. ``detection/test.sh`` and ``tools/infer.py`` take the authors' files
directly (they convert on the fly); a converted file loads without the conversion step, e.g. for fine-tuning
(``--cfg-options load_from=OUT.pth``).

CONFIG is the config of the same detector (e.g. configs/lesa/mask-rcnn_lesa-r50-dconv-c3-c5_fpn_1024-8xb1-20e_coco.py
for the authors' LESA Mask R-CNN epoch_20.pth).
"""
import argparse
import json
import sys

from lesa_lit_det.convert import convert_coco_checkpoint
from lesa_lit_models import CheckpointError
from mmengine.config import DictAction


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config of the detector the checkpoint belongs to')
    parser.add_argument('upstream', help='the authors\' checkpoint (mmdet 2.x format): path or URL')
    parser.add_argument('out', help='output checkpoint for detection/test.sh')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    args = parser.parse_args(argv)
    try:
        summary = convert_coco_checkpoint(args.config, args.upstream, args.out, args.cfg_options)
    except CheckpointError as e:
        sys.exit(f'error: {e}')
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
