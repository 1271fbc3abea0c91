"""Draw COCO-format predictions next to the ground truth of their images, into one PNG.

    python detection/tools/test.py CONFIG CKPT --data-root D --work-dir W --out-prefix W/results
    python detection/tools/draw_predictions.py D/annotations/instances_val2017.json D/val2017 \
        W/results predictions.png [--score-thr 0.3] [--metrics W/metrics.json] [--all-overlaps]

Of predictions whose boxes overlap (IoU >= 0.5), whatever their classes, only the top-scored is drawn: the class a
person would read off the detector; ``--all-overlaps`` draws every prediction (mmdet's NMS is per class).

With ``--metrics`` (the ``metrics.json`` test.py writes) the box and mask AP table is printed and the APs are
written into the picture's header.
"""
import argparse
import json

from lesa_lit_det.visualize import OVERLAP_THR, draw_predictions, metrics_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('ann_file', help='the COCO annotation (or image info) json of the images')
    parser.add_argument('img_dir', help='folder of the images')
    parser.add_argument('results_prefix', help='prefix of the result jsons (PREFIX.bbox.json, PREFIX.segm.json)')
    parser.add_argument('out_file', help='PNG to write')
    parser.add_argument('--score-thr', type=float, default=0.3)
    parser.add_argument('--max-images', type=int, default=8)
    parser.add_argument('--metrics', help='metrics.json of the same results (tools/test.py): print the AP table')
    parser.add_argument('--all-overlaps', action='store_true',
                        help='draw overlapping predictions of other classes too, not only the top-scored')
    args = parser.parse_args(argv)
    metrics = None
    if args.metrics:
        with open(args.metrics) as f:
            metrics = json.load(f)
        print(metrics_table(metrics))
    print(draw_predictions(args.ann_file, args.img_dir, args.results_prefix, args.out_file, args.score_thr,
                           args.max_images, metrics=metrics, overlap_thr=None if args.all_overlaps else OVERLAP_THR))


if __name__ == '__main__':
    main()
