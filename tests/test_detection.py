"""mmdetection 3.x integration: the backbone adapter, every config, one train and predict step per paper detector,
the synthetic dataset, the COCO-checkpoint converter and the errors for missing data and wrong checkpoints.

Everything runs on the CPU at reduced input sizes; the end-to-end runs through train.sh / test.sh are in
test_detection_e2e.py.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lesa_lit_det  # noqa: F401  (registers TimmBackbone)
import lesa_lit_models  # noqa: F401  (registers the timm models)
from lesa_lit_det.convert import convert_coco_checkpoint, load_detector_checkpoint
from lesa_lit_det.engine import DatasetNotFoundError, adapt_to_device, check_dataset_paths, load_config
from lesa_lit_det.synthetic import COCO_CATEGORIES, DatasetExistsError, SHAPE_CATEGORIES, SyntheticCocoSpec, \
    make_synthetic_coco
from lesa_lit_models import CheckpointError
from mmdet.registry import DATASETS, MODELS
from mmdet.utils import register_all_modules
from mmengine.dataset import pseudo_collate

from _helpers import COCO_SPEC, DETECTION, HTC_LESA, HTC_LESA_NO_SEM, MASK_RCNN_LESA, MASK_RCNN_LIT_S, \
    MASK_RCNN_LIT_TI, RETINA_LIT_S, RETINA_LIT_TI, DETECTION_SIZE, build, make_backbone, pretrained, reduced_depth, \
    small_config, upstream_detector

register_all_modules()

CONFIGS = sorted(p for p in (DETECTION / 'configs').rglob('*.py') if '_base_' not in p.parts)  # not the fragments

# The papers' recipes: optimizer, lr, weight decay, images per GPU, epochs, AMP, box AP (mask AP) in the header.
RECIPES = {
    MASK_RCNN_LESA: ('SGD', 0.01, 1e-4, 1, 20, False, ['44.0', '39.2']),
    HTC_LESA: ('SGD', 0.005, 1e-4, 1, 20, False, ['50.1', '43.9', '50.5', '44.4']),
    HTC_LESA_NO_SEM: ('SGD', 0.005, 1e-4, 1, 20, False, []),
    RETINA_LIT_TI: ('AdamW', 1e-4, 1e-4, 2, 12, False, ['41.6']),
    RETINA_LIT_S: ('AdamW', 1e-4, 1e-4, 2, 12, True, ['41.6']),
    MASK_RCNN_LIT_TI: ('AdamW', 2e-4, 1e-4, 2, 12, False, ['42.0', '39.1']),
    MASK_RCNN_LIT_S: ('AdamW', 2e-4, 1e-4, 2, 12, True, ['42.9', '39.6']),
}
PAPER_CONFIGS = list(RECIPES)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared CPU, OpenMP threads waiting for busy cores make steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(cfg, split, indices):
    dataset = DATASETS.build(cfg[f'{split}_dataloader'].dataset)
    return pseudo_collate([dataset[i] for i in indices])


# ----------------------------------------------------------------------------------------------------------------
# synthetic dataset


def test_synthetic_dataset_is_coco_and_deterministic(tmp_path, coco):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    again = tmp_path / 'again'
    make_synthetic_coco(str(again), SyntheticCocoSpec(**COCO_SPEC))
    files = sorted(p.relative_to(coco) for p in coco.rglob('*') if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob('*') if p.is_file())
    assert all((coco / f).read_bytes() == (again / f).read_bytes() for f in files)

    api = COCO(str(coco / 'annotations' / 'instances_train2017.json'))
    assert len(api.getCatIds()) == 80 and api.loadCats(api.getCatIds(catNms=['kite']))[0]['id'] == 38
    shape_ids = {COCO_CATEGORIES[name] for name in SHAPE_CATEGORIES.values()}
    assert {ann['category_id'] for ann in api.loadAnns(api.getAnnIds())} == shape_ids
    assert len(api.getImgIds()) == 4 and api.getAnnIds()
    for ann in api.loadAnns(api.getAnnIds()):
        info = api.loadImgs(ann['image_id'])[0]
        rle = mask_utils.frPyObjects(ann['segmentation'], info['height'], info['width'])
        assert mask_utils.area(mask_utils.merge(rle)) == pytest.approx(ann['area'], rel=0.1)
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= info['width'] and y + h <= info['height'] and w > 1 and h > 1
        stuff = np.array(__import__('PIL.Image', fromlist=['Image']).open(
            coco / 'stuffthingmaps' / 'train2017' / info['file_name'].replace('.jpg', '.png')))
        assert ann['category_id'] - 1 in np.unique(stuff)
    test_dev = json.loads((coco / 'annotations' / 'image_info_test-dev2017.json').read_text())
    assert 'annotations' not in test_dev and len(test_dev['images']) == 2


def test_synthetic_validation_images_do_not_depend_on_the_number_of_training_images(tmp_path):
    """A split is drawn from its own stream: more training images leave the validation images (pixels and
    annotations) as they were, so trials with different training sets are scored on the same images."""
    roots = []
    for num_train in (1, 3):
        roots.append(tmp_path / f'train{num_train}')
        make_synthetic_coco(str(roots[-1]), SyntheticCocoSpec(num_train=num_train, num_val=2, num_test=0, min_side=64,
                                                              max_side=96, stuff_maps=False))
    images = [sorted((root / 'val2017').iterdir()) for root in roots]
    assert [p.read_bytes() for p in images[0]] == [p.read_bytes() for p in images[1]]
    annotations = [json.loads((root / 'annotations' / 'instances_val2017.json').read_text()) for root in roots]
    assert [(a['segmentation'], a['category_id']) for a in annotations[0]['annotations']] == [
        (a['segmentation'], a['category_id']) for a in annotations[1]['annotations']]
    train = [sorted((root / 'train2017').iterdir())[0].read_bytes() for root in roots]
    assert train[0] == train[1]


def test_synthetic_dataset_loads_in_mmdet_with_masks_and_stuff_maps(coco):
    cfg = small_config(HTC_LESA, coco)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    sample = dataset[0]
    gt = sample['data_samples'].gt_instances
    assert len(dataset) == 4 and len(gt) > 0
    classes = dataset.metainfo['classes']
    assert dataset.cat_ids == list(COCO_CATEGORIES.values())  # the labels of real COCO
    assert {classes[label] for label in gt.labels.tolist()} <= set(SHAPE_CATEGORIES.values())
    assert gt.masks.masks.shape[1:] == sample['inputs'].shape[1:]
    assert sample['data_samples'].gt_sem_seg.sem_seg.shape[1:] == sample['inputs'].shape[1:]


def test_synthetic_generator_never_overwrites_foreign_folders(tmp_path, coco):
    foreign = tmp_path / 'mine'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('keep me')
    with pytest.raises(DatasetExistsError, match='not a synthetic dataset'):
        make_synthetic_coco(str(foreign), overwrite=True)
    assert (foreign / 'notes.txt').read_text() == 'keep me'

    spec = SyntheticCocoSpec(num_train=2, num_val=1, num_test=0, min_side=64, max_side=64)
    make_synthetic_coco(str(tmp_path / 'ours'), spec)
    assert make_synthetic_coco(str(tmp_path / 'ours'), spec)['reused']
    other = SyntheticCocoSpec(num_train=3, num_val=1, num_test=0, min_side=64, max_side=64)
    with pytest.raises(DatasetExistsError, match='--overwrite'):
        make_synthetic_coco(str(tmp_path / 'ours'), other)
    summary = make_synthetic_coco(str(tmp_path / 'ours'), other, overwrite=True)
    assert summary['instances_train2017.json']['images'] == 3


def test_synthetic_generator_shows_progress(tmp_path, capsys):
    make_synthetic_coco(str(tmp_path / 'coco'), SyntheticCocoSpec(num_train=3, num_val=2, num_test=0, min_side=64,
                                                                    max_side=64), progress=True)
    out = capsys.readouterr().out
    assert '5/5' in out and out.endswith('\n')


# ----------------------------------------------------------------------------------------------------------------
# drawing the predictions


def _predictions_from_truth(ann_file, score):
    """The ground truth of ``ann_file`` as CocoMetric would write it (bbox and segm jsons, compressed RLE)."""
    from pycocotools import mask as mask_utils
    dataset = json.loads(Path(ann_file).read_text())
    sizes = {i['id']: (i['height'], i['width']) for i in dataset['images']}
    boxes, masks = [], []
    for ann in dataset['annotations']:
        rle = mask_utils.merge(mask_utils.frPyObjects(ann['segmentation'], *sizes[ann['image_id']]))
        rle['counts'] = rle['counts'].decode()
        common = dict(image_id=ann['image_id'], category_id=ann['category_id'], score=score)
        boxes.append(dict(common, bbox=ann['bbox']))
        masks.append(dict(common, bbox=ann['bbox'], segmentation=rle))
    return boxes, masks


def test_draw_predictions_shows_prediction_and_truth_side_by_side_with_a_legend(tmp_path, coco):
    from PIL import Image

    from lesa_lit_det.visualize import _CAPTION, _GAP, _PALETTE, draw_predictions
    ann_file, tile = coco / 'annotations' / 'instances_val2017.json', 64
    boxes, masks = _predictions_from_truth(ann_file, score=0.8)
    (tmp_path / 'r.bbox.json').write_text(json.dumps(boxes))
    (tmp_path / 'r.segm.json').write_text(json.dumps(masks))
    sheets = {}
    for thr in (0.5, 0.9):
        out = draw_predictions(str(ann_file), str(coco / 'val2017'), str(tmp_path / 'r'), str(tmp_path / f'{thr}.png'),
                               score_thr=thr, pairs_per_row=1, tile=tile, metrics={'coco/bbox_mAP': 0.5})
        sheets[thr] = np.asarray(Image.open(out).convert('RGB'))
    shown, hidden = sheets[0.5], sheets[0.9]
    assert shown.shape == hidden.shape and shown.shape[1] == 2 * tile + 5 * _GAP
    header = shown.shape[0] - 2 * (tile + _CAPTION + 2 * _GAP)  # two validation images, one pair per row
    shown_classes = sorted({a['category_id'] for a in json.loads(ann_file.read_text())['annotations']})
    for color in _PALETTE[:len(shown_classes)]:  # the legend's swatches
        assert (shown[:header] == color).all(-1).sum() > 20
    for row in range(2):
        top = header + row * (tile + _CAPTION + 2 * _GAP) + _CAPTION
        prediction = np.s_[top:top + tile, 2 * _GAP:2 * _GAP + tile]
        truth = np.s_[top:top + tile, 3 * _GAP + tile:3 * _GAP + 2 * tile]
        assert (shown[truth] == hidden[truth]).all()  # the ground truth does not depend on the threshold
        assert (shown[prediction] != hidden[prediction]).any()  # predictions above the threshold are drawn
        # every score below the threshold: the image alone, scaled to fit the tile
        image = Image.open(coco / 'val2017' / json.loads(ann_file.read_text())['images'][row]['file_name'])
        scale = min(tile / image.width, tile / image.height)
        width, height = round(image.width * scale), round(image.height * scale)
        assert (hidden[prediction][:height, :width] == np.asarray(image.resize((width, height), Image.BILINEAR))).all()


def test_draw_predictions_draws_one_class_per_object_unless_asked_for_all(tmp_path, coco):
    from PIL import Image

    from lesa_lit_det.visualize import draw_predictions
    ann_file = coco / 'annotations' / 'instances_val2017.json'
    boxes, masks = _predictions_from_truth(ann_file, score=0.8)
    classes = [c['id'] for c in json.loads(ann_file.read_text())['categories']]

    def other_class(result):  # the same object, a lower score, another class (a per-class NMS keeps both)
        x, y, w, h = result['bbox']
        other = next(c for c in classes if c != result['category_id'])
        return dict(result, category_id=other, score=0.5, bbox=[x + 1, y, w, h])

    def sheet(name, results, **kwargs):
        prefix = tmp_path / name
        (tmp_path / f'{name}.bbox.json').write_text(json.dumps(results[0]))
        (tmp_path / f'{name}.segm.json').write_text(json.dumps(results[1]))
        out = draw_predictions(str(ann_file), str(coco / 'val2017'), str(prefix), str(tmp_path / f'{name}.png'),
                               pairs_per_row=1, tile=64, **kwargs)
        return np.asarray(Image.open(out).convert('RGB'))

    doubled = (boxes + [other_class(b) for b in boxes], masks + [other_class(m) for m in masks])
    once, top_of_doubled = sheet('once', (boxes, masks)), sheet('doubled', doubled)
    every = sheet('every', doubled, overlap_thr=None)
    assert (once == top_of_doubled).all()  # the lower-scored box of another class is not drawn
    assert once.shape == every.shape and (every != top_of_doubled).any()


def test_metrics_table_lists_box_and_mask_ap():
    from lesa_lit_det.visualize import metrics_table
    metrics = {f'coco/{kind}_{c}': v for kind, v in (('bbox', 0.5), ('segm', 0.25))
               for c in ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')}
    lines = metrics_table(metrics).splitlines()
    assert lines[0].split() == ['AP', 'AP_50', 'AP_75', 'AP_s', 'AP_m', 'AP_l']
    assert lines[1].split() == ['box'] + ['0.500'] * 6 and lines[2].split() == ['mask'] + ['0.250'] * 6
    with pytest.raises(ValueError, match='no coco/bbox_mAP'):
        metrics_table({'loss': 1.0})


# ----------------------------------------------------------------------------------------------------------------
# configs


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f'network access: {args}')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_builds_with_no_weights_and_neck_matching_backbone(path, no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the LESA configs' ImageNet files are not there
    cfg = load_config(str(path))
    assert cfg.custom_imports.imports == ['lesa_lit_models', 'lesa_lit_det']
    with torch.device('meta'):  # only channels and strides are read
        model = MODELS.build(cfg.model)
    assert list(cfg.model.neck.in_channels) == model.backbone.body.feature_info.channels()
    assert model.backbone.body.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize('path', PAPER_CONFIGS, ids=lambda p: p.name)
def test_config_follows_the_paper_recipe(path):
    optimizer, lr, weight_decay, images_per_gpu, epochs, amp, paper_numbers = RECIPES[path]
    cfg = load_config(str(path))
    assert cfg.optim_wrapper.optimizer.type == optimizer
    assert cfg.optim_wrapper.optimizer.lr == lr and cfg.optim_wrapper.optimizer.weight_decay == weight_decay
    assert cfg.optim_wrapper.get('type', 'OptimWrapper') == ('AmpOptimWrapper' if amp else 'OptimWrapper')
    assert cfg.train_dataloader.batch_size == images_per_gpu and cfg.train_cfg.max_epochs == epochs
    header = ''.join(line for line in path.read_text().splitlines(True) if line.startswith('#'))
    assert all(number in header for number in paper_numbers)
    backbone = cfg.model.backbone
    name = backbone.model_name.replace('_det', '')
    if 'lesa' in name:  # the authors' detection pretrain, where their README puts it
        file = f'checkpoints/lesa_pretrained_imagenet/{name}_pretrained/{name}/checkpoint.pth'
        assert backbone.init_cfg == dict(type='Pretrained', checkpoint=file, origin_url=backbone.init_cfg.origin_url)
        assert backbone.init_cfg.origin_url.startswith('https://livejohnshopkins-my.sharepoint.com/')
    else:  # the authors' ImageNet release; the header names their COCO release
        assert backbone.init_cfg == dict(
            type='Pretrained', checkpoint=f'https://github.com/ziplab/LIT/releases/download/v1.0/{name}.pth')
        detector = 'retina' if 'retinanet' in path.name else 'mask_rcnn'
        assert f'https://github.com/ziplab/LIT/releases/download/v2.0/{detector}_{name}.pth' in header
    if 'lesa' in backbone.model_name:
        side = backbone.img_size
        assert (backbone.frozen_stages, backbone.norm_eval, backbone.with_cp) == (1, True, True)
        for loader in ('train_dataloader', 'test_dataloader'):
            resize = [t for t in cfg[loader].dataset.pipeline if t.type == 'Resize']
            assert resize == [dict(type='Resize', scale=(side, side), keep_ratio=False)]
        assert cfg.param_scheduler[1].milestones == [16, 19]
    else:
        assert backbone.get('frozen_stages', -1) == -1 and not backbone.get('norm_eval', False)
        is_small = backbone.model_name == 'lit_s'
        assert bool(backbone.get('out_norms')) == is_small and backbone.get('with_cp', False) == is_small
        custom_keys = cfg.optim_wrapper.get('paramwise_cfg', {}).get('custom_keys', {})
        assert bool(custom_keys) == is_small
        assert cfg.param_scheduler[1].milestones == [8, 11]


def test_lit_s_paramwise_settings_reach_the_parameters():
    cfg = small_config(MASK_RCNN_LIT_S)
    adapt_to_device(cfg)
    from mmengine.optim import build_optim_wrapper
    model = build(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {id(p): group['weight_decay'] for group in optim_wrapper.optimizer.param_groups for p in group['params']}
    params = dict(model.named_parameters())
    assert decay[id(params['backbone.out_norms.1.weight'])] == 0
    table = next(n for n in params if n.endswith('relative_position_bias_table'))
    assert decay[id(params[table])] == 0
    assert decay[id(params['backbone.body.model.stages.2.blocks.0.attn.qkv.weight'])] == 1e-4


def test_amp_configs_train_in_fp32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = load_config(str(RETINA_LIT_S))
    adapt_to_device(cfg)
    assert cfg.optim_wrapper.type == 'OptimWrapper' and 'loss_scale' not in cfg.optim_wrapper
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = load_config(str(RETINA_LIT_S))
    adapt_to_device(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'


# ----------------------------------------------------------------------------------------------------------------
# one train step and one predict step per paper detector


@pytest.mark.parametrize('path', [
    MASK_RCNN_LESA, HTC_LESA, HTC_LESA_NO_SEM, RETINA_LIT_TI, RETINA_LIT_S, MASK_RCNN_LIT_TI, MASK_RCNN_LIT_S,
], ids=lambda p: p.name)
def test_paper_detector_train_and_predict_step(path, coco):
    torch.manual_seed(0)
    cfg = small_config(path, coco)
    model = build(cfg).train()
    data = model.data_preprocessor(batch(cfg, 'train', [0, 1]), True)
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    trainable = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), 'every trainable backbone weight learns'
    assert any(p.grad.abs().sum() > 0 for _, p in trainable)
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    assert bool(frozen) == (cfg.model.backbone.get('frozen_stages', -1) >= 0)

    model.eval()
    data = model.data_preprocessor(batch(cfg, 'test', [0]), False)
    with torch.no_grad():
        result = model(**data, mode='predict')[0]
    predictions = result.pred_instances
    assert predictions.bboxes.shape[1] == 4 and len(predictions.scores) == len(predictions.labels)
    if 'mask' in path.name or 'htc' in path.name:
        assert predictions.masks.shape[1:] == tuple(result.ori_shape)


# ----------------------------------------------------------------------------------------------------------------
# the adapter


@pytest.mark.parametrize('model_name, kwargs, frozen, trainable', [
    ('lesa_resnet50_det', dict(img_size=64, out_indices=(1, 2, 3, 4)), ['model.conv1', 'model.bn1', 'model.layer1'],
     ['model.layer2']),
    ('lit_ti', dict(out_indices=(0, 1, 2, 3)), ['model.patch_embed', 'model.stages.0'], ['model.stages.1']),
])
def test_frozen_stages_and_norm_eval_follow_mmdet(model_name, kwargs, frozen, trainable):
    backbone = make_backbone(model_name, frozen_stages=1, norm_eval=True, **kwargs).train()
    body = backbone.body
    for name in frozen:
        module = body.get_submodule(name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    for name in trainable:
        module = body.get_submodule(name)
        assert all(p.requires_grad for p in module.parameters())
        norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert norms and not any(m.training for m in norms)  # norm_eval
    stem_only = make_backbone(model_name, frozen_stages=0, **kwargs).train()
    assert not any(p.requires_grad for p in stem_only.body.get_submodule(frozen[0]).parameters())
    assert all(p.requires_grad for p in stem_only.body.get_submodule(frozen[-1]).parameters())
    unfrozen = make_backbone(model_name, **kwargs).train()
    assert all(p.requires_grad for p in unfrozen.parameters())
    assert all(m.training for m in unfrozen.modules())


def test_out_indices_pick_levels_and_shapes():
    backbone = make_backbone('resnet18', out_indices=(2, 4))
    features = backbone(torch.randn(1, 3, 64, 96))
    assert backbone.body.feature_info.channels() == [128, 512] and backbone.body.feature_info.reduction() == [8, 32]
    assert [f.shape for f in features] == [(1, 128, 8, 12), (1, 512, 2, 3)]


@pytest.mark.parametrize('model_name, kwargs', [
    ('lesa_resnet50_det', dict(img_size=64, out_indices=(1, 2, 3, 4))),
    ('lit_s', dict(out_norms=(1, 2, 3))),
    ('lit_ti', dict()),
])
@pytest.mark.parametrize('training', [False, True])
def test_an_empty_batch_gives_empty_features(model_name, kwargs, training):
    """Batch 0 in, batch 0 out (e.g. a data-parallel rank left without images), through the adapter's frozen
    stages and output norms, with finite zero gradients in training."""
    backbone = make_backbone(model_name, frozen_stages=1, **kwargs).train(training)
    image = torch.randn(0, 3, 64, 96, requires_grad=training)
    features = backbone(image)
    assert [tuple(f.shape) for f in features] == [
        (0, c, -(-64 // s), -(-96 // s))
        for c, s in zip(backbone.body.feature_info.channels(), backbone.body.feature_info.reduction())]
    if training:
        sum(f.sum() for f in features).backward()
        grads = [p.grad for p in backbone.parameters() if p.requires_grad]
        assert grads and all(g is not None and not g.any() for g in grads)


@pytest.mark.parametrize('model_name, kwargs, flagged', [
    ('lesa_resnet50_det', dict(img_size=64, out_indices=(1, 2, 3, 4)), 'Lesa'),
    ('lit_s', dict(), 'LITStage'),
    ('resnet18', dict(out_indices=(1, 2, 3, 4)), 'ResNet'),
])
def test_with_cp_uses_the_models_own_checkpointing(model_name, kwargs, flagged):
    torch.manual_seed(0)
    plain = make_backbone(model_name, **kwargs)
    checkpointed = make_backbone(model_name, with_cp=True, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    flags = {type(m).__name__ for m in checkpointed.modules() if getattr(m, 'grad_checkpointing', False) is True}
    assert flagged in flags
    x = torch.randn(2, 3, 64, 64)
    plain.eval(), checkpointed.eval()
    for a, b in zip(plain(x), checkpointed(x)):
        torch.testing.assert_close(a, b)
    checkpointed.train()
    sum(f.mean() for f in checkpointed(x)).backward()
    assert all(p.grad is not None for p in checkpointed.parameters() if p.requires_grad)


def test_weights_load_in_init_weights_only(tmp_path):
    with pytest.raises(ValueError, match='init_cfg=dict'):
        make_backbone('resnet18', pretrained=True)
    with pytest.raises(ValueError, match='Pretrained'):
        make_backbone('resnet18', init_cfg=dict(type='Kaiming'))
    source = make_backbone('lit_ti')
    path = tmp_path / 'lit_ti_coco.pth'
    backbone = make_backbone('lit_ti', init_cfg=pretrained(path))  # nothing read yet: the file does not exist
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}}, path)
    backbone.init_weights()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(backbone.state_dict()[k], v)
    path.unlink()
    backbone.init_weights()  # initialised once: mmengine calls it again only on a new model


def test_out_norms_load_from_the_authors_lit_s_coco_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = make_backbone('lit_s', out_norms=(1, 2, 3), img_size=800)
    with torch.no_grad():
        for norm in source.out_norms.values():
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    path = tmp_path / 'lit_s_coco.pth'
    meta = dict(mmdet_version='2.11.0', CLASSES=np.array(['person']))  # numpy in meta, as mmcv saves it
    torch.save({'meta': meta, 'state_dict': upstream_detector(source.state_dict(), 'lit_s')}, path)
    loaded = make_backbone('lit_s', out_norms=(1, 2, 3), img_size=800, init_cfg=pretrained(path))
    loaded.init_weights()
    assert loaded.body.model.stages[2].blocks[0].attn.relative_position_bias_table.shape[0] == 99 * 99
    for k, v in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    x = torch.randn(1, 3, 96, 128)
    source.eval(), loaded.eval()
    for a, b in zip(source(x), loaded(x)):
        torch.testing.assert_close(a, b)


def test_init_weights_from_a_file_of_another_backbone_or_none_is_a_clear_error(tmp_path):
    path = tmp_path / 'lit_ti.pth'
    torch.save(make_backbone('lit_ti').body.model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'lit_s'"):
        make_backbone('lit_s', init_cfg=pretrained(path)).init_weights()
    missing = tmp_path / 'missing.pth'
    with pytest.raises(CheckpointError, match='not found'):
        make_backbone('lit_ti', init_cfg=pretrained(missing)).init_weights()
    with pytest.raises(CheckpointError, match=re.escape(f"'{missing}'") + '.*Download it from https://example.org/x'):
        make_backbone('lit_ti', init_cfg=pretrained(missing, origin_url='https://example.org/x')).init_weights()
    adapter_file = tmp_path / 'adapter.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in make_backbone('lit_ti').state_dict().items()}},
               adapter_file)
    with pytest.raises(CheckpointError, match='another backbone'):
        make_backbone('resnet18', init_cfg=pretrained(adapter_file)).init_weights()


def test_lesa_config_without_its_imagenet_file_names_the_link_and_the_path(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(MASK_RCNN_LESA), {'model.backbone.img_size': 64})
    model = MODELS.build(cfg.model)
    with pytest.raises(CheckpointError) as error:
        model.init_weights()
    assert cfg.model.backbone.init_cfg.checkpoint in str(error.value)
    assert cfg.model.backbone.init_cfg.origin_url in str(error.value)


def test_init_weights_from_the_hub(offline_hub):
    import timm
    reference = timm.create_model('lit_ti')
    with pytest.raises(CheckpointError, match='Hugging Face Hub'):
        make_backbone('lit_ti', init_cfg=pretrained('hf-hub:someone/missing')).init_weights()
    offline_hub('someone/lit_ti_finetuned', reference.state_dict())
    backbone = make_backbone('lit_ti', init_cfg=pretrained('hf-hub:someone/lit_ti_finetuned'))
    backbone.init_weights()
    torch.testing.assert_close(backbone.body.model.stages[2].blocks[0].attn.qkv.weight,
                               reference.stages[2].blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------------------------------------------
# errors for missing data and wrong checkpoints


def test_missing_dataset_paths_are_listed_with_the_fix(tmp_path, coco):
    cfg = load_config(str(MASK_RCNN_LIT_TI), data_root=str(tmp_path / 'nowhere'))
    with pytest.raises(DatasetNotFoundError) as error:
        check_dataset_paths(cfg, ['train_dataloader', 'val_dataloader'])
    message = str(error.value)
    assert str(tmp_path / 'nowhere' / 'annotations' / 'instances_train2017.json') in message
    assert 'val2017' in message and '--data-root' in message

    no_stuff = tmp_path / 'no_stuff'
    make_synthetic_coco(str(no_stuff), SyntheticCocoSpec(num_train=1, num_val=1, num_test=0, stuff_maps=False))
    check_dataset_paths(load_config(str(HTC_LESA_NO_SEM), data_root=str(no_stuff)), ['train_dataloader'])
    with pytest.raises(DatasetNotFoundError, match='htc-without-semantic'):
        check_dataset_paths(load_config(str(HTC_LESA), data_root=str(no_stuff)), ['train_dataloader'])

    result = subprocess.run(
        [sys.executable, str(DETECTION / 'tools' / 'train.py'), str(MASK_RCNN_LIT_TI), '--data-root',
         str(tmp_path / 'nowhere'), '--work-dir', str(tmp_path / 'work')], capture_output=True, text=True)
    assert result.returncode != 0 and 'Dataset files not found' in result.stderr
    assert 'Traceback' not in result.stderr


def test_detector_checkpoint_loading_is_strict_with_clear_errors(tmp_path):
    cfg = small_config(MASK_RCNN_LESA)
    model = build(cfg)
    state_dict = model.state_dict()
    good = tmp_path / 'good.pth'
    torch.save({'meta': {}, 'state_dict': state_dict}, good)
    fresh = build(cfg)
    load_detector_checkpoint(fresh, str(good))
    torch.testing.assert_close(fresh.state_dict(), state_dict)

    upstream = tmp_path / 'upstream.pth'  # the authors' layout converts on the fly
    meta = dict(mmdet_version='2.11.0', CLASSES=np.array(['a', 'b']))
    torch.save({'meta': meta, 'state_dict': upstream_detector(state_dict, 'lesa_resnet50_det', 'backbone.')}, upstream)
    again = build(cfg)
    assert load_detector_checkpoint(again, str(upstream))['mmdet_version'] == '2.11.0'
    torch.testing.assert_close(again.state_dict(), state_dict)

    other = tmp_path / 'lit_ti_mask_rcnn.pth'
    torch.save({'state_dict': build(small_config(MASK_RCNN_LIT_TI)).state_dict()}, other)
    with pytest.raises(CheckpointError, match='does not fit the model of this config'):
        load_detector_checkpoint(fresh, str(other))


# ----------------------------------------------------------------------------------------------------------------
# the COCO-checkpoint converter


@pytest.mark.parametrize('path', [
    MASK_RCNN_LESA, RETINA_LIT_TI, MASK_RCNN_LIT_S, pytest.param(HTC_LESA, marks=pytest.mark.slow),
], ids=lambda p: p.name)
def test_converter_round_trips_the_authors_layout(path, tmp_path):
    torch.manual_seed(0)
    options = {'model.backbone.img_size': DETECTION_SIZE} if 'lesa' in path.name else {}
    cfg = small_config(path, **options)
    options.update({f'model.backbone.{k}': v for k, v in reduced_depth(cfg.model.backbone.model_name).items()})
    model = build(cfg)
    with torch.no_grad():  # nothing at its init value, so a dropped or swapped tensor shows
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value) * 0.1)
    upstream = tmp_path / 'upstream.pth'
    meta = dict(mmdet_version='2.11.0', CLASSES=np.array(['a', 'b']), epoch=12)
    upstream_state = upstream_detector(model.state_dict(), cfg.model.backbone.model_name, 'backbone.')
    torch.save({'meta': meta, 'state_dict': upstream_state}, upstream)
    converted = tmp_path / 'converted.pth'
    cfg_options = dict(options, **{'model.backbone.init_cfg': None})
    summary = convert_coco_checkpoint(str(path), str(upstream), str(converted), cfg_options)
    assert summary['backbone_tensors'] > 0 and summary['other_tensors'] > 0
    fresh = build(small_config(path, **options))
    load_detector_checkpoint(fresh, str(converted))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)


@pytest.mark.slow
def test_converter_refuses_a_checkpoint_of_another_backbone(tmp_path):
    lit_ti = build(small_config(MASK_RCNN_LIT_TI))
    upstream = tmp_path / 'lit_ti_mask_rcnn.pth'
    torch.save({'state_dict': upstream_detector(lit_ti.state_dict(), 'lit_ti', 'backbone.')}, upstream)
    with pytest.raises(CheckpointError, match='does not fit'):
        convert_coco_checkpoint(str(MASK_RCNN_LIT_S), str(upstream), str(tmp_path / 'out.pth'))
    result = subprocess.run(
        [sys.executable, str(DETECTION / 'tools' / 'convert_coco_checkpoint.py'), str(MASK_RCNN_LIT_S),
         str(upstream), str(tmp_path / 'out.pth')], capture_output=True, text=True)
    assert result.returncode != 0 and 'does not fit' in result.stderr and 'Traceback' not in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# launchers


def test_slurm_scripts_start_one_task_per_gpu(tmp_path):
    fake_srun = tmp_path / 'bin' / 'srun'
    fake_srun.parent.mkdir()
    fake_srun.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    fake_srun.chmod(0o755)
    env = dict(os.environ, PATH=f'{fake_srun.parent}:{os.environ["PATH"]}', SRUN_LOG=str(tmp_path / 'args'),
               GPUS='16', PYTHON=sys.executable)
    subprocess.run(['bash', str(DETECTION / 'slurm_train.sh'), 'gpu', 'lesa', str(MASK_RCNN_LESA), 'work_dirs/x',
                    '--auto-scale-lr'], env=env, check=True)
    args = (tmp_path / 'args').read_text().splitlines()
    assert args[:2] == ['-p', 'gpu'] and '--gres=gpu:8' in args and '--ntasks=16' in args
    assert '--ntasks-per-node=8' in args
    assert args[-4:] == [str(MASK_RCNN_LESA), '--work-dir=work_dirs/x', '--launcher=slurm', '--auto-scale-lr']
    subprocess.run(['bash', str(DETECTION / 'slurm_test.sh'), 'gpu', 'eval', str(MASK_RCNN_LESA), 'ckpt.pth'],
                   env=dict(env, GPUS='4'), check=True)
    args = (tmp_path / 'args').read_text().splitlines()
    assert '--ntasks=4' in args and '--gres=gpu:4' in args
    assert args[-3:] == [str(MASK_RCNN_LESA), 'ckpt.pth', '--launcher=slurm']


def test_train_and_test_scripts_pick_the_launcher(tmp_path):
    fake_python = tmp_path / 'python'
    fake_python.write_text('#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} $*"\n')
    fake_python.chmod(0o755)

    def launch(script, *args, **env):
        env = dict(os.environ, PYTHON=str(fake_python), **env)
        env.pop('CUDA_VISIBLE_DEVICES', None)
        return subprocess.run(['bash', str(DETECTION / script), *args], env=env, check=True, capture_output=True,
                              text=True).stdout.split()

    train, test = str(DETECTION / 'tools' / 'train.py'), str(DETECTION / 'tools' / 'test.py')
    assert launch('train.sh', 'cfg.py', '--work-dir', 'w') == ['CUDA_VISIBLE_DEVICES=unset', train, 'cfg.py',
                                                               '--work-dir', 'w']
    assert launch('train.sh', 'cfg.py', '0')[:3] == ['CUDA_VISIBLE_DEVICES=-1', train, 'cfg.py']
    assert launch('test.sh', 'cfg.py', 'ckpt.pth', '1', '--test-dev') == [
        'CUDA_VISIBLE_DEVICES=unset', test, 'cfg.py', 'ckpt.pth', '--test-dev']
    assert launch('train.sh', 'cfg.py', '8', '--resume', NNODES='2', NODE_RANK='1', MASTER_ADDR='10.1.1.1') == [
        'CUDA_VISIBLE_DEVICES=unset', '-m', 'torch.distributed.run', '--nnodes=2', '--node_rank=1',
        '--master_addr=10.1.1.1', '--master_port=29500', '--nproc_per_node=8', train, 'cfg.py', '--resume',
        '--launcher', 'pytorch']
    assert launch('test.sh', 'cfg.py', 'ckpt.pth', '4', PORT='29999')[-7:] == [
        '--master_port=29999', '--nproc_per_node=4', test, 'cfg.py', 'ckpt.pth', '--launcher', 'pytorch']


def test_demo_refuses_a_foreign_work_dir(tmp_path):
    foreign = tmp_path / 'results'
    foreign.mkdir()
    (foreign / 'paper.pdf').write_text('mine')
    result = subprocess.run(['bash', str(DETECTION / 'demo.sh'), str(foreign)], capture_output=True, text=True,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 1 and 'refusing' in result.stderr
    assert [p.name for p in foreign.iterdir()] == ['paper.pdf']
