"""Draw COCO-format predictions on their images into one PNG.

    python detection/tools/test.py CONFIG CKPT --data-root D --out-prefix work_dirs/x/results
    python detection/tools/draw_predictions.py D/annotations/instances_val2017.json D/val2017 \
        work_dirs/x/results predictions.png [--score-thr 0.3]
"""
import argparse

from lesa_lit_det.visualize import draw_predictions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('ann_file', help='the COCO annotation (or image info) json of the images')
    parser.add_argument('img_dir', help='folder of the images')
    parser.add_argument('results_prefix', help='prefix of the result jsons (PREFIX.bbox.json, PREFIX.segm.json)')
    parser.add_argument('out_file', help='PNG to write')
    parser.add_argument('--score-thr', type=float, default=0.3)
    parser.add_argument('--max-images', type=int, default=8)
    args = parser.parse_args(argv)
    print(draw_predictions(args.ann_file, args.img_dir, args.results_prefix, args.out_file, args.score_thr,
                           args.max_images))


if __name__ == '__main__':
    main()
