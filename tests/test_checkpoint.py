"""The safe checkpoint loader: every release layout loads, nothing a file names runs, downloads fail clearly.

Files are written in the layouts of the authors' training scripts (LESA ``{'net'}``, Swin ``{'model', 'config':
CfgNode}``, DeiT ``{'model', 'args': Namespace}``, mmdet 2.x ``{'meta': numpy, 'state_dict'}``) and by mmengine's
own Runner. Downloads come from a loopback server (conftest.py).
"""
import argparse
import io
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.models import load_pretrained

from lesa_lit_models import (
    CheckpointError, DownloadError, UnsafeCheckpointError, load_checkpoint, load_checkpoint_file, strict_filter,
    unwrap_state_dict, verify_state_dict,
)
from lesa_lit_models._builder import resolve_pretrained_weights
from _helpers import CfgNode, EvaluatesCode, OpensAFile, RunsAShellCommand, assert_same_tensors, save_crafted, \
    save_with_module


@pytest.fixture
def weights():
    return {'conv.weight': torch.randn(4, 3, 3, 3), 'fc.weight': torch.randn(2, 4)}


def test_lesa_imagenet_layout(tmp_path, weights):
    path = tmp_path / 'checkpoint.pth'
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, nesterov=True)
    torch.save({'net': {'module.' + k: v for k, v in weights.items()}, 'optim': optimizer.state_dict(),
                'epoch': 94}, path)
    checkpoint = load_checkpoint_file(path)
    assert checkpoint['epoch'] == 94 and checkpoint['optim']['param_groups'][0]['nesterov'] is True
    assert_same_tensors(unwrap_state_dict(checkpoint), weights, same_keys=True)


def test_swin_layout_with_a_yacs_config_loads_without_yacs(tmp_path, monkeypatch, weights):
    config = CfgNode({'MODEL': CfgNode({'TYPE': 'lit', 'LIT': CfgNode({'DEPTHS': [2, 2, 6, 2]})}), 'SEED': 0})
    path = tmp_path / 'lit_s.pth'
    save_with_module({'model': weights, 'optimizer': {'state': {}, 'param_groups': [{'lr': 5e-4, 'params': [0]}]},
              'lr_scheduler': {'last_epoch': 299}, 'max_accuracy': 81.5, 'epoch': 299, 'config': config},
             path, monkeypatch, 'yacs.config', CfgNode)
    checkpoint = load_checkpoint_file(path)
    assert 'yacs' not in sys.modules
    assert checkpoint['config'] == {'MODEL': {'TYPE': 'lit', 'LIT': {'DEPTHS': [2, 2, 6, 2]}}, 'SEED': 0}
    assert checkpoint['max_accuracy'] == 81.5
    assert_same_tensors(unwrap_state_dict(checkpoint), weights, same_keys=True)


def test_deit_layout_with_argparse_namespace(tmp_path, weights):
    path = tmp_path / 'lit_ti.pth'
    args = argparse.Namespace(model='lit_ti', lr=5e-4, input_size=224, drop_path=0.1, resume='', model_ema=False)
    torch.save({'model': weights, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 299, 'args': args}, path)
    checkpoint = load_checkpoint_file(path)
    assert checkpoint['args'] == args
    assert_same_tensors(unwrap_state_dict(checkpoint), weights, same_keys=True)


@pytest.mark.parametrize('numpy_1x_names', [False, True], ids=['numpy2', 'numpy1'])
def test_mmdet2_layout_with_numpy_meta(tmp_path, weights, numpy_1x_names):
    path = tmp_path / 'mask_rcnn.pth'
    meta = {'epoch': np.int64(12), 'iter': 87960, 'CLASSES': np.array(['person', 'car']), 'lr': np.float32(2e-4),
            'mixed': np.array([1, 'a'], dtype=object), 'mmdet_version': '2.11.0', 'config': 'model = dict(...)'}
    torch.save({'meta': meta, 'state_dict': {'backbone.' + k: v for k, v in weights.items()}}, path,
               _use_new_zipfile_serialization=not numpy_1x_names)
    if numpy_1x_names:  # the module names numpy 1.x wrote (the legacy format keeps the pickle uncompressed)
        data = path.read_bytes()
        assert b'numpy._core.multiarray' in data
        path.write_bytes(data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    checkpoint = load_checkpoint_file(path)
    for key, value in meta.items():
        assert type(checkpoint['meta'][key]) is type(value)
        assert np.array_equal(checkpoint['meta'][key], value) if isinstance(value, np.ndarray) \
            else checkpoint['meta'][key] == value
    backbone = {k[len('backbone.'):]: v for k, v in unwrap_state_dict(checkpoint).items()}
    assert_same_tensors(backbone, weights, same_keys=True)


def test_file_object_and_safetensors(tmp_path, weights):
    buffer = io.BytesIO()
    torch.save({'state_dict': weights}, buffer)
    buffer.seek(0)
    assert_same_tensors(unwrap_state_dict(load_checkpoint_file(buffer)), weights, same_keys=True)
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / 'model.safetensors'))
    assert_same_tensors(load_checkpoint_file(tmp_path / 'model.safetensors'), weights, same_keys=True)


# ---------------------------------------------------------------------------------------------------- mmengine


def _tiny_runner(work_dir, max_epochs, resume):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, x, mode='tensor'):
            out = self.linear(torch.stack(x) if isinstance(x, list) else x)
            return {'loss': out.pow(2).mean()} if mode == 'loss' else out

    class Data(torch.utils.data.Dataset):
        metainfo = dict(classes=('person', 'car'))

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return dict(x=torch.full((2,), float(i)))

    return Runner(
        model=Model(), work_dir=str(work_dir), experiment_name=f'{work_dir.name}-run{max_epochs}',
        train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=False), batch_size=2,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        param_scheduler=[dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
                         dict(type='MultiStepLR', milestones=[1], by_epoch=True)],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs), default_hooks=dict(checkpoint=dict(
            type='CheckpointHook', interval=1)), randomness=dict(seed=0), resume=resume, default_scope='mmengine')


@pytest.fixture
def tiny_runner(monkeypatch):
    """``_tiny_runner``; mmengine's process-wide default scope (a Runner sets it) is restored afterwards."""
    registry = pytest.importorskip('mmengine.registry')
    monkeypatch.setattr(registry.DefaultScope, '_instance_dict', dict(registry.DefaultScope._instance_dict))
    return _tiny_runner


@pytest.fixture
def mmengine_loader(monkeypatch):
    loading = pytest.importorskip('lesa_lit_det.loading')  # the detection extra
    from mmengine.runner.checkpoint import CheckpointLoader
    monkeypatch.setattr(CheckpointLoader, '_schemes', dict(CheckpointLoader._schemes))  # restored afterwards
    loading.register_checkpoint_loader()
    return CheckpointLoader


@pytest.mark.slow
def test_mmengine_runner_checkpoints_load_and_resume(tmp_path, mmengine_loader, tiny_runner):
    tiny_runner(tmp_path, 1, False).train()
    path = tmp_path / 'epoch_1.pth'
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(path)  # what mmengine's own loader does on torch >= 2.6
    checkpoint = load_checkpoint_file(path)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} <= checkpoint.keys()
    assert checkpoint['meta']['dataset_meta'] == {'classes': ('person', 'car')}

    runner = tiny_runner(tmp_path, 2, True)  # resume=True: mmengine's CheckpointLoader reads epoch_1.pth
    runner.train()
    assert runner.epoch == 2 and runner.iter == 4
    assert runner.message_hub.get_scalar('train/loss').data[0].shape == (4,)  # history resumed, then extended


def test_mmengine_loader_reads_urls_and_refuses_unsafe_files(tmp_path, mmengine_loader, release_server, weights):
    from mmengine.runner.checkpoint import _load_checkpoint
    buffer = io.BytesIO()
    torch.save({'meta': {'epoch': np.int64(3)}, 'state_dict': weights}, buffer)
    release_server.files['/det.pth'] = buffer.getvalue()
    loaded = _load_checkpoint(release_server.url('/det.pth'), map_location='cpu')
    assert_same_tensors(loaded['state_dict'], weights, same_keys=True)
    marker = tmp_path / 'created'
    save_crafted(tmp_path / 'evil.pth', marker)
    with pytest.raises(UnsafeCheckpointError):
        _load_checkpoint(str(tmp_path / 'evil.pth'), map_location='cpu')
    assert not marker.exists()


@pytest.mark.slow
def test_mmengine_config_dict_reads_as_a_dict(tmp_path):
    config_dict = pytest.importorskip('mmengine.config').ConfigDict
    torch.save({'cfg': config_dict(model=dict(type='MaskRCNN', backbone=dict(depths=[2, 2])), lr=0.02)},
               tmp_path / 'cfg.pth')
    assert load_checkpoint_file(tmp_path / 'cfg.pth')['cfg'] == {
        'model': {'type': 'MaskRCNN', 'backbone': {'depths': [2, 2]}}, 'lr': 0.02}


def test_history_buffer_is_inert_without_mmengine_loaded(tmp_path, tiny_runner):
    import subprocess
    tiny_runner(tmp_path, 1, False).train()
    code = ('import sys; from lesa_lit_models import load_checkpoint_file, InertObject; '
            f'c = load_checkpoint_file({str(tmp_path / "epoch_1.pth")!r}); '
            'b = c["message_hub"]["log_scalars"]["train/loss"]; '
            'assert type(b) is InertObject and b._log_history.shape == (2,), b; '
            'assert "mmengine" not in sys.modules; print("ok")')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == 'ok', out.stderr


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize('payload, name', [(RunsAShellCommand, 'posix.system'), (OpensAFile, 'io.open'),
                                           (EvaluatesCode, 'builtins.eval')])
@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_a_pickle_that_calls_code_is_refused_and_nothing_runs(tmp_path, payload, name, legacy):
    marker = tmp_path / 'created_by_the_file'
    path = save_crafted(tmp_path / 'evil.pth', marker, payload, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert name in message and 'The file is not loaded' in message and 'evil.pth' in message
    assert 'corrupt' not in message and 'weights_only=False' not in message
    assert not marker.exists()


def test_a_pickle_protocol_the_safe_reader_does_not_read_is_named_not_run(tmp_path):
    marker = tmp_path / 'created_by_the_file'
    path = save_crafted(tmp_path / 'p4.pth', marker, pickle_protocol=4)
    with pytest.raises(CheckpointError, match='safely: Unsupported operand.*pickle protocol 2') as info:
        load_checkpoint_file(path)
    assert 'weights_only=False' not in str(info.value) and not marker.exists()


@pytest.mark.parametrize('content, what', [
    (bytes(range(7, 256)) * 40, 'it begins with the bytes 07 08 09 0a'),
    (b'', 'it is empty'),
    (b'<!DOCTYPE html><html><body>Sign in</body></html>', 'it is a web page'),
])
def test_a_file_that_is_not_a_checkpoint_is_called_so_first(tmp_path, content, what):
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    for source in (path, io.BytesIO(content)):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint_file(source)
        message = str(info.value)
        assert message.startswith(f'{str(path)!r} is not a checkpoint: {what}' if source is path else
                                  f'{source!r} is not a checkpoint: {what}')
        assert 'protocol' not in message and 'pickle' not in message


def test_getattr_is_limited_to_history_buffer_statistics(tmp_path):
    class _Getattr:
        def __reduce__(self):
            return getattr, (torch.Tensor, 'new_empty')

    torch.save({'x': _Getattr()}, tmp_path / 'getattr.pth')
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        load_checkpoint_file(tmp_path / 'getattr.pth')


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match='not found.*nope.pth'):
        load_checkpoint_file(tmp_path / 'nope.pth')


@pytest.mark.parametrize('fraction', [0.0005, 0.05, 0.5, 0.999])
def test_truncated_file_is_reported_as_corrupt(tmp_path, fraction):
    path = tmp_path / 'ckpt.pth'
    torch.save({'w': torch.randn(50_000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:max(1, int(len(data) * fraction))])
    with pytest.raises(CheckpointError, match='corrupt or truncated') as info:
        load_checkpoint_file(path)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_truncated_safetensors_is_reported(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / 'model.safetensors'
    save_file({'w': torch.randn(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_checkpoint_file(path)


# ---------------------------------------------------------------------------------------------------- downloads


def _serialized(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_url_downloads_once_into_the_torch_hub_cache(tmp_path, release_server, weights):
    release_server.files['/v1.0/lit_s.pth'] = _serialized({'model': weights})
    url = release_server.url('/v1.0/lit_s.pth')
    assert_same_tensors(unwrap_state_dict(load_checkpoint(url, progress=False)), weights, same_keys=True)
    cached = tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'lit_s.pth'
    assert cached.read_bytes() == release_server.files['/v1.0/lit_s.pth']
    assert_same_tensors(unwrap_state_dict(load_checkpoint(url, progress=False)), weights, same_keys=True)
    assert release_server.requests == ['/v1.0/lit_s.pth']  # the second load used the cache


def test_http_404_names_the_url_and_the_fix(tmp_path, release_server):
    url = release_server.url('/v1.0/missing.pth')
    with pytest.raises(DownloadError) as info:
        load_checkpoint(url, progress=False)
    message = str(info.value)
    assert 'HTTP 404' in message and url in message and 'pretrained_cfg_overlay=dict(file=' in message
    assert not (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'missing.pth').exists()


def test_truncated_download_is_detected_and_not_cached(tmp_path, release_server, weights):
    body = _serialized({'model': weights})
    release_server.files['/lit_ti.pth'] = body
    release_server.truncate['/lit_ti.pth'] = len(body) // 2
    url = release_server.url('/lit_ti.pth')
    with pytest.raises(DownloadError) as info:
        load_checkpoint(url, progress=False)
    message = str(info.value)
    assert 'truncated' in message and f'{len(body) // 2} of {len(body)} bytes' in message and url in message
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    assert str(cache / 'lit_ti.pth') in message
    assert [p.name for p in cache.iterdir()] == ['lit_ti.pth.lock']  # no file taken for the download
    del release_server.truncate['/lit_ti.pth']  # the connection works again: the next call downloads it
    assert_same_tensors(unwrap_state_dict(load_checkpoint(url, progress=False)), weights, same_keys=True)


# a process that loads a URL once every process named in argv[3:] is ready (so that their downloads overlap), and
# saves the tensors it got to argv[2]
_LOAD_WITH_OTHERS = """
import sys, time
from pathlib import Path
import torch
from lesa_lit_models import load_checkpoint, unwrap_state_dict
url, out, *ready = sys.argv[1:]
Path(out + '.ready').touch()
while not all(Path(r + '.ready').exists() for r in ready):
    time.sleep(0.01)
torch.save(unwrap_state_dict(load_checkpoint(url, progress=False)), out)
"""


def _loading_processes(url: str, outs) -> list:
    return [subprocess.Popen([sys.executable, '-c', _LOAD_WITH_OTHERS, url, str(out), *map(str, outs)],
                             stderr=subprocess.PIPE, text=True) for out in outs]


def test_processes_that_download_one_release_at_once_all_get_the_whole_file(tmp_path, release_server, weights):
    body = _serialized({'model': weights})
    release_server.files['/lit_ti.pth'] = body
    release_server.seconds['/lit_ti.pth'] = 1.5
    outs = [tmp_path / f'rank{rank}.pt' for rank in range(3)]
    for process in _loading_processes(release_server.url('/lit_ti.pth'), outs):
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors
    for out in outs:
        assert_same_tensors(torch.load(out), weights, same_keys=True)
    assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'lit_ti.pth').read_bytes() == body
    assert release_server.requests == ['/lit_ti.pth']  # one process downloaded, the others waited and read its file


def test_a_download_killed_half_way_leaves_nothing_taken_for_the_file(tmp_path, release_server):
    weights = {'w': torch.randn(3 << 18)}  # 3 MiB: the downloader writes 1 MiB at a time
    body = _serialized(weights)
    release_server.files['/lit_ti.pth'] = body
    release_server.seconds['/lit_ti.pth'] = 12.
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    [process] = _loading_processes(release_server.url('/lit_ti.pth'), [tmp_path / 'killed.pt'])
    partial, deadline = cache / 'lit_ti.pth.partial', time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 0):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    process.kill()
    process.communicate()
    assert not (cache / 'lit_ti.pth').exists() and partial.stat().st_size < len(body)
    del release_server.seconds['/lit_ti.pth']
    # the lock died with the process: this download does not wait, and replaces the partial file
    assert_same_tensors(unwrap_state_dict(load_checkpoint(release_server.url('/lit_ti.pth'), progress=False)),
                        weights, same_keys=True)
    assert (cache / 'lit_ti.pth').read_bytes() == body and not partial.exists()


def test_unreachable_server_names_the_url(tmp_path, release_server):
    url = release_server.url('/x.pth')
    release_server.close()
    with pytest.raises(DownloadError, match='failed after 0 bytes.*Check the network'):
        load_checkpoint(url, progress=False)


def test_a_corrupt_cached_download_says_to_delete_it(tmp_path, release_server):
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    (cache / 'lit_b.pth').write_bytes(b'PK\x03\x04 not a checkpoint')
    with pytest.raises(CheckpointError, match=r'corrupt(.|\n)*delete .*lit_b.pth'):
        load_checkpoint(release_server.url('/lit_b.pth'), progress=False)
    assert release_server.requests == []


def test_a_downloaded_pickle_that_calls_code_is_refused(tmp_path, release_server):
    marker = tmp_path / 'created_by_the_download'
    release_server.files['/evil.pth'] = save_crafted(tmp_path / 'evil.pth', marker).read_bytes()
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):
        load_checkpoint(release_server.url('/evil.pth'), progress=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- state dicts


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    state_dict = {'0.weight': torch.zeros(8, 3, 3, 3), '0.bias': torch.zeros(4), 'extra.weight': torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        verify_state_dict(state_dict, model)
    message = str(info.value)
    assert '2 missing keys: 1.weight, 1.bias' in message
    assert '1 unexpected keys: extra.weight' in message
    assert '0.weight: checkpoint (8, 3, 3, 3) vs model (4, 3, 3, 3)' in message
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict['1.weight'] = torch.zeros(7, 4)
    assert verify_state_dict(state_dict, model, ignore_shape_of=('1.',)) is state_dict


def test_strict_filter_checks_what_timm_loads_after_adapting_it():
    cfg = dict(architecture='toy', first_conv='0', classifier='1', num_classes=1000, input_size=(3, 8, 8))
    weights = {'0.weight': torch.randn(4, 3, 3, 3), '0.bias': torch.zeros(4), '1.weight': torch.zeros(1000, 4),
               '1.bias': torch.zeros(1000)}

    def load(num_classes, state_dict):
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(4, num_classes))
        load_pretrained(model, dict(cfg, state_dict=dict(state_dict)), num_classes=num_classes, in_chans=1,
                        filter_fn=strict_filter(lambda sd, m: sd))
        assert not model._load_state_dict_pre_hooks  # the check runs once, at this load
        return model

    model = load(5, weights)  # classifier dropped by timm, stem adapted to in_chans
    torch.testing.assert_close(model[0].weight, weights['0.weight'].sum(dim=1, keepdim=True))
    with pytest.raises(CheckpointError, match=r'0.weight: checkpoint \(8, 1, 3, 3\)'):  # not just the channels
        load(5, dict(weights, **{'0.weight': torch.zeros(8, 3, 3, 3)}))
    with pytest.raises(CheckpointError, match='2 missing keys: 1.weight, 1.bias'):
        load(1000, {k: v for k, v in weights.items() if not k.startswith('1.')})


def test_file_overlay_is_read_into_a_state_dict(tmp_path, weights):
    path = tmp_path / 'ckpt.pth'
    torch.save({'net': weights}, path)
    kwargs = resolve_pretrained_weights(
        'lit_s', True, dict(pretrained_cfg_overlay=dict(file=str(path)), num_classes=3))
    assert kwargs['num_classes'] == 3
    assert kwargs['pretrained_cfg_overlay']['state_dict']['net'].keys() == weights.keys()
    untouched = dict(pretrained_cfg_overlay=dict(file=str(path)))
    assert resolve_pretrained_weights('lit_s', False, untouched) is untouched
