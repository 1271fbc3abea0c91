"""ONNX: every model exports with ``torch.onnx.export(..., dynamo=True)`` and onnxruntime computes what eager does.

onnxruntime (CPU) against eager PyTorch in float32 on the same input, judged against the model's own float32
rounding: the error must be within 10x of eager float32 against eager float64, or within 1e-4 of the largest output
where that is larger (a random deep network amplifies rounding, see ``docs/attention.md``). Weights are random
everywhere (deformable offsets and LayerNorm affine parameters included) and BatchNorm statistics calibrated on
random inputs, as a trained network's match its activations. Models are the SMALL configurations (_helpers.py; the
exporter's tracing, not the arithmetic, is the cost): every path of each family, 64x64 inputs, the banded
attention of the eager models one query row per band. Batch, height and width are dynamic where the model takes
any size; each file runs at a second size and batch (a fixed-size LESA classifier: a second batch).
"""
import copy
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
pytest.importorskip('openvino')

from lesa_lit_models import timm_script  # noqa: E402
from lesa_lit_models.export import RUNTIMES, check_onnx, export_onnx, onnx_session, takes_any_size  # noqa: E402
from lesa_lit_models import package_models  # noqa: E402
from lesa_lit_models.layers.lesa_fused import _relative_bias_attention  # noqa: E402
from lesa_lit_models.layers.banded_attention import exported_bias_attention  # noqa: E402
from lesa_lit_models.lit import _offset_bias_attention  # noqa: E402
from _helpers import SIZE, SMALL, TRACED, as_list, calibrate_batchnorms, small_model  # noqa: E402

# (model, features_only): every run exports each attention kind in the mode it is deployed in (the LESA and LIT-Ti
# classifiers, the LESA detection and LIT-S backbones' features); ``pytest -m exhaustive`` adds the other mode of each
# and the wider or deeper siblings (the same code at other widths and depths)
EXPORT_CASES = [('lesa_resnet50', False), ('lesa_resnet50_det', True), ('lit_ti', False), ('lit_s', True)]
EXHAUSTIVE_CASES = [('lesa_resnet50', True), ('lesa_resnet50_det', False), ('lit_ti', True), ('lit_s', False),
                    ('lesa_wrn50', False), ('lesa_wrn50_det', True), ('lit_m', True), ('lit_b', False)]


def _calibrated(name: str, features_only: bool) -> nn.Module:
    """The small model in float64, random everywhere, its BatchNorm statistics those of random inputs."""
    model = small_model(name, features_only=features_only, dtype=torch.float64, **TRACED[name])
    batches = [torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64) for _ in range(4)]
    return calibrate_batchnorms(model, batches).eval()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_every_registered_model_has_an_export_case():
    assert {name for name, _ in EXPORT_CASES + EXHAUSTIVE_CASES} == set(package_models()) == set(TRACED)


def _runtime_cases():
    """(name, features_only, runtimes): each export run by onnxruntime and OpenVINO."""
    for name, features_only in EXPORT_CASES + EXHAUSTIVE_CASES:
        mode = 'features' if features_only else 'classifier'
        exhaustive = [pytest.mark.exhaustive] if (name, features_only) in EXHAUSTIVE_CASES else []
        yield pytest.param(name, features_only, RUNTIMES, id=f'{name}-{mode}', marks=exhaustive)


@pytest.mark.slow
@pytest.mark.parametrize('name, features_only, runtimes', _runtime_cases())
def test_runtimes_match_eager_within_the_models_own_rounding(name, features_only, runtimes, tmp_path):
    """One export per model and mode, run by each runtime at the export size and at a second size (or batch)."""
    model64 = _calibrated(name, features_only)
    model = copy.deepcopy(model64).float()
    any_size = takes_any_size(model)
    assert any_size == (name not in ('lesa_resnet50', 'lesa_wrn50'))  # LESA's classification tables take one size
    gen = torch.Generator().manual_seed(1)
    path = export_onnx(model, tmp_path / 'model.onnx', torch.randn(2, 3, SIZE, SIZE, generator=gen))
    sessions = {runtime: onnx_session(path, runtime) for runtime in runtimes}
    second = (3, 3, SIZE + 32, SIZE + 64) if any_size else (3, 3, SIZE, SIZE)
    for shape in ((1, 3, SIZE, SIZE), second):
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            want, truth = as_list(model(x.float())), as_list(model64(x))
        for runtime, run in sessions.items():
            got = [torch.from_numpy(o) for o in run(x.float().numpy())]
            assert [g.shape for g in got] == [w.shape for w in want]
            for i, (g, w, t) in enumerate(zip(got, want, truth)):
                error, rounding, scale = _max_abs(g, w), _max_abs(w, t), t.abs().max().item()
                print(f'{name} {"features" if features_only else "classifier"} {tuple(shape)} output {i}: {runtime} '
                      f'vs eager fp32 {error:.2e}, eager fp32 vs fp64 {rounding:.2e}, max |output| {scale:.3g}')
                assert error <= max(10 * rounding, 1e-4 * scale), (runtime, error, rounding, scale)


@pytest.mark.parametrize('op', [_relative_bias_attention, _offset_bias_attention], ids=['lesa', 'lit'])
def test_exported_form_of_the_banded_attention_equals_the_operator(op):
    """What an ONNX export records (plain matmul / softmax, one grid row per scan step) equals the operator (in bands
    of two rows), in float64, with the operator's output layout."""
    grid, groups, dim = (7, 3), 2, 4
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, groups, grid[0] * grid[1], dim, dtype=torch.float64, generator=gen) for _ in range(3))
    if op is _relative_bias_attention:
        query_bias = torch.randn(*q.shape[:-1], dim + 1, dtype=torch.float64, generator=gen)
        shared_bias = torch.randn(grid[0] ** 2 + grid[1] ** 2, dim, dtype=torch.float64, generator=gen)
    else:
        query_bias = None
        shared_bias = torch.randn(groups, 2 * grid[0] - 1, 2 * grid[1] - 1, dtype=torch.float64, generator=gen)
    row_logits = q.shape[0] * groups * grid[1] * q.shape[2]
    for out_transposed in (False, True):
        want = op(q, k, v, query_bias, shared_bias, list(grid), 2 * row_logits, .5, out_transposed)
        got = exported_bias_attention(op, q, k, v, query_bias, shared_bias, grid, .5, out_transposed)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got.stride() == want.stride()


@pytest.mark.slow
def test_export_command_writes_a_checked_model_onnx_into_a_converted_folder(tmp_path):
    """``lesa-lit-export FOLDER`` on a timm-format folder (what lesa-lit-convert writes): model.onnx beside its
    weights, checked by onnxruntime and OpenVINO at the export size and another, exit status 0; the same file against
    other weights fails the check."""
    kwargs = dict(SMALL['lit_s'], num_classes=10)
    model = timm.create_model('lit_s', **kwargs)
    folder = tmp_path / 'lit_s_tiny'
    timm.models.save_for_hf(model, folder, model_args=kwargs)
    result = subprocess.run([sys.executable, '-m', 'lesa_lit_models.export', str(folder), '--input-size', '64', '96',
                             '--runtime', 'onnxruntime', 'openvino'], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    onnx_file = folder / 'model.onnx'
    assert f'-> {onnx_file} ({onnx_file.stat().st_size:,} bytes)' in result.stdout
    assert 'dynamic batch, height and width' in result.stdout
    checked = [line for line in result.stdout.splitlines() if line.startswith('Checked on a random')]
    assert [line.split(' vs eager')[0] for line in checked] == [
        f'Checked on a random {size} input: {runtime}' for runtime in ('onnxruntime', 'openvino')
        for size in ('1x3x64x96', '1x3x64x128')]
    assert all(line.endswith(': ok') for line in checked)

    other = timm.create_model('lit_s', **kwargs)  # other random weights
    checks = check_onnx(other, onnx_file, [torch.randn(1, 3, 64, 96)])
    assert not checks[0].passed and 'FAILED' in checks[0].summary()


def test_export_command_names_the_problem():
    result = subprocess.run([sys.executable, '-m', 'lesa_lit_models.export', 'resnet50'], capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert 'neither a folder nor a model of this package' in result.stderr


# a stand-in for timm's validate.py (tests run without a timm checkout): the same timm calls, no edit for this package
_VALIDATE_SCRIPT = '''
import argparse

import timm
import torch
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.utils import ParseKwargs, accuracy

parser = argparse.ArgumentParser()
parser.add_argument('--data-dir', required=True)
parser.add_argument('--model', required=True)
parser.add_argument('--num-classes', type=int)
parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)

if __name__ == '__main__':
    args = parser.parse_args()
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs).eval()
    config = resolve_data_config(vars(args), model=model)
    loader = create_loader(create_dataset('', root=args.data_dir), batch_size=2, use_prefetcher=False, **config)
    top1, count = 0., 0
    with torch.no_grad():
        for images, targets in loader:
            top1 += accuracy(model(images), targets, topk=(1,))[0].item() * len(images)
            count += len(images)
    print(f'{args.model}: {count} images at {config["input_size"]}, top-1 {top1 / count:.1f}')
'''


@pytest.mark.slow
def test_timm_scripts_run_with_the_models_registered(tmp_path):
    """``python -m lesa_lit_models.timm_script validate.py --model lit_ti ...`` evaluates on an ImageFolder; the
    same script run by itself does not know the model."""
    from PIL import Image
    for label in ('cat', 'dog'):
        (tmp_path / 'data' / label).mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (40, 32), (80 * i, 60, 200)).save(tmp_path / 'data' / label / f'{i}.png')
    script = tmp_path / 'validate.py'
    script.write_text(_VALIDATE_SCRIPT)
    args = [str(script), '--data-dir', str(tmp_path / 'data'), '--model', 'lit_ti', '--num-classes', '2',
            '--model-kwargs', 'embed_dims=(8,16,32,32)', 'depths=(1,1,1,1)', 'num_heads=(1,2,2,4)']
    result = subprocess.run([sys.executable, '-m', 'lesa_lit_models.timm_script', *args], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'lit_ti: 4 images at (3, 224, 224), top-1 ' in result.stdout
    plain = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode != 0 and 'Unknown model (lit_ti)' in plain.stderr
    with pytest.raises(SystemExit, match='is not a file'):
        timm_script.main([str(tmp_path / 'nope.py')])
