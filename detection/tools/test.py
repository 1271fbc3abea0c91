"""Evaluate a detector checkpoint with the COCO metric (bbox and segm), or write COCO result jsons.

    python detection/tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--data-root DIR] [--input-size N]
                                  [--format-only | --test-dev] [--out-prefix PREFIX] [--out results.pkl]
                                  [--show-dir DIR] [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

CHECKPOINT is a local path or an http(s) URL (downloaded once into the torch hub cache): a checkpoint of this
package (trained or converted) or the authors' mmdet 2.x COCO checkpoint, converted on the fly. It must fit the
config's model exactly (mmengine would only warn). The metrics are also written to ``<work dir>/metrics.json``.
Use ``detection/test.sh`` for GPUs, nodes or the CPU.
"""
import argparse
import json
import os.path as osp
import sys

from lesa_lit_det.convert import load_detector_checkpoint
from lesa_lit_det.engine import DatasetNotFoundError, add_common_args, build_runner, check_image_files, \
    load_run_config, parse_common_args, set_format_only, use_test_dev
from lesa_lit_models import CheckpointError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file the checkpoint was trained (or converted) with')
    parser.add_argument('checkpoint', help='checkpoint path or URL (this package\'s or the authors\' mmdet 2.x layout)')
    add_common_args(parser, work_dir_help='logs and metrics.json (default: work_dirs/<config name>)',
                    input_size_help='resize to this size instead of the config\'s')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--format-only', action='store_true',
                      help='write the COCO result jsons of the test set without evaluating them')
    mode.add_argument('--test-dev', action='store_true',
                      help='run on COCO test-dev (test2017/, annotations/image_info_test-dev2017.json) and write the '
                           'json to submit')
    parser.add_argument('--out-prefix', help='result json prefix: PREFIX.bbox.json, PREFIX.segm.json (default with '
                                             '--format-only/--test-dev: <work dir>/results)')
    parser.add_argument('--out', help='also dump the raw predictions to this .pkl file')
    parser.add_argument('--show-dir', help='draw predictions into this folder (inside the work dir)')
    return parse_common_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args)
    cfg.load_from = None  # loaded below, strictly
    out_prefix = args.out_prefix or osp.join(cfg.work_dir, 'results')
    if args.test_dev:
        use_test_dev(cfg, out_prefix)
    elif args.format_only:
        set_format_only(cfg, out_prefix)
    elif args.out_prefix:
        cfg.test_evaluator.outfile_prefix = args.out_prefix
    if args.out:
        cfg.test_evaluator = [cfg.test_evaluator, dict(type='DumpDetResults', out_file_path=args.out)]
    if args.show_dir:
        cfg.default_hooks.visualization.update(draw=True, test_out_dir=args.show_dir)
    try:
        runner = build_runner(cfg, args.launcher, ['test_dataloader'])
        check_image_files(runner.test_loop.dataloader.dataset)
    except DatasetNotFoundError as e:
        sys.exit(f'error: {e}')
    try:
        load_detector_checkpoint(runner.model, args.checkpoint)
    except CheckpointError as e:
        sys.exit(f'error: {e}')
    metrics = runner.test()
    if runner.rank == 0:
        with open(osp.join(cfg.work_dir, 'metrics.json'), 'w') as f:
            json.dump(metrics, f, indent=1)


if __name__ == '__main__':
    main()
