"""End to end on the CPU: detection/train.sh, detection/test.sh and tools/infer.py on the synthetic COCO dataset
(train, resume, COCO evaluation, test-dev json, the authors' checkpoint layout served over loopback, drawing,
torchrun with two processes, crafted checkpoints refused), and an overfit check that a wiring bug would fail."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from _helpers import DEMO_CONFIG, DETECTION, RETINA_LIT_TI, ROOT, SMALL, save_crafted, \
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


@pytest.fixture(scope='module')
def trained(coco, tmp_path_factory):
    """One epoch, then resumed for a second one: the work dir."""
    work = tmp_path_factory.mktemp('train')
    log = ok(run('train.sh', DEMO_CONFIG, 0, '--data-root', coco, '--work-dir', work, *QUICK,
                 'train_cfg.max_epochs=1', 'default_hooks.checkpoint.interval=1', 'default_hooks.logger.interval=1'))
    assert 'Epoch(train) [1][1/2]' in log and 'Epoch(train) [1][2/2]' in log and 'loss_mask' in log
    assert (work / 'epoch_1.pth').is_file()
    log = ok(run('train.sh', DEMO_CONFIG, '--data-root', coco, '--work-dir', work, '--resume', *QUICK,
                 'train_cfg.max_epochs=2', 'default_hooks.checkpoint.interval=1', 'default_hooks.logger.interval=1'))
    assert 'resumed epoch: 1' in log and 'Epoch(train) [2][2/2]' in log and 'Epoch(train) [1]' not in log
    assert (work / 'epoch_2.pth').is_file()
    return work


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
