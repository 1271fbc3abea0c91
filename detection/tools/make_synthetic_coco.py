"""Write a small synthetic COCO-format instance dataset (shapes with polygon masks, COCO layout).

    python detection/tools/make_synthetic_coco.py data/synthetic_coco [--num-train 16] [--seed 0]

Then train or test any config on it with ``--data-root data/synthetic_coco``.
"""
import argparse
import json
import sys

from lesa_lit_det.synthetic import DatasetExistsError, SyntheticCocoSpec, make_synthetic_coco


def main(argv=None):
    defaults = SyntheticCocoSpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', help='output folder (created; an existing foreign folder is never written into)')
    parser.add_argument('--num-train', type=int, default=defaults.num_train)
    parser.add_argument('--num-val', type=int, default=defaults.num_val)
    parser.add_argument('--num-test', type=int, default=defaults.num_test, help='images of the test-dev split')
    parser.add_argument('--min-side', type=int, default=defaults.min_side)
    parser.add_argument('--max-side', type=int, default=defaults.max_side)
    parser.add_argument('--max-objects', type=int, default=defaults.max_objects)
    parser.add_argument('--no-stuff-maps', action='store_true', help='skip the COCO-stuff maps (HTC semantic)')
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a synthetic dataset generated earlier with other settings')
    args = parser.parse_args(argv)
    spec = SyntheticCocoSpec(
        num_train=args.num_train, num_val=args.num_val, num_test=args.num_test, min_side=args.min_side,
        max_side=args.max_side, max_objects=args.max_objects, stuff_maps=not args.no_stuff_maps, seed=args.seed)
    try:
        summary = make_synthetic_coco(args.root, spec, overwrite=args.overwrite, progress=True)
    except DatasetExistsError as e:
        sys.exit(f'error: {e}')
    print(json.dumps(summary, indent=1))


if __name__ == '__main__':
    main()
