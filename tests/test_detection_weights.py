"""Where the detectors' weights come from, and that reading them never runs code from a file.

A loopback HTTP server started by the tests stands in for the release URLs; the torch hub and Hugging Face caches
point at temporary folders. Covered: the configs' ImageNet URLs (download, then the cache), a crafted pickle refused
at every entry point of the adapter (backbone weights, detector checkpoints, the COCO converter, mmengine's
``load_from`` / ``resume`` loader), mmengine's own checkpoints, the LESA detection-pretrain layout loaded as the
authors' init does, and the classification-initialised LESA BatchNorms that keep training under ``norm_eval``.
The end-to-end runs (test.sh, train.sh --resume, the inference tool) are in test_detection_e2e.py.
"""
import argparse

import numpy as np
import pytest
import timm
import torch
from mmdet.registry import MODELS
from mmengine.runner import CheckpointLoader
from torch.nn.modules.batchnorm import _BatchNorm

from lesa_lit_det.convert import convert_coco_checkpoint, load_detector_checkpoint
from lesa_lit_det.engine import load_config
from lesa_lit_models import CheckpointError, DownloadError, UnsafeCheckpointError
from _helpers import MASK_RCNN_LIT_TI, OpensAFile, build, make_backbone, pretrained, save_crafted, small_config, \
    upstream_detector, upstream_key

LESA_IMG = 64  # LESA COCO backbones at 64x64: grids of 16, 8, 4, 2


pytestmark = pytest.mark.usefixtures('hub_caches')


# ----------------------------------------------------------------------------------------------------------------
# the release URLs


def authors_lit_ti_imagenet(model):
    """A LIT-Ti ImageNet checkpoint in the authors' (DeiT-style) layout: ``model`` and ``args``."""
    state_dict = {upstream_key(k, 'lit_ti'): v for k, v in model.state_dict().items()}
    return {'model': state_dict, 'args': argparse.Namespace(model='lit_ti', lr=5e-4), 'epoch': 299}


def test_lit_config_initialises_from_its_release_url_then_from_the_cache(release_server, tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model('lit_ti')
    torch.save(authors_lit_ti_imagenet(reference), release_server.root / 'lit_ti.pth')
    cfg = load_config(str(MASK_RCNN_LIT_TI))
    assert cfg.model.backbone.init_cfg.checkpoint == 'https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth'
    cfg.model.backbone.init_cfg.checkpoint = release_server.url('/lit_ti.pth')  # the release, on loopback
    for _ in range(2):
        model = MODELS.build(cfg.model)
        model.init_weights()
        loaded = model.backbone.body.model.state_dict()
        assert len(loaded) > 100 and set(loaded) <= set(reference.state_dict())
        for k, v in loaded.items():
            torch.testing.assert_close(v, reference.state_dict()[k], msg=k)
    assert release_server.requests == ['/lit_ti.pth']  # downloaded once, then read from the torch hub cache
    assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'lit_ti.pth').is_file()


def test_missing_release_file_is_a_clear_error(release_server):
    with pytest.raises(DownloadError, match='HTTP 404'):
        make_backbone('lit_ti', init_cfg=pretrained(release_server.url('/lit_ti.pth'))).init_weights()


# ----------------------------------------------------------------------------------------------------------------
# nothing from a file runs


def test_crafted_checkpoint_is_refused_everywhere_and_runs_nothing(tmp_path, release_server):
    marker = tmp_path / 'created_by_the_checkpoint'
    cfg = small_config(MASK_RCNN_LIT_TI)
    model = build(cfg)
    authors = upstream_detector(model.state_dict(), 'lit_ti', 'backbone.')
    crafted = save_crafted(tmp_path / 'crafted.pth', marker, OpensAFile, authors)
    save_crafted(release_server.root / 'crafted.pth', marker, OpensAFile, authors)

    for source in (str(crafted), release_server.url('/crafted.pth')):
        with pytest.raises(UnsafeCheckpointError, match='io.open'):  # TimmBackbone weights, file and URL
            make_backbone('lit_ti', init_cfg=pretrained(source)).init_weights()
        with pytest.raises(UnsafeCheckpointError, match='io.open'):  # test.sh, infer.py
            load_detector_checkpoint(model, source)
        with pytest.raises(UnsafeCheckpointError, match='io.open'):  # the COCO converter
            convert_coco_checkpoint(str(MASK_RCNN_LIT_TI), source, str(tmp_path / 'out.pth'),
                                    {'model.backbone.init_cfg': None})
        with pytest.raises(UnsafeCheckpointError, match='io.open'):  # mmengine: load_from, resume, init_cfg
            CheckpointLoader.load_checkpoint(source, map_location='cpu')
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()


def test_mmengine_checkpoints_with_their_objects_load(tmp_path):
    """What mmengine's CheckpointHook saves beside the weights: numpy in ``meta``, ``HistoryBuffer`` objects in
    ``message_hub``, optimizer and scheduler states. The end-to-end resume is in test_detection_e2e.py."""
    from mmengine.logging import HistoryBuffer, MessageHub
    hub = MessageHub.get_instance('weights-test')
    hub.update_scalar('train/loss', 1.5)
    hub.update_info('iter', 7)
    model = make_backbone('resnet18', out_indices=(4,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64))[0].mean().backward()
    optimizer.step()
    meta = dict(epoch=1, iter=7, seed=np.int64(0), mmengine_version='0.10.7', cfg='model = dict()',
                dataset_meta=dict(classes=('tv', 'clock'), palette=[(1, 2, 3), (4, 5, 6)]),
                hook_msgs=dict(last_ckpt='epoch_1.pth'), counts=np.arange(3))
    path = tmp_path / 'epoch_1.pth'
    torch.save(dict(meta=meta, state_dict=model.state_dict(), message_hub=hub.state_dict(),
                    optimizer=optimizer.state_dict(), param_schedulers=[dict(base_lrs=[0.1], last_epoch=7)]), path)
    checkpoint = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    assert checkpoint['message_hub']['log_scalars']['train/loss'].current() == 1.5
    assert checkpoint['meta']['dataset_meta']['classes'] == ('tv', 'clock')
    np.testing.assert_array_equal(checkpoint['meta']['counts'], np.arange(3))
    torch.testing.assert_close(checkpoint['optimizer']['state'][0]['momentum_buffer'],
                               optimizer.state_dict()['state'][0]['momentum_buffer'])


# ----------------------------------------------------------------------------------------------------------------
# LESA: the authors' detection pretrain, or the classification weights


def lesa_imagenet_file(path, **model_kwargs):
    """An ImageNet LESA-ResNet-50 training checkpoint as the authors save it: ``net`` with DDP prefixes."""
    torch.manual_seed(0)
    model = timm.create_model('lesa_resnet50', **model_kwargs)
    with torch.no_grad():  # trained-looking statistics and affine parameters, nothing at its init value
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
                module.num_batches_tracked.fill_(1000)
    net = {f'module.{k}': v for k, v in model.state_dict().items()}
    torch.save({'net': net, 'optim': {}, 'epoch': 130}, path)
    return model.state_dict()


def lesa_backbone(path, **kwargs):
    backbone = make_backbone('lesa_resnet50_det', img_size=LESA_IMG, out_indices=(1, 2, 3, 4), frozen_stages=1,
                             norm_eval=True, init_cfg=pretrained(path), **kwargs)
    backbone.init_weights()
    return backbone


def test_lesa_detection_pretrain_loads_as_the_authors_init(tmp_path):
    """The "Pretrained" files of LESA_detection: ImageNet LESA layers with detection shapes (2-D position tables,
    bn_similarity 2G, bn_output C). fc and the position tables are dropped, everything else loads strictly."""
    path = tmp_path / 'checkpoint.pth'
    source = lesa_imagenet_file(path, pos_embed='detection_qr', img_size=224)
    assert source['layer3.1.conv2.bn_similarity.weight'].shape == (16,)  # 2G
    backbone = lesa_backbone(path)
    loaded = backbone.body.model.state_dict()
    dropped = ('fc.', '.rel_height', '.rel_width', '.flatten_index')
    compared = [k for k in source if not (k.startswith(dropped) or k.endswith(dropped))]
    assert any('bn_similarity' in k for k in compared) and any('bn_output' in k for k in compared)
    for k in compared:
        torch.testing.assert_close(loaded[k], source[k], msg=k)
    offsets = [k for k in loaded if '.conv_offset.' in k]
    assert offsets and all(not loaded[k].any() for k in offsets)  # the DCN offsets start at zero
    assert loaded['layer4.0.conv2.rel_height'].shape[0] != source['layer4.0.conv2.rel_height'].shape[0]
    assert backbone._untrained_norms == []  # every BatchNorm has the file's statistics: all frozen under norm_eval

    net = torch.load(path, weights_only=True)
    net['net']['module.layer1.0.extra.weight'] = torch.zeros(1)
    torch.save(net, path)
    with pytest.raises(CheckpointError, match='layer1.0.extra.weight'):  # strict, as their load_state_dict
        lesa_backbone(path)


def test_classification_initialised_bn_similarity_trains_while_frozen_norms_do_not(tmp_path):
    path = tmp_path / 'lesa_resnet50.pth'
    source = lesa_imagenet_file(path)
    assert source['layer3.1.conv2.bn_similarity.weight'].shape == (24,)  # 3G: keeps its fresh init
    backbone = lesa_backbone(path).train()
    loaded = backbone.body.model.state_dict()
    torch.testing.assert_close(loaded['layer3.1.conv1.weight'], source['layer3.1.conv1.weight'])
    fresh = {m for name, m in backbone.body.named_modules() if name.endswith(('bn_similarity', 'bn_output'))}
    assert fresh and set(backbone._untrained_norms) == fresh
    norms = {name: m for name, m in backbone.body.named_modules() if isinstance(m, _BatchNorm)}
    assert all(m.training == (m in fresh) for m in norms.values())
    before = {name: m.running_mean.clone() for name, m in norms.items()}
    backbone(torch.randn(2, 3, LESA_IMG, LESA_IMG))
    for name, m in norms.items():
        moved = not torch.equal(m.running_mean, before[name])
        assert moved == (m in fresh), name  # the fresh ones estimate their statistics, the rest stay frozen
