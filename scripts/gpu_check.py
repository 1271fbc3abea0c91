"""The first run on a GPU machine (``make gpu-check``): the CUDA tests; a few training steps and one prediction of each
paper detector at the paper's input size, with its config's mixed precision and gradient checkpointing, timed and
with the peak GPU memory; the quick benchmark on the device. It writes ``gpu_check.json`` and ``gpu_check.md`` (commit,
GPU, driver, CUDA and torch versions) and the benchmark's files to OUT (default ``benchmarks/results/cuda/gpu-check``).

    python scripts/gpu_check.py                    # on the GPU, after `CUDA=1 make setup`
    python scripts/gpu_check.py --cpu --out DIR    # the same steps on the CPU at tiny sizes (tests/test_gpu_check.py)

Each step runs even if one before it failed; the exit status is 1 if any failed.
"""
import argparse
import datetime
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(ROOT, 'detection', 'configs')
DETECTORS = [  # the papers' six COCO detectors
    'lesa/mask-rcnn_lesa-r50-dconv-c3-c5_fpn_1024-8xb1-20e_coco.py',
    'lesa/htc_lesa-wrn50-dconv-c3-c5_fpn_1280-4xb1-20e_coco.py',
    'lit/retinanet_lit-ti_fpn_1x_coco.py',
    'lit/retinanet_lit-s_fpn_amp-1x_coco.py',
    'lit/mask-rcnn_lit-ti_fpn_1x_coco.py',
    'lit/mask-rcnn_lit-s_fpn_amp-1x_coco.py',
]
STEPS = dict(cuda=6, cpu=3)  # training iterations per detector; the first two (warm-up, autotuning) are not timed
# --cpu: the input side, and LESA and LIT backbones one or two blocks a stage, LESA's bottlenecks at ResNet-50 width
TINY = dict(size=128, lesa=dict(layers=(1, 1, 2, 1), base_width=64), lit=dict(depths=(1, 1, 1, 1)))


def _output(*command: str) -> str:
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ''


def environment(device: str) -> dict:
    import torch
    commit = _output('git', 'rev-parse', '--short', 'HEAD')
    dirty = bool(_output('git', 'status', '--porcelain', '--', 'lesa_lit_models', 'detection'))
    env = dict(date=datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'), device=device,
               commit=commit + (' (with uncommitted changes)' if dirty else ''), torch=torch.__version__,
               cuda=torch.version.cuda, python=sys.version.split()[0])
    if device == 'cuda':
        driver = _output('nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader')
        env.update(gpu=torch.cuda.get_device_name(), driver=driver.splitlines()[0] if driver else 'unknown')
    try:
        from mmcv.ops import get_compiling_cuda_version
        env['mmcv_cuda'] = get_compiling_cuda_version()
    except ImportError as e:
        env['mmcv_cuda'] = f'not importable: {e}'
    return env


def cuda_tests(out: str) -> dict:
    """tests/test_cuda.py (every test skips without a GPU): counts from its JUnit report."""
    report = osp.join(out, 'test_cuda.xml')
    started = time.monotonic()
    subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-o', 'addopts=',
                    f'--junitxml={report}', osp.join(ROOT, 'tests', 'test_cuda.py')], cwd=ROOT)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    counts = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
    return dict(counts, status='ok' if not counts['failures'] + counts['errors'] else 'failed',
                wall_s=round(time.monotonic() - started, 1))


def synthetic_coco(root: str, images: int, sides) -> str:
    from lesa_lit_det.synthetic import SyntheticCocoSpec, make_synthetic_coco
    make_synthetic_coco(root, SyntheticCocoSpec(num_train=images, num_val=1, num_test=1, min_side=sides[0],
                                                max_side=sides[1]))
    return root


def _step_timer(device: str):
    """An mmengine hook that keeps the end time of every training iteration in ``ends``."""
    import torch
    from mmengine.hooks import Hook

    class StepTimer(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.ends = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if device == 'cuda':
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def detector(config: str, device: str, data: str, work: str) -> dict:
    """``STEPS[device]`` training iterations and one prediction (the val image, COCO-evaluated) of ``config``."""
    import torch
    from lesa_lit_det.engine import build_runner, load_config, reduce_proposals
    cfg = load_config(osp.join(CONFIGS, config), {'model.backbone.init_cfg': None}, data_root=data,
                      input_size=TINY['size'] if device == 'cpu' else None)
    if device == 'cpu':
        cfg.model.backbone.update(TINY[cfg.model.backbone.model_name.split('_')[0]])
        reduce_proposals(cfg)
    cfg.work_dir, cfg.log_level = work, 'WARNING'  # the step log, without each runner's environment and config
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=2)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.update(checkpoint=None, logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False))
    cfg.train_dataloader.dataset.indices = STEPS[device] * cfg.train_dataloader.batch_size
    test_cfg = cfg.model.test_cfg
    (test_cfg.rcnn if 'rcnn' in test_cfg else test_cfg).score_thr = 0.0  # random weights score low: keep them all
    if device == 'cpu':
        for loader in (cfg.train_dataloader, cfg.test_dataloader):
            loader.update(num_workers=0, persistent_workers=False)
    amp = cfg.optim_wrapper.get('type') == 'AmpOptimWrapper' and device == 'cuda'
    result = dict(config=config, amp=amp, with_cp=bool(cfg.model.backbone.get('with_cp')),
                  batch_size=cfg.train_dataloader.batch_size)
    started = time.monotonic()
    try:
        runner = build_runner(cfg, 'none', ['train_dataloader', 'test_dataloader'])
        timer = _step_timer(device)
        runner.register_hook(timer)
        if device == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        runner.train()
        steps = [b - a for a, b in zip(timer.ends[1:], timer.ends[2:])] or [float('nan')]
        result.update(steps=len(timer.ends), step_s=round(statistics.median(steps), 4))
        if device == 'cuda':
            result['train_peak_gib'] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        predict_started = time.perf_counter()
        metrics = runner.test()
        result.update(predict_s=round(time.perf_counter() - predict_started, 2),
                      predicted=sorted(k for k in metrics if k.endswith('_mAP')), status='ok')
    except Exception as e:  # reported, and the next detector runs
        result.update(status='failed', error=f'{type(e).__name__}: {e}'[:2000])
    result['wall_s'] = round(time.monotonic() - started, 1)
    return result


def benchmark(device: str, out: str) -> dict:
    """``python -m benchmarks.run --quick`` (on the CPU its cheapest case: the benchmark's tests run the rest)."""
    command = [sys.executable, '-m', 'benchmarks.run', '--quick', '--device', device, '--out', out]
    if device == 'cpu':
        command += ['--models', 'resnet50', '--cases', '*-fwd']
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT)
    return dict(command=' '.join(command[1:]), status='ok' if done.returncode == 0 else 'failed',
                results=osp.join(out, 'results.md'), wall_s=round(time.monotonic() - started, 1))


def write_report(out: str, report: dict) -> None:
    with open(osp.join(out, 'gpu_check.json'), 'w') as f:
        json.dump(report, f, indent=1)
    env = report['environment']
    lines = [
        '# GPU check', '',
        f'`{report["command"]}` on {env["date"]}, commit `{env["commit"]}`.', '',
        f'Device: {env.get("gpu", "CPU")}' + (f', driver {env["driver"]}' if env.get('driver') else '')
        + f'; torch {env["torch"]} (CUDA {env["cuda"]}), mmcv ops CUDA {env["mmcv_cuda"]}, Python {env["python"]}.',
        '', f'CUDA tests (`tests/test_cuda.py`): {report["cuda_tests"]["status"]}, '
        + ', '.join(f'{v} {k}' for k, v in report['cuda_tests'].items() if k in ('tests', 'failures', 'errors',
                                                                                 'skipped')) + '.', '',
        f'Detectors: {STEPS[env["device"]]} training iterations on synthetic COCO images at the config\'s input size '
        '(median wall time of the steps after the first two), then one prediction of a val image; peak GPU memory '
        'of the training steps (`torch.cuda.max_memory_allocated`).', '',
        '| config | batch | AMP | checkpointing | step (s) | peak (GiB) | prediction (s) | status |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for d in report['detectors']:
        lines.append(f'| {d["config"]} | {d["batch_size"]} | {d["amp"]} | {d["with_cp"]} | {d.get("step_s", "")} | '
                     f'{d.get("train_peak_gib", "")} | {d.get("predict_s", "")} | '
                     f'{d["status"]}{": " + d["error"][:200] if "error" in d else ""} |')
    bench = report['benchmark']
    results = osp.relpath(bench['results'], out)
    lines += ['', f'Benchmark: `{bench["command"]}`: {bench["status"]}, [results]({results}).',
              '', f'Total: {report["wall_s"]:.0f} s.']
    with open(osp.join(out, 'gpu_check.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cpu', action='store_true', help='run every step on the CPU at tiny sizes')
    parser.add_argument('--out', default=osp.join(ROOT, 'benchmarks', 'results', 'cuda', 'gpu-check'))
    args = parser.parse_args(argv)
    import torch
    device = 'cpu' if args.cpu else 'cuda'
    if device == 'cuda' and not torch.cuda.is_available():
        parser.error('no CUDA device visible (torch.cuda.is_available() is False); --cpu runs the steps on the CPU')
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    report = dict(command=' '.join(['python scripts/gpu_check.py', *(argv if argv is not None else sys.argv[1:])]),
                  environment=environment(device))
    print(f'GPU check on {report["environment"].get("gpu", "the CPU")}, commit {report["environment"]["commit"]}')
    report['cuda_tests'] = cuda_tests(args.out)
    with tempfile.TemporaryDirectory(prefix='gpu-check-') as scratch:
        sides = (96, 144) if device == 'cpu' else (800, 1333)
        data = synthetic_coco(osp.join(scratch, 'coco'), STEPS[device] * 2, sides)  # 1 (LESA) or 2 (LIT) a step
        report['detectors'] = []
        for config in DETECTORS:
            result = detector(config, device, data, osp.join(scratch, 'work', osp.basename(config)))
            print(f'{config}: {result["status"]}, step {result.get("step_s")} s, peak '
                  f'{result.get("train_peak_gib")} GiB, prediction {result.get("predict_s")} s', flush=True)
            report['detectors'].append(result)
    report['benchmark'] = benchmark(device, osp.join(args.out, 'bench'))
    report['wall_s'] = round(time.monotonic() - started, 1)
    write_report(args.out, report)
    steps = [report['cuda_tests'], *report['detectors'], report['benchmark']]
    failed = [s.get('config', 'step') for s in steps if s['status'] != 'ok']
    print(f'Wrote gpu_check.md and gpu_check.json to {args.out} in {report["wall_s"]:.0f} s'
          + (f'; failed: {", ".join(failed)}' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
