"""lesa-lit-convert: original checkpoint -> timm hub files, reloading them through the real local-dir: and
hf-hub: paths (an offline Hugging Face cache), and pushing.

Checkpoints are written in the upstream containers (LESA ImageNet ``{'net': {'module.' + k}}``, mmdet
``{'meta': <numpy>, 'state_dict': {'backbone.' + k, 'neck.*', ...}}``, a bare state dict). The LIT key renaming
inside them is the family filter's job and is tested in test_lit.py; here LIT files carry timm key names.
No test touches the network: pushes go to a recording ``HfApi`` or to a closed local port.
"""
import hashlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import lesa_lit_models.convert  # registers the models; the converter
from lesa_lit_models.cli import main
from _helpers import SMALL, assert_same_tensors, small_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def _source(name, seed=1, **kwargs):
    """The small configuration of ``name`` (conversion does not depend on the size)."""
    return small_model(name, seed, **kwargs).eval()


def _model_kwargs_args(name, **kwargs):
    """``--model-kwargs`` for the small configuration of ``name``, updated by ``kwargs``."""
    return ['--model-kwargs', *(f'{k}={v}'.replace(' ', '') for k, v in {**SMALL[name], **kwargs}.items())]


def _write_checkpoint(path, state_dict, fmt):
    if fmt == 'bare':
        checkpoint = state_dict
    elif fmt == 'net':  # LESA_classification training script, DDP model
        checkpoint = {'net': {'module.' + k: v for k, v in state_dict.items()}, 'optim': {}, 'epoch': 90}
    elif fmt == 'mmdet':  # mmdet 2.x detector checkpoint; numpy in meta makes weights_only loading refuse it
        detector = {'backbone.' + k: v for k, v in state_dict.items()}
        detector['neck.lateral_convs.0.conv.weight'] = torch.randn(8, 4, 1, 1)
        detector['rpn_head.rpn_cls.weight'] = torch.randn(3, 8, 1, 1)
        checkpoint = {'meta': {'epoch': np.int64(20), 'CLASSES': np.array(['person', 'car'])}, 'state_dict': detector}
    else:
        raise ValueError(fmt)
    torch.save(checkpoint, path)
    return path


def _run(argv, capsys):
    """lesa-lit-convert in this process; a model of SMALL without ``--model-kwargs`` gets its small ones."""
    if argv[0] in SMALL and '--model-kwargs' not in argv:
        argv = [*argv, *_model_kwargs_args(argv[0])]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize('name, fmt, model_kwargs', [
    ('lit_ti', 'bare', {}),
    ('lesa_resnet50', 'net', {}),
    ('lesa_resnet50_det', 'mmdet', dict(img_size=64)),
])
def test_convert_upstream_checkpoint_to_hub_files(tmp_path, capsys, name, fmt, model_kwargs):
    source = _source(name, **model_kwargs)
    checkpoint = _write_checkpoint(tmp_path / f'{name}.pth', source.state_dict(), fmt)
    out_dir = tmp_path / 'export'
    code, out, err = _run([name, checkpoint, out_dir, *_model_kwargs_args(name, **model_kwargs)], capsys)
    assert code == 0, err

    assert sorted(p.name for p in out_dir.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    weights = safetensors.torch.load_file(out_dir / 'model.safetensors')
    assert weights.keys() == source.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in source.state_dict().items())

    config = json.loads((out_dir / 'config.json').read_text())
    assert config['architecture'] == name
    assert config['num_classes'] == source.num_classes
    assert config['pretrained_cfg']['num_classes'] == source.num_classes
    assert config['pretrained_cfg']['tag'] == source.pretrained_cfg['tag']
    size = model_kwargs.get('img_size', source.pretrained_cfg['input_size'][-1])
    assert config['pretrained_cfg']['input_size'] == [3, size, size]
    if 'img_size' in model_kwargs:
        assert config['model_args']['img_size'] == [size, size]

    num_params = sum(p.numel() for p in source.parameters())
    assert f'{num_params:,} parameters' in out
    assert _sha256(out_dir / 'model.safetensors') in out
    assert f'Verified: local-dir:{out_dir}' in out

    readme = (out_dir / 'README.md').read_text()
    assert readme.startswith('---\n') and 'library_name: timm' in readme
    assert f'Params (M): {num_params / 1e6:.1f}' in readme
    assert f'Image size: {size} x {size}' in readme
    assert re.search(r'https://arxiv\.org/abs/\d{4}\.\d{5}', readme)
    assert source.pretrained_cfg['origin_url'] in readme
    usage = readme[readme.index('## Model Usage'):]
    assert usage.index('import lesa_lit_models') < usage.index(f"timm.create_model('local-dir:{out_dir.resolve()}'")

    reloaded = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
    assert_same_tensors(reloaded, source.state_dict(), same_keys=True)
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(image), source(image), rtol=0, atol=0)


@pytest.fixture(scope='module')
def lit_s_export(tmp_path_factory):
    """lit_s converted from an upstream-style ``{'model': ...}`` checkpoint, with its source state dict."""
    tmp = tmp_path_factory.mktemp('lit_s')
    source = _source('lit_s', seed=2)
    torch.save({'model': source.state_dict(), 'epoch': 299}, tmp / 'lit_s.pth')
    assert main(['lit_s.in1k', str(tmp / 'lit_s.pth'), str(tmp / 'export'), '--no-verify',
                 *_model_kwargs_args('lit_s')]) == 0
    return tmp / 'export', source


def _assert_features_match(features, source, size=64):
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = source.forward_intermediates(image, indices=features.feature_info.out_indices,
                                                intermediates_only=True)
        got = features(image)
    assert [f.shape[1] for f in got] == features.feature_info.channels()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.slow
def test_hf_hub_name_loads_from_offline_cache(offline_hub, lit_s_export):
    export, source = lit_s_export
    offline_hub('my-org/lit_s_converted', export)
    model = timm.create_model('hf-hub:my-org/lit_s_converted', pretrained=True).eval()
    assert model.pretrained_cfg['hf_hub_id'] == 'my-org/lit_s_converted'
    assert_same_tensors(model, source.state_dict(), same_keys=True)
    _assert_features_match(timm.create_model('hf-hub:my-org/lit_s_converted', pretrained=True,
                                             features_only=True).eval(), source)


@pytest.mark.slow
def test_hf_hub_id_overlay_replaces_the_release_url(offline_hub, lit_s_export):
    export, source = lit_s_export
    assert timm.get_pretrained_cfg('lit_s.in1k').hf_hub_id is None  # no converted copy is published
    offline_hub('my-org/lit_s.in1k', export)
    overlay = dict(hf_hub_id='my-org/lit_s.in1k')  # a published converted copy beats the release url
    assert_same_tensors(timm.create_model('lit_s.in1k', pretrained=True, pretrained_cfg_overlay=overlay,
                                          **SMALL['lit_s']), source.state_dict(), same_keys=True)
    _assert_features_match(timm.create_model('lit_s.in1k', pretrained=True, features_only=True,
                                             pretrained_cfg_overlay=overlay, **SMALL['lit_s']).eval(), source)


def test_missing_repo_in_offline_cache_fails_fast(offline_hub):
    from huggingface_hub.errors import LocalEntryNotFoundError
    with pytest.raises(LocalEntryNotFoundError):
        timm.create_model('hf-hub:my-org/not_cached')


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi in the converter's push; records what would be uploaded."""
    calls = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(('create_repo', repo_id, dict(private=private, exist_ok=exist_ok)))
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def file_exists(self, repo_id, filename, revision=None, **kwargs):
        self.calls.append(('file_exists', repo_id, filename))
        return False

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        self.calls.append(('upload_folder', repo_id, files))
        return type('CommitInfo', (), {'commit_url': f'https://huggingface.co/{repo_id}/commit/{COMMIT}'})()


@pytest.fixture
def hub_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(tmp_path / 'no_token_file'))
    monkeypatch.setattr(hf_constants, 'HF_STORED_TOKENS_PATH', str(tmp_path / 'no_stored_tokens'))
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')


@pytest.fixture(scope='module')
def lit_ti_checkpoint(tmp_path_factory):
    source = _source('lit_ti', seed=3)
    return _write_checkpoint(tmp_path_factory.mktemp('lit_ti') / 'lit_ti.pth', source.state_dict(), 'bare'), source


def test_push_uploads_the_verified_files(tmp_path, capsys, monkeypatch, hub_token, lit_ti_checkpoint):
    RecordingHfApi.calls = []
    monkeypatch.setattr(lesa_lit_models.convert, 'HfApi', RecordingHfApi)
    checkpoint, source = lit_ti_checkpoint
    card = tmp_path / 'card.json'
    card.write_text(json.dumps({'citation': '@article{lit2021}', 'details': {'Dataset': 'ImageNet-1k'}}))
    out_dir = tmp_path / 'export'
    code, out, err = _run(['lit_ti', checkpoint, out_dir, '--push-to-hub', 'my-org/lit_ti.test', '--private',
                           '--model-card', card], capsys)
    assert code == 0, err

    assert RecordingHfApi.calls[0] == ('create_repo', 'my-org/lit_ti.test', dict(private=True, exist_ok=True))
    uploads = [c for c in RecordingHfApi.calls if c[0] == 'upload_folder']
    assert len(uploads) == 1 and uploads[0][1] == 'my-org/lit_ti.test'
    files = uploads[0][2]
    assert sorted(files) == ['README.md', 'config.json', 'model.safetensors']
    assert files['model.safetensors'] == (out_dir / 'model.safetensors').read_bytes()
    assert json.loads(files['config.json']) == json.loads((out_dir / 'config.json').read_text())
    readme = files['README.md'].decode()
    assert "timm.create_model('hf-hub:my-org/lit_ti.test', pretrained=True)" in readme
    assert '# Model card for lit_ti.test' in readme
    assert '## Citation' in readme and '@article{lit2021}' in readme
    assert readme == (out_dir / 'README.md').read_text()
    assert f'https://huggingface.co/my-org/lit_ti.test/commit/{COMMIT}' in out
    assert_same_tensors(timm.create_model(f'local-dir:{out_dir}', pretrained=True), source.state_dict(),
                        same_keys=True)


@pytest.mark.slow
def test_a_converted_folder_loads_in_transformers_timm_wrapper_and_pipeline(tmp_path, capsys, lit_ti_checkpoint):
    transformers = pytest.importorskip('transformers')
    from PIL import Image
    checkpoint, source = lit_ti_checkpoint
    out_dir = tmp_path / 'export'
    code, _, err = _run(['lit_ti', checkpoint, out_dir], capsys)
    assert code == 0, err
    config = json.loads((out_dir / 'config.json').read_text())
    assert config['model_args'] == {k: list(v) for k, v in SMALL['lit_ti'].items()}  # what the user passed
    model = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    classifier = transformers.TimmWrapperForImageClassification.from_pretrained(out_dir).eval()
    features = transformers.TimmWrapperModel.from_pretrained(out_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier(pixel_values=x).logits, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features(pixel_values=x).pooler_output,
                                   model.forward_head(model.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    top = transformers.pipeline('image-classification', model=str(out_dir))(image)[0]
    preprocess = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        probabilities = model(preprocess(image)[None]).softmax(-1)[0]
    assert top['score'] == pytest.approx(probabilities.max().item(), abs=1e-4)


def test_push_without_a_token_fails_before_converting(tmp_path, capsys, hub_token, monkeypatch, lit_ti_checkpoint):
    monkeypatch.delenv('HF_TOKEN')
    out_dir = tmp_path / 'export'
    code, out, err = _run(['lit_ti', lit_ti_checkpoint[0], out_dir, '--push-to-hub', 'my-org/lit_ti'], capsys)
    assert code == 1
    assert 'no Hugging Face token found' in err and 'hf auth login' in err and 'HF_TOKEN' in err
    assert 'Traceback' not in err
    assert not out_dir.exists()


def test_push_in_offline_mode_fails_before_converting(tmp_path, capsys, hub_token, monkeypatch, lit_ti_checkpoint):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    out_dir = tmp_path / 'export'
    code, out, err = _run(['lit_ti', lit_ti_checkpoint[0], out_dir, '--push-to-hub', 'my-org/lit_ti'], capsys)
    assert code == 1 and 'HF_HUB_OFFLINE is set' in err
    assert not out_dir.exists()


def test_push_without_network_fails_cleanly_and_keeps_the_export(tmp_path, capsys, hub_token, monkeypatch,
                                                                 lit_ti_checkpoint):
    import huggingface_hub.constants as hf_constants
    with socket.socket() as s:  # a port nothing listens on: the real hub client gets "connection refused"
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hf_constants, 'ENDPOINT', f'http://127.0.0.1:{port}')
    out_dir = tmp_path / 'export'
    code, out, err = _run(['lit_ti', lit_ti_checkpoint[0], out_dir, '--push-to-hub', 'my-org/lit_ti', '--no-verify'],
                          capsys)
    assert code == 1
    assert 'Pushing to my-org/lit_ti failed' in err and 'The converted files are still on disk' in err
    assert 'Traceback' not in err
    assert (out_dir / 'model.safetensors').is_file() and 'Wrote' in out


def test_refuses_a_non_empty_output_dir_unless_overwrite(tmp_path, capsys, lit_ti_checkpoint):
    out_dir = tmp_path / 'export'
    out_dir.mkdir()
    (out_dir / 'notes.txt').write_text('keep me')
    code, out, err = _run(['lit_ti', lit_ti_checkpoint[0], out_dir], capsys)
    assert code == 1 and 'is not empty (notes.txt)' in err and '--overwrite' in err
    assert sorted(p.name for p in out_dir.iterdir()) == ['notes.txt']

    code, out, err = _run(['lit_ti', lit_ti_checkpoint[0], out_dir, '--overwrite', '--no-verify'], capsys)
    assert code == 0, err
    assert 'kept other files already there: notes.txt' in out and 'Not verified' in out
    assert (out_dir / 'notes.txt').read_text() == 'keep me'
    reloaded = timm.create_model(f'local-dir:{out_dir}', pretrained=True)
    assert_same_tensors(reloaded, lit_ti_checkpoint[1].state_dict(), same_keys=True)


def test_wrong_architecture_fails_with_the_checkpoint_error_not_a_traceback(tmp_path, lit_ti_checkpoint):
    result = subprocess.run(
        [sys.executable, '-m', 'lesa_lit_models.cli', 'lit_s', str(lit_ti_checkpoint[0]), str(tmp_path / 'export')],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "lesa-lit-convert: error: Checkpoint does not match architecture 'lit_s'" in result.stderr
    assert 'Pick the model name that matches the file' in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'export').exists()


@pytest.mark.parametrize('argv, message', [
    (['resnet50', 'x.pth', 'out'], "Unknown model 'resnet50': expected one of"),
    (['lit_ti', 'missing.pth', 'out'], 'Checkpoint file not found'),
    (['lit_ti', 'CKPT', 'out', '--model-kwargs', 'no_such_arg=1'], 'does not accept the model kwargs'),
])
def test_bad_arguments_fail_with_a_clear_message(tmp_path, capsys, lit_ti_checkpoint, argv, message):
    argv = [str(lit_ti_checkpoint[0]) if a == 'CKPT' else str(tmp_path / a) if a in ('out', 'x.pth', 'missing.pth')
            else a for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 1 and message in err and 'Traceback' not in err


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--help'])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ('MODEL_NAME', 'ORIGINAL', 'OUTPUT_DIR', '--push-to-hub', '--model-kwargs', '--overwrite',
                     '--no-verify', "local-dir:OUTPUT_DIR", 'hf auth login', 'lesa_resnet50_det', 'lit_ti'):
        assert expected in text
