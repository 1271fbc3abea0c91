"""Train a detector from a config (mmdet 3.x ``tools/train.py`` plus this project's adjustments).

    python detection/tools/train.py CONFIG [--work-dir DIR] [--data-root DIR] [--amp] [--resume [CKPT]]
                                   [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

Use ``detection/train.sh`` for one or several GPUs, several nodes, or the CPU. Without a GPU, configs that ask for
``AmpOptimWrapper`` train in fp32.
"""
import argparse
import os
import os.path as osp
import sys

from lesa_lit_det.engine import DatasetNotFoundError, adapt_to_device, check_dataset_paths, init_cpu_distributed, \
    load_config
from mmengine.config import DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file, e.g. detection/configs/lit/mask-rcnn_lit-ti_fpn_1x_coco.py')
    parser.add_argument('--work-dir', help='logs and checkpoints (default: work_dirs/<config name>)')
    parser.add_argument('--data-root', help='dataset folder in the COCO layout (default: the config\'s data/coco/)')
    parser.add_argument('--input-size', type=int, help='resize to this size instead of the config\'s (quick runs)')
    parser.add_argument('--amp', action='store_true', help='mixed precision (GPU only)')
    parser.add_argument('--auto-scale-lr', action='store_true', help='scale the lr to the actual total batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or from the latest checkpoint in the work dir when none is given')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv=None):
    # mmengine 0.10 + torch >= 2.6: mmengine's own checkpoints (resume, load_from) need full unpickling
    os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.data_root, args.input_size)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    adapt_to_device(cfg)
    try:
        check_dataset_paths(cfg, ['train_dataloader', 'val_dataloader'])
    except DatasetNotFoundError as e:
        sys.exit(f'error: {e}')
    init_cpu_distributed(cfg, args.launcher)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    runner.train()


if __name__ == '__main__':
    main()
