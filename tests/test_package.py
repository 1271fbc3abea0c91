"""Foundation: the package installs, registers its models with timm, and the set-up is idempotent."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import lesa_lit_models

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_MODELS = {
    'lesa_resnet50', 'lesa_wrn50', 'lesa_resnet50_det', 'lesa_wrn50_det', 'lit_ti', 'lit_s', 'lit_m', 'lit_b',
}


def test_installed_metadata_matches_package():
    assert importlib.metadata.version('lesa-lit-models') == lesa_lit_models.__version__
    entry_points = importlib.metadata.entry_points(group='console_scripts')
    assert 'lesa_lit_models.cli:main' in {ep.value for ep in entry_points if ep.name == 'lesa-lit-convert'}


def test_import_registers_every_model_with_timm():
    registered = set(timm.list_models(['lesa_*', 'lit_*']))
    assert EXPECTED_MODELS <= registered
    tagged = set(timm.list_models(['lesa_*', 'lit_*'], include_tags=True))
    for name in EXPECTED_MODELS:
        assert any(tag.startswith(name + '.') for tag in tagged), f'{name} has no pretrained tag'
    # direct downloads exist for LIT (GitHub releases); LESA's are OneDrive folders (see the pretrained cfg notes)
    assert set(timm.list_pretrained(['lesa_*', 'lit_*'])) == {f'lit_{s}.in1k' for s in ('ti', 's', 'm', 'b')}


def test_registration_happens_in_a_fresh_interpreter():
    code = 'import timm, lesa_lit_models; print(len(timm.list_models(["lesa_*", "lit_*"])))'
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True).stdout
    assert int(out) >= len(EXPECTED_MODELS)


def test_features_demo_prints_shapes_and_strides():
    out = subprocess.run(
        [sys.executable, '-m', 'lesa_lit_models.demo', 'lit_ti'], check=True, capture_output=True, text=True,
    ).stdout
    assert 'lit_ti: input (1, 3, 224, 224)' in out
    assert 'stride 32  (1, 512, 7, 7)' in out


def test_mmcv_compiled_ops_work_on_cpu():
    import torch
    from mmcv.ops import DeformConv2dPack, RoIAlign, nms

    x = torch.arange(64.).view(1, 1, 8, 8)
    pooled = RoIAlign((1, 1), spatial_scale=1.0, sampling_ratio=1, aligned=False)(x, torch.tensor([[0., 0., 0., 2., 2.]]))
    assert pooled.item() == pytest.approx(x[0, 0, 1, 1].item())
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    dcn = DeformConv2dPack(1, 2, 3, padding=1)
    assert dcn(x).shape == (1, 2, 8, 8)


@pytest.mark.slow
def test_setup_script_is_idempotent_and_reuses_the_mmcv_wheel():
    venv = Path(sys.prefix)
    if not (ROOT / 'scripts' / 'setup_env.sh').exists() or venv == Path(sys.base_prefix):
        pytest.skip('not running inside the project virtual environment')
    cache = Path(os.environ.get('LESA_LIT_CACHE', Path.home() / '.cache' / 'lesa-lit-models'))
    wheels_before = {p: p.stat().st_mtime for p in (cache / 'wheels').glob('mmcv-*.whl')}
    assert wheels_before, 'the first set-up should have cached the mmcv wheel'
    result = subprocess.run(
        ['bash', str(ROOT / 'scripts' / 'setup_env.sh')], env=dict(os.environ, VENV=str(venv)),
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'reusing cached wheel' in result.stdout
    assert 'compiling mmcv ops' not in result.stdout
    assert {p: p.stat().st_mtime for p in (cache / 'wheels').glob('mmcv-*.whl')} == wheels_before
    assert 'Environment ready' in result.stdout
