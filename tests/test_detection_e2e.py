"""End to end on the CPU: detection/train.sh, detection/test.sh and tools/infer.py on the synthetic COCO dataset
(train, resume, COCO evaluation, test-dev json, the authors' checkpoint layout served over loopback, drawing,
torchrun with two processes, crafted checkpoints refused), and an overfit check that a wiring bug would fail."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from _helpers import DEMO_CONFIG, DETECTION, RETINA_LIT_TI, ROOT, SMALL, assert_same_tensors, save_crafted, \
    OpensAFile, upstream_detector

LIT_TI_DEPTHS = 'model.backbone.depths=({})'.format(','.join(map(str, SMALL['lit_ti']['depths'])))
# the demo config, smaller: one block per LIT-Ti stage, 128-pixel images, 2 per step, single-process data loading
QUICK = ['--input-size', '128', '--cfg-options', LIT_TI_DEPTHS, 'train_dataloader.batch_size=2',
         'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
         'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False']

OVERFIT_STEPS = 40  # the demo's batch holds all 4 training images: one step an epoch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('hub_caches')]


def run(script, *args, timeout=600, **env_vars):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', **env_vars)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)  # checkpoints load safely without it
    result = subprocess.run(['bash', str(DETECTION / script), *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result


def ok(result):
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


# imported by the training process at start-up (as sitecustomize) to kill it as a machine failure would:
# KILL_AFTER_ITERATIONS=N after its N-th training iteration, KILL_WRITING=NAME half way through writing a file whose
# name starts with NAME
KILL_SWITCH = """
import builtins, os, signal
from mmengine.runner.loops import EpochBasedTrainLoop

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if 'KILL_AFTER_ITERATIONS' in os.environ:
    run_iter = EpochBasedTrainLoop.run_iter
    def run_iter_then_die(loop, *args, **kwargs):
        run_iter(loop, *args, **kwargs)
        if loop.iter == int(os.environ['KILL_AFTER_ITERATIONS']):
            die()
    EpochBasedTrainLoop.run_iter = run_iter_then_die

if 'KILL_WRITING' in os.environ:
    real_open = builtins.open
    class HalfWritten:
        def __init__(self, file):
            self.file = file
        def write(self, data):
            self.file.write(data[:len(data) // 2])
            self.file.flush()
            die()
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.file.__exit__(*exc)
    def open_to_die(file, mode='r', *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        if 'w' in mode and os.path.basename(str(file)).startswith(os.environ['KILL_WRITING']):
            return HalfWritten(opened)
        return opened
    builtins.open = open_to_die
"""


def killable(tmp_path) -> dict:
    """``run`` keywords that load :data:`KILL_SWITCH` into the training process."""
    (tmp_path / 'kill_switch').mkdir()
    (tmp_path / 'kill_switch' / 'sitecustomize.py').write_text(KILL_SWITCH)
    return dict(PYTHONPATH=str(tmp_path / 'kill_switch'))


TWO_EPOCHS = ['train_cfg.max_epochs=2', 'default_hooks.checkpoint.interval=1', 'default_hooks.logger.interval=1']


@pytest.fixture(scope='module')
def trained(coco, tmp_path_factory):
    """Two epochs, the first run killed (SIGKILL) in the middle of the second, then resumed: the work dir."""
    work = tmp_path_factory.mktemp('train')
    killed = run('train.sh', DEMO_CONFIG, 0, '--data-root', coco, '--work-dir', work, *QUICK, *TWO_EPOCHS,
                 KILL_AFTER_ITERATIONS='3', **killable(work))
    assert killed.returncode == -9, killed.stderr[-3000:]
    log = killed.stdout + killed.stderr
    assert 'Epoch(train) [1][1/2]' in log and 'Epoch(train) [2][1/2]' in log and 'loss_mask' in log
    assert 'Epoch(train) [2][2/2]' not in log and (work / 'epoch_1.pth').is_file()
    log = ok(run('train.sh', DEMO_CONFIG, '--data-root', coco, '--work-dir', work, '--resume', *QUICK, *TWO_EPOCHS))
    assert 'resumed epoch: 1' in log and 'Epoch(train) [2][2/2]' in log and 'Epoch(train) [1]' not in log
    assert (work / 'epoch_2.pth').is_file()
    return work


def test_a_run_resumed_after_a_kill_ends_with_the_weights_of_an_uninterrupted_run(coco, trained, tmp_path):
    from mmengine.runner import CheckpointLoader
    log = ok(run('train.sh', DEMO_CONFIG, 0, '--data-root', coco, '--work-dir', tmp_path, *QUICK, *TWO_EPOCHS))
    assert re.search(r'Training time on this machine: 4 iterations at \d+\.\d\d s \(the mean of the first 4 of '
                     r'this run\), about 0 min \d\d s in all; 0 min 00 s left', log), log[-3000:]
    uninterrupted, resumed = (CheckpointLoader.load_checkpoint(str(work / 'epoch_2.pth'), map_location='cpu')
                              for work in (tmp_path, trained))
    assert_same_tensors(resumed['state_dict'], uninterrupted['state_dict'], same_keys=True)
    assert_same_tensors(resumed['optimizer']['state'][0], uninterrupted['optimizer']['state'][0])


def test_a_run_killed_while_it_saves_leaves_only_whole_checkpoints(coco, trained, tmp_path):
    from mmengine.runner import CheckpointLoader
    shutil.copy(trained / 'epoch_1.pth', tmp_path)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    killed = run('train.sh', DEMO_CONFIG, 0, '--data-root', coco, '--work-dir', tmp_path, '--resume', *QUICK,
                 *TWO_EPOCHS, KILL_WRITING='epoch_2.pth', **killable(tmp_path))
    assert killed.returncode == -9 and 'Epoch(train) [2][2/2]' in killed.stdout + killed.stderr, killed.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['epoch_1.pth']  # nothing half written under a name
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_1.pth')
    assert CheckpointLoader.load_checkpoint(str(tmp_path / 'epoch_1.pth'), map_location='cpu')['meta']['epoch'] == 1
    # what resuming from there gives: the trained fixture


def test_the_next_save_removes_what_a_killed_save_left(tmp_path):
    from mmengine.fileio import get_file_backend

    import lesa_lit_det  # noqa: F401  (makes the atomic backend mmengine's)
    left = tmp_path / 'epoch_2.pth.4242.partial'  # a writer killed before its rename
    left.write_bytes(b'half')
    get_file_backend(str(tmp_path / 'epoch_2.pth')).put(b'whole', str(tmp_path / 'epoch_2.pth'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_2.pth']
    assert (tmp_path / 'epoch_2.pth').read_bytes() == b'whole'


def test_our_checkpoints_hold_mmengine_objects_that_the_safe_loader_reads(trained, monkeypatch):
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import CheckpointLoader
    with pytest.raises(pickle.UnpicklingError, match='weights_only'):  # torch alone refuses them
        torch.load(trained / 'epoch_2.pth', weights_only=True)
    checkpoint = CheckpointLoader.load_checkpoint(str(trained / 'epoch_2.pth'), map_location='cpu')
    assert checkpoint['meta']['epoch'] == 2 and checkpoint['optimizer']['state']
    assert any(isinstance(v, HistoryBuffer) for v in checkpoint['message_hub']['log_scalars'].values())


def authors_layout(checkpoint_path, out):
    """Our trained checkpoint in the layout of the authors' mmdet 2.x releases (numpy ``meta``)."""
    from mmdet.evaluation import get_classes
    from mmengine.runner import CheckpointLoader
    state_dict = CheckpointLoader.load_checkpoint(str(checkpoint_path), map_location='cpu')['state_dict']
    meta = dict(mmdet_version='2.11.0', CLASSES=np.array(get_classes('coco')), epoch=12)
    torch.save({'meta': meta, 'state_dict': upstream_detector(state_dict, 'lit_ti', 'backbone.')}, out)
    return out


def test_test_sh_evaluates_bbox_and_segm_and_writes_result_jsons(coco, trained, tmp_path):
    log = ok(run('test.sh', DEMO_CONFIG, trained / 'epoch_2.pth', 0, '--data-root', coco, '--work-dir', tmp_path,
                 '--out-prefix', tmp_path / 'val', *QUICK, 'model.test_cfg.rcnn.score_thr=0.0'))
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]' in log
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert {'coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50'} <= set(metrics)
    detections = json.loads((tmp_path / 'val.bbox.json').read_text())
    assert detections and {d['image_id'] for d in detections} <= {1 + 4, 2 + 4}  # the val images
    assert json.loads((tmp_path / 'val.segm.json').read_text())

    png = tmp_path / 'predictions.png'
    ok(subprocess.run([sys.executable, str(DETECTION / 'tools' / 'draw_predictions.py'),
                       str(coco / 'annotations' / 'instances_val2017.json'), str(coco / 'val2017'),
                       str(tmp_path / 'val'), str(png), '--score-thr', '0'], capture_output=True, text=True))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_test_sh_writes_the_test_dev_json(coco, trained, tmp_path):
    ok(run('test.sh', DEMO_CONFIG, trained / 'epoch_2.pth', 0, '--data-root', coco, '--work-dir', tmp_path,
           '--test-dev', '--out-prefix', tmp_path / 'dev', *QUICK, 'model.test_cfg.rcnn.score_thr=0.0'))
    images = json.loads((coco / 'annotations' / 'image_info_test-dev2017.json').read_text())['images']
    for kind in ('bbox', 'segm'):
        results = json.loads((tmp_path / f'dev.{kind}.json').read_text())
        assert {r['image_id'] for r in results} == {i['id'] for i in images}
    assert not (tmp_path / 'metrics.json').exists() or 'coco/bbox_mAP' not in (tmp_path / 'metrics.json').read_text()


def test_test_sh_evaluates_the_authors_layout_served_over_loopback(coco, trained, tmp_path, release_server):
    authors_layout(trained / 'epoch_2.pth', release_server.root / 'mask_rcnn_lit_ti.pth')
    args = ['--data-root', coco, *QUICK, 'model.test_cfg.rcnn.score_thr=0.0']
    url = release_server.url('/mask_rcnn_lit_ti.pth')
    ok(run('test.sh', DEMO_CONFIG, url, 0, '--work-dir', tmp_path / 'authors', *args))
    ok(run('test.sh', DEMO_CONFIG, trained / 'epoch_2.pth', 0, '--work-dir', tmp_path / 'ours', *args))
    authors = json.loads((tmp_path / 'authors' / 'metrics.json').read_text())
    assert authors == json.loads((tmp_path / 'ours' / 'metrics.json').read_text())  # the same weights
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= set(authors) and release_server.requests == ['/mask_rcnn_lit_ti.pth']


def test_infer_tool_draws_and_writes_predictions(coco, trained, tmp_path, release_server):
    authors_layout(trained / 'epoch_2.pth', release_server.root / 'mask_rcnn_lit_ti.pth')
    out, url = tmp_path / 'out', release_server.url('/mask_rcnn_lit_ti.pth')
    result = subprocess.run(
        [sys.executable, str(DETECTION / 'tools' / 'infer.py'), str(DEMO_CONFIG), url,
         str(coco / 'val2017'), '--out-dir', str(out), '--score-thr', '0', '--device', 'cpu', '--cfg-options',
         LIT_TI_DEPTHS, 'model.test_cfg.rcnn.score_thr=0.0'],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    ok(result)
    images = sorted(p.name for p in (coco / 'val2017').iterdir())
    assert sorted(p.name for p in (out / 'vis').iterdir()) == images
    for image in images:
        prediction = json.loads((out / 'preds' / image.replace('.jpg', '.json')).read_text())
        assert prediction['labels'] and len(prediction['labels']) == len(prediction['scores'])
        assert len(prediction['bboxes'][0]) == 4 and prediction['masks']


def infer(checkpoint, source, out_dir):
    return subprocess.run(
        [sys.executable, str(DETECTION / 'tools' / 'infer.py'), str(DEMO_CONFIG), str(checkpoint), str(source),
         '--out-dir', str(out_dir), '--device', 'cpu', '--cfg-options', LIT_TI_DEPTHS],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_infer_tool_skips_the_files_that_are_not_readable_images(coco, trained, tmp_path):
    images = tmp_path / 'images'
    shutil.copytree(coco / 'val2017', images)
    readable = sorted(p.name for p in images.iterdir())
    jpeg = (images / readable[0]).read_bytes()
    bad = {'empty.jpg': (b'', 'empty file'), 'truncated.jpg': (jpeg[:len(jpeg) // 2], 'damaged or truncated image'),
           'text.jpg': (b'not an image', 'not an image'), 'notes.txt': (b'a stray file', 'not an image file name')}
    for name, (content, _) in bad.items():
        (images / name).write_bytes(content)
    log = ok(infer(trained / 'epoch_2.pth', images, tmp_path / 'out'))
    for name, (_, reason) in bad.items():
        assert f'skipped {images / name}: {reason}' in log and f'  {images / name}: {reason}' in log
    assert f'Skipped {len(bad)} file(s)' in log and f'{len(readable)} image(s): predictions drawn' in log
    assert sorted(p.name for p in (tmp_path / 'out' / 'vis').iterdir()) == readable

    nothing = infer(trained / 'epoch_2.pth', images / 'truncated.jpg', tmp_path / 'none')
    assert nothing.returncode == 1 and 'none of the inputs is a readable image' in nothing.stderr
    assert 'Traceback' not in nothing.stderr


def test_test_sh_names_the_images_its_annotation_lists_that_are_missing(coco, trained, tmp_path):
    data = tmp_path / 'coco'
    shutil.copytree(coco, data)
    missing = sorted((data / 'val2017').iterdir())[0]
    missing.unlink()
    result = run('test.sh', DEMO_CONFIG, trained / 'epoch_2.pth', 0, '--data-root', data, '--work-dir',
                 tmp_path / 'work', *QUICK)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    annotations = data / 'annotations' / 'instances_val2017.json'
    assert f'error: 1 of the 2 images that {annotations} lists are missing: {missing}. Put' in result.stderr


def test_crafted_checkpoints_are_refused_by_the_scripts(coco, trained, tmp_path):
    """test.sh, train.sh --resume and infer.py stop with an error naming the call; the file is never created."""
    from mmengine.runner import CheckpointLoader
    marker = tmp_path / 'created_by_the_checkpoint'
    crafted = save_crafted(tmp_path / 'crafted.pth', marker, OpensAFile, CheckpointLoader.load_checkpoint(
        str(trained / 'epoch_2.pth'), map_location='cpu')['state_dict'])
    results = [
        run('test.sh', DEMO_CONFIG, crafted, 0, '--data-root', coco, '--work-dir', tmp_path / 'test', *QUICK),
        run('train.sh', DEMO_CONFIG, 0, '--data-root', coco, '--work-dir', tmp_path / 'train', '--resume', crafted,
            *QUICK),
        subprocess.run([sys.executable, str(DETECTION / 'tools' / 'infer.py'), str(DEMO_CONFIG), str(crafted),
                        str(coco / 'val2017'), '--out-dir', str(tmp_path / 'infer')], cwd=ROOT, capture_output=True,
                       text=True),
    ]
    for result in results:
        assert result.returncode != 0 and 'io.open' in result.stderr, result.stderr[-3000:]
        assert 'Traceback' not in result.stderr
    assert not marker.exists()


def test_test_sh_refuses_a_checkpoint_of_another_model(coco, trained, tmp_path):
    result = run('test.sh', RETINA_LIT_TI, trained / 'epoch_2.pth', 0, '--data-root', coco, '--work-dir', tmp_path)
    assert result.returncode != 0 and 'does not fit the model of this config' in result.stderr
    assert 'Traceback' not in result.stderr


def test_train_sh_runs_two_processes_with_torchrun(coco, tmp_path):
    log = ok(run('train.sh', DEMO_CONFIG, 2, '--data-root', coco, '--work-dir', tmp_path, *QUICK,
                 'train_cfg.max_epochs=1', 'default_hooks.checkpoint.interval=1', PORT='29512'))
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert 'Epoch(train) [1][1/1]' in log  # 4 images, 2 per process and step
    assert (tmp_path / 'epoch_1.pth').is_file()


def test_overfit_a_few_images_to_high_box_ap(coco, tmp_path):
    """The demo's LIT-Ti Mask R-CNN (128-channel neck and heads), one block a stage, trained from scratch on the 4
    training images: their box and mask AP must climb far above chance (0).

    Wrong feature order, strides, channel counts or a backbone that does not learn keep AP near zero.
    """
    from mmengine.logging import MMLogger
    from mmengine.runner import Runner

    from lesa_lit_det.engine import adapt_to_device, load_config
    torch.manual_seed(0)
    options = {
        'model.backbone.depths': SMALL['lit_ti']['depths'],
        'param_scheduler': [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=10)],
        'train_cfg.max_epochs': OVERFIT_STEPS, 'train_cfg.val_interval': OVERFIT_STEPS,
        'test_dataloader.dataset.ann_file': 'annotations/instances_train2017.json',
        'test_dataloader.dataset.data_prefix.img': 'train2017/',
        'default_hooks.checkpoint': None, 'default_hooks.logger.interval': 10, 'work_dir': str(tmp_path),
    }
    cfg = load_config(str(DEMO_CONFIG), options, data_root=str(coco), input_size=128)
    cfg.train_dataloader.dataset.pipeline = [t for t in cfg.train_dataloader.dataset.pipeline
                                             if t['type'] != 'RandomFlip']
    adapt_to_device(cfg)
    runner = Runner.from_cfg(cfg)
    MMLogger.get_current_instance().setLevel('WARNING')
    runner.train()
    metrics = runner.test()
    assert metrics['coco/bbox_mAP'] > 0.3 and metrics['coco/segm_mAP'] > 0.3, metrics
