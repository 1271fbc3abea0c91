"""``pretrained=True`` end to end: the authors' release files, served by a loopback server in their own layouts,
through every entry point of the package (timm.create_model, torch.hub / hubconf.py, lesa-lit-convert,
pretrained_cfg_overlay files). The registered pretrained cfg url is redirected to the server; the torch hub
cache lives in a temp dir (conftest.py ``release_server``).
"""
import argparse
import importlib.util
import io
import socket
import urllib.parse
from pathlib import Path

import pytest
import timm
import torch

import lesa_lit_models  # noqa: F401  (registers the models)
from lesa_lit_models import CheckpointError, UnsafeCheckpointError, package_models
from lesa_lit_models.cli import main
from _helpers import SMALL_LIT, CfgNode, assert_same_tensors, save_crafted, save_with_module, small_model, to_upstream

ROOT = Path(__file__).resolve().parents[1]


def _serve_release(server, monkeypatch, name, checkpoint_bytes):
    """Serve ``checkpoint_bytes`` at the path of ``name``'s release url and point the registered cfg there."""
    cfg = timm.models._registry._model_pretrained_cfgs[f'{name}.in1k']  # what create_model reads (a copy of it)
    path = urllib.parse.urlparse(cfg.url).path
    assert cfg.url == f'https://github.com/ziplab/LIT/releases/download/v1.0/{name}.pth' and not cfg.hf_hub_id
    server.files[path] = checkpoint_bytes
    monkeypatch.setattr(cfg, 'url', server.url(path))
    return path


def _swin_release(source, tmp_path, monkeypatch):
    """LIT-S/M/B as the authors' Swin-based code saves it: layers.* keys, optimizer, scheduler, a yacs config."""
    path = tmp_path / 'lit_s_release.pth'
    config = CfgNode({'MODEL': CfgNode({'TYPE': 'lit', 'NAME': 'lit_small'}), 'TRAIN': CfgNode({'EPOCHS': 300})})
    save_with_module({'model': to_upstream(source.state_dict(), 'lit_s'),
                      'optimizer': {'state': {}, 'param_groups': []},
              'lr_scheduler': {'last_epoch': 299}, 'max_accuracy': 81.5, 'epoch': 299, 'config': config},
             path, monkeypatch, 'yacs.config', CfgNode)
    return path.read_bytes()


def _deit_release(source):
    """LIT-Ti as the authors' DeiT-based code saves it: flat keys, an argparse Namespace."""
    buffer = io.BytesIO()
    torch.save({'model': to_upstream(source.state_dict(), 'lit_ti'), 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 299,
                'args': argparse.Namespace(model='lit_ti', lr=5e-4, drop_path=0.1)}, buffer)
    return buffer.getvalue()


def test_lit_s_pretrained_downloads_the_release_converts_and_caches(tmp_path, monkeypatch, release_server):
    source = small_model('lit_s', seed=11).eval()
    path = _serve_release(release_server, monkeypatch, 'lit_s', _swin_release(source, tmp_path, monkeypatch))

    model = timm.create_model('lit_s', pretrained=True, **SMALL_LIT).eval()
    assert_same_tensors(model, source)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image), rtol=0, atol=0)
    assert 'state_dict' not in model.pretrained_cfg  # the file is not kept alive by the model
    assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'lit_s.pth').is_file()

    features = timm.create_model('lit_s', pretrained=True, features_only=True, out_indices=(1, 3), **SMALL_LIT).eval()
    with torch.no_grad():
        expected = source.forward_intermediates(image, indices=(1, 3), intermediates_only=True)
        for got, want in zip(features(image), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    adapted = timm.create_model('lit_s', pretrained=True, num_classes=5, in_chans=1, **SMALL_LIT)
    assert adapted.head.weight.shape == (5, SMALL_LIT['embed_dims'][-1]) and adapted.patch_embed.proj.in_channels == 1
    assert torch.equal(adapted.stages[3].blocks[0].attn.qkv.weight, source.stages[3].blocks[0].attn.qkv.weight)
    assert release_server.requests == [path]  # the later calls used the cache


def test_lit_ti_pretrained_reads_the_deit_layout(monkeypatch, release_server):
    source = small_model('lit_ti', seed=12)
    _serve_release(release_server, monkeypatch, 'lit_ti', _deit_release(source))
    assert_same_tensors(timm.create_model('lit_ti', pretrained=True, **SMALL_LIT), source)


def test_http_404_and_truncated_release_downloads_fail_clearly(tmp_path, monkeypatch, release_server):
    source = small_model('lit_ti', seed=13)
    path = _serve_release(release_server, monkeypatch, 'lit_ti', _deit_release(source))
    body = release_server.files.pop(path)
    with pytest.raises(CheckpointError, match=r'HTTP 404(.|\n)*lit_ti.pth'):
        timm.create_model('lit_ti', pretrained=True, **SMALL_LIT)
    release_server.files[path] = body
    release_server.truncate[path] = 1000
    with pytest.raises(CheckpointError, match=f'truncated: received 1000 of {len(body)} bytes'):
        timm.create_model('lit_ti', pretrained=True, **SMALL_LIT)
    cached = (tmp_path / 'torch_home' / 'hub' / 'checkpoints').iterdir()
    assert [p.name for p in cached] == ['lit_ti.pth.lock']  # the lock of concurrent downloads only


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """A connection to anything but the loopback server fails the test; ``attempts`` lists every connection."""
    attempts = []
    connect = socket.socket.connect

    def guarded(sock, address):
        attempts.append(address)
        if not (isinstance(address, tuple) and address[0] == '127.0.0.1'):
            raise AssertionError(f'network access attempted: {address}')
        return connect(sock, address)
    monkeypatch.setattr(socket.socket, 'connect', guarded)
    monkeypatch.setattr(socket, 'getaddrinfo', lambda host, *a, **k: pytest.fail(f'DNS lookup of {host}')
                        if host not in ('127.0.0.1', 'localhost') else _getaddrinfo(host, *a, **k))
    return attempts


_getaddrinfo = socket.getaddrinfo


@pytest.mark.parametrize('name, release_file', [
    ('lesa_resnet50', 'checkpoint.pth'), ('lesa_wrn50', 'checkpoint.pth'),
    ('lesa_resnet50_det', 'epoch_20.pth'), ('lesa_wrn50_det', 'epoch_20.pth'),
])
def test_lesa_pretrained_without_a_file_explains_where_the_weights_are(loopback_only, name, release_file):
    with pytest.raises(CheckpointError) as info:
        timm.create_model(name, pretrained=True)
    message = str(info.value)
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.origin_url in message and 'sharepoint.com' in message and release_file in message
    assert "pretrained_cfg_overlay=dict(file='/path/to/file.pth')" in message
    assert f'lesa-lit-convert {name}.' in message and 'local-dir:OUT_DIR' in message
    assert loopback_only == []  # stopped before any network access


def test_crafted_pickle_is_refused_at_every_entry_point(tmp_path, monkeypatch, release_server, capsys):
    marker = tmp_path / 'created_by_the_checkpoint'
    path = save_crafted(tmp_path / 'evil.pth', marker)

    with pytest.raises(UnsafeCheckpointError, match='posix.system'):  # a file overlay
        timm.create_model('lit_s', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL_LIT)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):  # the release url
        _serve_release(release_server, monkeypatch, 'lit_s', path.read_bytes())
        timm.create_model('lit_s', pretrained=True, **SMALL_LIT)
    with pytest.raises(UnsafeCheckpointError, match='posix.system'):  # torch.hub through hubconf.py
        torch.hub.load(str(ROOT), 'lit_s', source='local', pretrained=True,
                       pretrained_cfg_overlay=dict(file=str(path)), **SMALL_LIT)
    code = main(['lit_s', str(path), str(tmp_path / 'export')])  # lesa-lit-convert
    err = capsys.readouterr().err
    assert code == 1 and 'Refusing to load' in err and 'posix.system' in err and 'Traceback' not in err
    code = main(['lit_s', release_server.url('/ziplab/LIT/releases/download/v1.0/lit_s.pth'),
                 str(tmp_path / 'export2')])  # lesa-lit-convert with a URL
    assert code == 1 and 'posix.system' in capsys.readouterr().err
    assert not marker.exists()


def test_hubconf_lists_every_model_and_loads_the_release(tmp_path, monkeypatch, release_server):
    spec = importlib.util.spec_from_file_location('hubconf', ROOT / 'hubconf.py')
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith('_')}  # as torch.hub.list
    assert set(package_models()) <= entries and set(hubconf.dependencies) >= {'torch', 'timm'}
    source = small_model('lit_s', seed=14)
    _serve_release(release_server, monkeypatch, 'lit_s', _swin_release(source, tmp_path, monkeypatch))
    model = torch.hub.load(str(ROOT), 'lit_s', source='local', pretrained=True, **SMALL_LIT)
    assert_same_tensors(model, source)


def test_lesa_convert_from_a_url(tmp_path, monkeypatch, release_server, capsys):
    source = small_model('lit_ti', seed=15)
    path = _serve_release(release_server, monkeypatch, 'lit_ti', _deit_release(source))
    code = main(['lit_ti.in1k', release_server.url(path), str(tmp_path / 'export'), '--model-kwargs',
                 *(f'{k}={v}'.replace(' ', '') for k, v in SMALL_LIT.items())])
    assert code == 0, capsys.readouterr().err
    assert_same_tensors(timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True), source)
