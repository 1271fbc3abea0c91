"""Train a detector from a config (mmdet 3.x ``tools/train.py`` plus this project's adjustments).

    python detection/tools/train.py CONFIG [--work-dir DIR] [--data-root DIR] [--input-size N] [--amp]
                                   [--auto-scale-lr] [--resume [CKPT]] [--cfg-options KEY=VALUE ...]
                                   [--launcher none|pytorch|slurm|mpi]

Use ``detection/train.sh`` for one or several GPUs, several nodes, or the CPU. Without a GPU, configs that ask for
``AmpOptimWrapper`` train in fp32.
"""
import argparse
import sys

from lesa_lit_det.engine import DatasetNotFoundError, add_common_args, build_runner, load_run_config, \
    parse_common_args
from lesa_lit_models import CheckpointError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file, e.g. detection/configs/lit/mask-rcnn_lit-ti_fpn_1x_coco.py')
    add_common_args(parser, work_dir_help='logs and checkpoints (default: work_dirs/<config name>)',
                    input_size_help='resize to this size instead of the config\'s (quick runs)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (GPU only)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr to the actual total batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint in the work dir when none is given')
    return parse_common_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    try:
        runner = build_runner(cfg, args.launcher, ['train_dataloader', 'val_dataloader'])
    except DatasetNotFoundError as e:
        sys.exit(f'error: {e}')
    try:
        runner.train()
    except CheckpointError as e:  # ImageNet weights (init_cfg), --resume or load_from
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
