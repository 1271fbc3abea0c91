"""The steps shared by ``tools/train.py``, ``tools/test.py`` and the demo, around mmengine's Runner.

* the command-line options both tools share, the config they load from them, and the Runner built from it;
* config loading with the adjustments the command line offers (data root, input size, test-dev);
* device adaptation: fp32 instead of ``AmpOptimWrapper`` and the gloo backend when there is no GPU;
* a clear error for a missing dataset.

Checkpoints (detector weights, ``resume``, ``load_from``) are read by the package's safe loader, which
:mod:`lesa_lit_det` makes mmengine's (see :mod:`lesa_lit_det.loading`).
"""
import argparse
import os
import os.path as osp
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .resume import EpochSeedHook

__all__ = [
    'DatasetNotFoundError', 'add_common_args', 'parse_common_args', 'load_run_config', 'build_runner',
    'load_config', 'set_data_root', 'set_input_size', 'reduce_proposals', 'use_test_dev', 'adapt_to_device',
    'check_dataset_paths', 'check_image_files', 'init_cpu_distributed',
]

LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
EVALUATORS = {'val_dataloader': 'val_evaluator', 'test_dataloader': 'test_evaluator'}
TEST_DEV_ANN = 'annotations/image_info_test-dev2017.json'


class DatasetNotFoundError(FileNotFoundError):
    """Annotation files or image folders named by the config do not exist."""


def _dataset(loader: ConfigDict) -> ConfigDict:
    dataset = loader.dataset
    while 'dataset' in dataset:  # dataset wrappers (RepeatDataset, ClassBalancedDataset, ...)
        dataset = dataset.dataset
    return dataset


def _loaders(cfg: Config, names: Iterable[str] = LOADERS) -> List[ConfigDict]:
    return [cfg[name] for name in names if cfg.get(name) is not None]


def add_common_args(parser: argparse.ArgumentParser, work_dir_help: str, input_size_help: str):
    """Add the options ``tools/train.py`` and ``tools/test.py`` take after their positional arguments:
    ``--work-dir``, ``--data-root`` and ``--input-size``."""
    parser.add_argument('--work-dir', help=work_dir_help)
    parser.add_argument('--data-root', help='dataset folder in the COCO layout (default: the config\'s data/coco/)')
    parser.add_argument('--input-size', type=int, help=input_size_help)


def parse_common_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Add the options both tools end with (``--cfg-options``, ``--launcher``, ``--local-rank``), parse ``argv``
    and export ``LOCAL_RANK`` (from ``--local-rank`` unless set) for mmengine."""
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def load_run_config(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the command line's overrides, launcher and work dir (default:
    ``work_dirs/<config name>``)."""
    cfg = load_config(args.config, args.cfg_options, args.data_root, args.input_size)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        'work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config, launcher: str, loaders: Sequence[str]) -> Runner:
    """Adapt ``cfg`` to the device, check the datasets of ``loaders`` (:class:`DatasetNotFoundError`), set up
    several CPU processes if so launched, and build mmengine's Runner (or the config's ``runner_type``); a training
    runner seeds each epoch (:class:`~lesa_lit_det.resume.EpochSeedHook`)."""
    adapt_to_device(cfg)
    check_dataset_paths(cfg, loaders)
    init_cpu_distributed(cfg, launcher)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if 'train_dataloader' in loaders:
        runner.register_hook(EpochSeedHook())
    return runner


def load_config(
        path: str,
        cfg_options: Optional[Dict] = None,
        data_root: Optional[str] = None,
        input_size: Optional[int] = None,
) -> Config:
    """``Config.fromfile`` plus ``--cfg-options``, then the data root and input size overrides."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'Config file not found: {path!r}; the shipped ones are in detection/configs/.')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if data_root is not None:
        set_data_root(cfg, data_root)
    if input_size is not None:
        set_input_size(cfg, input_size)
    return cfg


def set_data_root(cfg: Config, root: str):
    """Point every dataset and COCO evaluator at ``root`` (a folder in the COCO layout).

    The stock base configs build ``ann_file`` of their evaluators from ``data_root`` when they are read, so
    overriding ``data_root`` alone would leave the evaluators on ``data/coco/``.
    """
    root = osp.join(root, '')
    for name in LOADERS:
        if cfg.get(name) is None:
            continue
        dataset = _dataset(cfg[name])
        dataset.data_root = root
        evaluator = cfg.get(EVALUATORS.get(name, ''))
        if isinstance(evaluator, dict) and 'ann_file' in evaluator:
            evaluator.ann_file = osp.join(root, dataset.ann_file)


def set_input_size(cfg: Config, size: int):
    """Resize to ``size`` instead of the configured scale (for quick runs).

    ``keep_ratio`` stays as configured: fixed-size configs (LESA) get ``size x size`` images and a backbone built
    for that size (``img_size``), the others images whose longer side is at most ``size`` and the backbone as
    configured (LIT-S keeps its tables laid out as the checkpoint's and resamples them to each input).
    """
    resizes = [t for loader in _loaders(cfg) for t in _dataset(loader).pipeline if t['type'] == 'Resize']
    if not resizes:
        raise ValueError('set_input_size: the config pipelines have no Resize transform to change.')
    for transform in resizes:
        transform['scale'] = (size, size)
    if not any(t.get('keep_ratio', False) for t in resizes) and 'img_size' in cfg.model.backbone:
        cfg.model.backbone.img_size = size


def reduce_proposals(cfg: Config, proposals: int = 100, samples: int = 64, detections: int = 20):
    """Fewer RPN proposals, sampled RoIs and detections per image (one-stage: fewer candidates), for CPU runs."""
    train_cfg, test_cfg = cfg.model.get('train_cfg') or {}, cfg.model.get('test_cfg') or {}
    if 'rpn_proposal' in train_cfg:
        train_cfg.rpn_proposal.update(nms_pre=2 * proposals, max_per_img=proposals)
        stages = train_cfg.rcnn if isinstance(train_cfg.rcnn, list) else [train_cfg.rcnn]
        for stage in stages:
            stage.sampler.num = samples
        test_cfg.rpn.update(nms_pre=2 * proposals, max_per_img=proposals)
        test_cfg.rcnn.max_per_img = detections
    else:
        test_cfg.update(nms_pre=2 * proposals, max_per_img=detections)


def use_test_dev(cfg: Config, outfile_prefix: str):
    """Test on COCO test-dev (``test2017/`` + ``image_info_test-dev2017.json``): write the result json only."""
    dataset = _dataset(cfg.test_dataloader)
    dataset.ann_file = TEST_DEV_ANN
    dataset.data_prefix = dict(img='test2017/')
    dataset.pipeline = [t for t in dataset.pipeline if t['type'] != 'LoadAnnotations']
    cfg.test_evaluator.ann_file = osp.join(dataset.get('data_root', ''), TEST_DEV_ANN)
    set_format_only(cfg, outfile_prefix)


def set_format_only(cfg: Config, outfile_prefix: str):
    """Write ``<prefix>.bbox.json`` (and ``.segm.json``) in the COCO results format instead of evaluating."""
    cfg.test_evaluator.format_only = True
    cfg.test_evaluator.outfile_prefix = outfile_prefix


def adapt_to_device(cfg: Config):
    """Without CUDA: train in fp32 (``AmpOptimWrapper`` needs a GPU) and use the gloo backend."""
    if torch.cuda.is_available():
        return
    optim_wrapper = cfg.get('optim_wrapper')
    if optim_wrapper is not None and optim_wrapper.get('type') == 'AmpOptimWrapper':
        print_log('No GPU: training in fp32 with OptimWrapper instead of AmpOptimWrapper.', logger='current')
        optim_wrapper.type = 'OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            optim_wrapper.pop(key, None)
    cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())['backend'] = 'gloo'


def check_dataset_paths(cfg: Config, loaders: Sequence[str]):
    """Raise :class:`DatasetNotFoundError` naming every annotation file or image folder that is missing."""
    missing = []
    for name in loaders:
        if cfg.get(name) is None:
            continue
        dataset = _dataset(cfg[name])
        root = dataset.get('data_root', '') or ''
        paths = [osp.join(root, dataset.ann_file)] if dataset.get('ann_file') else []
        paths += [osp.join(root, prefix) for prefix in (dataset.get('data_prefix') or {}).values()]
        missing += [f'{name}: {path}' for path in paths if not osp.exists(path)]
    if not missing:
        return
    message = 'Dataset files not found:\n  ' + '\n  '.join(missing) + (
        '\nPut COCO in the layout of detection/README.md under the config\'s data_root (default data/coco/), or '
        'pass --data-root DIR. A small synthetic dataset: python detection/tools/make_synthetic_coco.py DIR.')
    if any('stuffthingmaps' in m for m in missing):
        message += ('\nHTC\'s semantic branch trains on COCO-stuff maps (stuffthingmaps/train2017/); without them '
                    'use the htc-without-semantic config.')
    raise DatasetNotFoundError(message)


def check_image_files(dataset, listed: int = 5):
    """Raise :class:`DatasetNotFoundError` naming the images that ``dataset``'s annotation file lists and that are
    not on disk (before a long run stops at the first of them)."""
    while hasattr(dataset, 'dataset'):  # dataset wrappers
        dataset = dataset.dataset
    paths = [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))]
    missing = [path for path in paths if not osp.isfile(path)]
    if missing:
        more = f' ... and {len(missing) - listed} more' if len(missing) > listed else ''
        raise DatasetNotFoundError(
            f'{len(missing)} of the {len(paths)} images that {dataset.ann_file} lists are missing: '
            + ', '.join(missing[:listed]) + more + '. Put them there, or point --data-root (or the config\'s '
            'data_prefix) at the folder that holds them.')


def init_cpu_distributed(cfg: Config, launcher: str):
    """Several processes without GPUs (torchrun on CPU): gloo process group and a device-less DDP wrapper.

    mmengine's own initialisation binds each process to a CUDA device, which does not exist here.
    """
    if launcher != 'pytorch' or torch.cuda.is_available() or torch.distributed.is_initialized():
        return
    torch.distributed.init_process_group('gloo')
    cfg.model_wrapper_cfg = dict(
        type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
