"""Detect objects in images with a detector config and checkpoint; draw the predictions and write them as json.

    python detection/tools/infer.py CONFIG CHECKPOINT IMAGE_OR_FOLDER [...] [--out-dir work_dirs/infer]
                                   [--score-thr 0.3] [--device cpu|cuda] [--cfg-options KEY=VALUE ...]

CHECKPOINT is a path or an http(s) URL, as for ``detection/test.sh``: a checkpoint of this package or the authors'
mmdet 2.x COCO checkpoint (converted on the fly), e.g. for LIT-Ti Mask R-CNN
    python detection/tools/infer.py detection/configs/lit/mask-rcnn_lit-ti_fpn_1x_coco.py \\
        https://github.com/ziplab/LIT/releases/download/v2.0/mask_rcnn_lit_ti.pth demo_images/
Writes OUT_DIR/vis/<image> (boxes, masks, class names and scores of the detections above --score-thr) and
OUT_DIR/preds/<image name>.json (every detection: labels, scores, boxes, masks as RLE). mmdet's DetInferencer
does the work.

Files that cannot be read as images (missing, empty, truncated, not an image) are skipped, each with a line that
names it and says why, and the run goes on. Exit status: 0 when at least one image was predicted, even with files
skipped (a stray file in a folder of thousands should not fail a batch job: the skipped ones are listed at the end),
1 when no input could be read.
"""
import argparse
import sys

from lesa_lit_det.engine import load_config
from lesa_lit_det.inference import DetectorInferencer
from lesa_lit_models import CheckpointError
from mmengine.config import DictAction


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config of the detector')
    parser.add_argument('checkpoint', help='checkpoint path or URL (this package\'s or the authors\' mmdet 2.x layout)')
    parser.add_argument('inputs', nargs='+', help='image files or folders of images')
    parser.add_argument('--out-dir', default='work_dirs/infer', help='output folder (vis/ and preds/)')
    parser.add_argument('--score-thr', type=float, default=0.3, help='draw detections scoring at least this')
    parser.add_argument('--device', help='cpu, cuda, cuda:1 ... (default: cuda if there is a GPU)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    args = parser.parse_args(argv)
    try:
        inferencer = DetectorInferencer(load_config(args.config, args.cfg_options), args.checkpoint, args.device)
    except CheckpointError as e:
        sys.exit(f'error: {e}')
    predicted = 0
    for source in args.inputs:
        result = inferencer(source, batch_size=args.batch_size, out_dir=args.out_dir, pred_score_thr=args.score_thr,
                            no_save_pred=False)
        predicted += len(result['predictions'])
    skipped = inferencer.skipped
    if skipped:
        print(f'Skipped {len(skipped)} file(s) that are not readable images:')
        print(''.join(f'  {path}: {reason}\n' for path, reason in skipped), end='')
    if not predicted:
        sys.exit('error: none of the inputs is a readable image; nothing was predicted.')
    print(f'{predicted} image(s): predictions drawn in {args.out_dir}/vis, written to {args.out_dir}/preds.')


if __name__ == '__main__':
    main()
