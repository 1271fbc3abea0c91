"""benchmarks/: the harness measures memory exactly, reports OOM instead of dying and writes well-formed outputs.

No timing assertions: the figures depend on the machine and its load.
"""
import json
import multiprocessing as mp
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a tool of the repository, not part of the installed package

from benchmarks import measure, report  # noqa: E402
from benchmarks.cases import MODES, Case, comparisons, compile_suite, suite  # noqa: E402
from benchmarks.run import run_in_child  # noqa: E402

PACKAGE_MODELS = {
    'lesa_resnet50', 'lesa_wrn50', 'lesa_resnet50_det', 'lesa_wrn50_det', 'lit_ti', 'lit_s', 'lit_m', 'lit_b',
}
PEERS = {'resnet50', 'wide_resnet50_2', 'botnet26t_256', 'pvt_v2_b1', 'pvt_v2_b2', 'swin_tiny_patch4_window7_224'}


def test_profiled_peak_is_the_high_water_mark_of_live_tensors():
    import torch

    def step():
        a = torch.empty(1_000_000)  # 4 MB live
        b = torch.empty(2_000_000)  # 12 MB
        del a  # 8 MB
        c = torch.empty(3_000_000)  # 20 MB: the peak
        del b, c
        torch.empty(1_000_000)

    assert measure.cpu_profiled_peak(step) == 20_000_000


def test_full_suite_covers_every_model_peer_mode_and_comparison():
    cases = suite()
    assert {c.model for c in cases} >= PACKAGE_MODELS | PEERS
    assert len({c.key for c in cases}) == len(cases)
    for model in PACKAGE_MODELS | PEERS:
        assert {c.mode for c in cases if c.model == model} == set(MODES), model
    lesa = [c for c in cases if c.model == 'lesa_resnet50_det']
    assert {c.img_size for c in lesa} == {(1024, 1024)} and all(c.detection and c.batch_size == 1 for c in lesa)
    assert {(c.attn_impl, c.grad_checkpointing, c.frozen_stages) for c in lesa if c.mode == 'fwd+bwd'} == {
        (impl, ckpt, frozen) for impl in ('fused', 'reference') for ckpt in (False, True) for frozen in (0, 1)}
    assert {c.attn_impl for c in cases if c.model == 'lit_s' and c.img_size == (800, 1344)} == {'fused', 'reference'}
    peers = {(c.model, c.img_size) for c in cases if c.detection and c.attn_impl is None}
    assert peers == {('mmdet_resnet50_dcn', (1024, 1024)), ('mmdet_wide_resnet50_dcn', (1280, 1280)),
                     ('wide_resnet50_2', (1280, 1280)), ('pvt_v2_b1', (800, 1344)), ('pvt_v2_b2', (800, 1344))}
    wide = {c.attn_impl for c in cases if c.model == 'lesa_wrn50_det' and c.mode == 'fwd+bwd'}
    assert wide == {'fused'}  # the reference's 1280x1280 training step is far over the memory cap
    assert {c.img_size for c in cases if c.model == 'botnet26t_256'} == {(256, 256)}

    by_title = {c.title: c for c in comparisons(cases)}
    # fused vs reference: the same settings, and without checkpointing also vs the checkpointed reference
    assert {t for t in by_title if t.startswith('lesa_resnet50_det') and 'vs reference' in t} == {
        'lesa_resnet50_det 1024x1024 fwd: fused vs reference',
        *(f'lesa_resnet50_det 1024x1024 fwd+bwd{frozen}: {pair}' for frozen in ('', ' frozen_stages=1')
          for pair in ('fused vs reference', 'fused vs reference +ckpt', 'fused +ckpt vs reference +ckpt'))}
    lesa_same = by_title['lesa_resnet50_det 1024x1024 fwd+bwd: fused +ckpt vs reference +ckpt']
    assert lesa_same.slow == replace(lesa_same.fast, attn_impl='reference') and lesa_same.fast.grad_checkpointing
    assert {'lit_s 800x1344 fwd: fused vs reference', 'lit_s 800x1344 fwd+bwd: fused vs reference'} <= set(by_title)
    # each backbone's plain training step against its same-size peers
    vs_peers = [c for c in by_title.values() if c.slow.detection and c.slow.attn_impl is None]
    assert {(c.fast.model, c.slow.model, c.slow.img_size) for c in vs_peers} == {
        ('lesa_resnet50_det', 'mmdet_resnet50_dcn', (1024, 1024)),
        ('lesa_wrn50_det', 'mmdet_wide_resnet50_dcn', (1280, 1280)),
        ('lesa_wrn50_det', 'wide_resnet50_2', (1280, 1280)),
        ('lit_ti', 'pvt_v2_b1', (800, 1344)), ('lit_s', 'pvt_v2_b2', (800, 1344))}
    assert all(c.fast.key.endswith('-fwd+bwd-fused') and c.fast.img_size == c.slow.img_size for c in vs_peers)
    wide_peer = next(c for c in cases if c.model == 'wide_resnet50_2' and c.detection)
    assert dict(wide_peer.model_kwargs) == {'out_indices': (1, 2, 3, 4)}  # C2-C5, as the LESA backbone's

    on_gpu = suite(device='cuda')
    assert all((c.warmup, c.iters) == (3, 10) for c in on_gpu)
    mixed = [c for c in on_gpu if c.bf16]
    assert {c.model for c in mixed} == {'lit_s', 'lit_ti'} and all(c.detection for c in mixed)
    assert [c.key for c in on_gpu if not c.bf16] == [c.key for c in cases]
    assert len({c.key for c in on_gpu}) == len(on_gpu)
    gpu_titles = {c.title for c in comparisons(on_gpu)}
    assert 'lit_s 800x1344 fwd+bwd: fused +bf16 vs reference +bf16' in gpu_titles
    assert not any('+bf16 vs reference' in t and not t.endswith('+bf16') for t in gpu_titles)


def test_detection_backbones_are_built_by_the_mmdet_adapter_with_its_freezing():
    pytest.importorskip('mmdet')
    import torch
    from lesa_lit_det import TimmBackbone
    model = measure._detection_backbone(Case('resnet18', (64, 64), 'fwd+bwd', detection=True, frozen_stages=1,
                                             model_kwargs=(('out_indices', (1, 2, 3, 4)),)))
    assert isinstance(model, TimmBackbone) and model.norm_eval and model.frozen_stages == 1
    model.train()
    frozen = {name.split('.')[2] for name, p in model.named_parameters() if not p.requires_grad}  # body.model.*
    assert frozen == {'conv1', 'bn1', 'layer1'}
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    peer = measure._detection_backbone(Case('mmdet_resnet50_dcn', (128, 128), 'fwd+bwd', detection=True))
    assert type(peer).__name__ == 'ResNet' and peer.norm_eval and peer.frozen_stages == -1
    assert [f.shape[1] for f in peer(torch.randn(1, 3, 128, 128))] == [256, 512, 1024, 2048]


def test_the_wide_mmdet_peer_is_torchvisions_wide_resnet50_with_dcn_in_stages_2_to_4():
    pytest.importorskip('mmdet')
    import timm
    import torch
    peer = measure._detection_backbone(Case('mmdet_wide_resnet50_dcn', (128, 128), 'fwd+bwd', detection=True,
                                            frozen_stages=1))
    wide = timm.create_model('wide_resnet50_2', features_only=True, out_indices=(1, 2, 3, 4))
    dcn_weights = {name for name, _ in peer.named_parameters() if 'conv_offset' in name}
    assert {name.split('.')[0] for name in dcn_weights} == {'layer2', 'layer3', 'layer4'}
    # apart from the DCN offset convs, the same layers with the same shapes, in the same order, as timm's
    shapes = [p.shape for name, p in peer.named_parameters() if name not in dcn_weights]
    assert shapes == [p.shape for p in wide.parameters()]
    peer.train()
    assert not any(p.requires_grad for p in peer.layer1.parameters())  # frozen_stages reaches the new layers
    assert not any(m.training for m in peer.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(1, 3, 128, 128)
    assert [f.shape for f in peer(x)] == [f.shape for f in wide(x)]


def test_compile_suite_pairs_every_model_eager_and_compiled_with_the_compile_time_apart(tmp_path):
    cases = compile_suite()
    assert len({c.key for c in cases}) == len(cases)
    assert {(c.model, c.mode, c.compiled) for c in cases} == {
        (m, mode, compiled) for m in PACKAGE_MODELS for mode in MODES for compiled in (False, True)}
    exported = [c for c in cases if c.runtime]  # the detection backbones' forward in each runtime, on the CPU only
    assert {(c.model, c.img_size, c.mode, c.runtime) for c in exported} == {
        (c.model, c.img_size, 'fwd', runtime) for c in cases if c.detection and c.eager
        for runtime in ('onnxruntime', 'openvino')}
    assert not any(c.runtime for c in compile_suite(device='cuda'))
    assert {(c.img_size, c.batch_size) for c in cases if not c.detection} == {((224, 224), 4)}
    assert {c.model for c in cases if c.detection} == {'lesa_resnet50_det', 'lesa_wrn50_det', 'lit_s', 'lit_ti'}
    assert {c.img_size for c in cases if c.model.startswith('lit_') and c.detection} == {(800, 1344)}
    by_title = {c.title: c for c in comparisons(cases)}
    assert len(by_title) == len(cases) - sum(c.eager for c in cases)
    compiled = by_title['lesa_resnet50_det 1024x1024 fwd+bwd: compiled vs eager']
    assert compiled.slow == replace(compiled.fast, compiled=False)
    assert by_title['lit_s 224x224 fwd+bwd: compiled vs eager'].slow.key == 'lit_s-224x224-b4-fwd+bwd'
    ort = by_title['lit_s 800x1344 fwd: onnxruntime vs eager']
    assert ort.slow == replace(ort.fast, onnxruntime=False) and ort.slow.detection
    assert by_title['lit_s 800x1344 fwd: openvino vs eager'].slow == ort.slow

    # a runtime against eager by the resident-size rise of their runs, the one measure taken alike for both
    results = {c.key: {'status': 'ok', 'peak_bytes': 2 ** 30, 'img_per_s': 2. if c.eager else 3., 'params_m': 25.,
                       'runs_rss_rise_bytes': {'onnxruntime': 2 ** 28, 'openvino': 2 ** 27}.get(c.runtime, 2 ** 29),
                       **({'compile_s': 42.} if c.compiled else {}), **({'export_s': 7.} if c.runtime else {})}
               for c in cases}
    meta = {'command': 'python -m benchmarks.run --compile', 'date': 'today', 'commit': 'abc1234', 'mem_limit_gb': 12.,
            'load_before': '0', 'load_after': '0',
            'device': {'name': 'cuda', 'description': 'test GPU', 'torch': '2', 'timm': '1', 'threads': 1}}
    report.write_markdown(str(tmp_path / 'results.md'), meta, cases, results)
    md = (tmp_path / 'results.md').read_text()
    assert '## torch.compile, onnxruntime and OpenVINO vs eager' in md and '## Fused vs reference' not in md
    assert '| comparison | memory ratio | speed ratio | compile / export (s) |\n|---|---|---|---|\n' in md
    assert '| lesa_resnet50_det 1024x1024 fwd+bwd: compiled vs eager | 1.00x | 1.50x | 42 |' in md
    assert '| lesa_resnet50_det | 1024x1024 | default +compile |' in md
    assert '| lit_s 800x1344 fwd: onnxruntime vs eager | 2.00x | 1.50x | 7 |' in md
    assert '| lit_s 800x1344 fwd: openvino vs eager | 4.00x | 1.50x | 7 |' in md
    assert '| lit_s | 800x1344 | default +openvino |' in md


def _fake_results(cases, oom_keys=()):
    """Results where fused cases take half the time and a tenth of the memory of the others; the cases of
    ``oom_keys`` ran out of memory under an 11.5 GiB cap."""
    results = {}
    for c in cases:
        lean = c.attn_impl in (None, 'fused')
        results[c.key] = ({'status': 'oom', 'error': 'x', 'mem_limit_gb': 11.5} if c.key in oom_keys else
                          {'status': 'ok', 'peak_bytes': (1 if lean else 10) * 2 ** 30, 'img_per_s': 2. if lean else 1.,
                           'params_m': 25.})
    return results


def test_ratios_mark_lower_bounds_when_the_reference_runs_out_of_memory(tmp_path):
    cases = [c for c in suite() if c.model == 'lesa_resnet50_det']
    oom = {c.key for c in cases if c.attn_impl == 'reference' and c.mode == 'fwd+bwd' and not c.grad_checkpointing}
    results = _fake_results(cases, oom)
    by_title = {r['title']: r for r in (report.ratios(c, results, 12.) for c in comparisons(cases))}

    same = by_title['lesa_resnet50_det 1024x1024 fwd+bwd: fused +ckpt vs reference +ckpt']
    assert same['memory_ratio'] == pytest.approx(10.) and same['speed_ratio'] == pytest.approx(2.)
    assert not same['memory_ratio_is_lower_bound'] and same['cpu_time_speed_ratio'] is None  # no CPU times given
    bound = by_title['lesa_resnet50_det 1024x1024 fwd+bwd: fused vs reference']
    assert bound['memory_ratio_is_lower_bound'] and bound['memory_ratio'] == pytest.approx(11.5)
    assert bound['speed_ratio'] is None

    meta = {'command': 'python -m benchmarks.run', 'date': 'today', 'commit': 'abc1234', 'mem_limit_gb': 12.,
            'load_before': '0', 'load_after': '0',
            'device': {'description': 'test CPU', 'torch': '2', 'timm': '1', 'threads': 1}}
    report.write_json(str(tmp_path / 'results.json'), meta, cases, results)
    subprocess.run([sys.executable, '-m', 'benchmarks.run', '--render', str(tmp_path / 'results.json'),
                    '--out', str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    md = (tmp_path / 'results.md').read_text()
    assert '| comparison | memory ratio | speed ratio |\n|---|---|---|\n' in md
    assert '| lesa_resnet50_det 1024x1024 fwd+bwd: fused vs reference | >11.50x | n/a |\n' in md
    assert '| lesa_resnet50_det | 1024x1024 | reference | 25.0 | 1 | 10.00 GiB | OOM (> 11.5 GiB) | — |' in md
    assert (tmp_path / report.CHART).read_bytes().startswith(b'\x89PNG')


def test_the_authors_reference_figures_are_set_against_this_runs_fused_backbones(tmp_path):
    cases = [c for c in suite() if c.model in ('lit_s', 'lit_ti') and c.detection]
    results = {c.key: {'status': 'ok', 'img_per_s': 1 / 12. if c.mode == 'fwd+bwd' else 1 / 11.,
                       'peak_bytes': 2 ** 30, 'peak_rss_bytes': 3.2e9} for c in cases}
    rows = {r['model']: r for r in report.upstream_rows(cases, results)}
    for model in ('lit_s', 'lit_ti'):
        assert (rows[model]['step_s'], rows[model]['forward_s'], rows[model]['peak_rss_gb']) == pytest.approx(
            (12., 11., 3.2))
    assert rows['lit_s']['upstream'] == {'setting': 'as configured, use_checkpoint=True', 'step_s': 35.8,
                                         'peak_rss_gb': 4.29, 'forward_s': 10.6}
    assert rows['lesa_resnet50_det']['step_s'] is None  # not in this run
    md = tmp_path / 'results.md'
    report.write_markdown(str(md), {'command': 'c', 'date': 'd', 'commit': 'e', 'mem_limit_gb': 12., 'load_before': '0',
                                    'device': {'name': 'cpu', 'description': 'cpu', 'torch': '2', 'timm': '1',
                                               'threads': 2}}, cases, results)
    text = md.read_text()
    assert ('| lit_s | 800x1344 | as configured, use_checkpoint=True | 35.8 s / 10.6 s / 4.29 GB | 12.0 s | 11.0 s | '
            '3.2 GB |\n') in text
    assert '| lit_ti | 800x1344 | COCO backbone | 14.3 s / — / 6.08 GB | 12.0 s | 11.0 s | 3.2 GB |\n' in text
    assert 'lesa_resnet50_det | 1024x1024 | as configured' not in text


def test_a_case_over_the_memory_limit_is_reported_as_oom(tmp_path):
    ctx = mp.get_context('forkserver')
    # resnet18 training at 2048x2048 needs several GiB of activations; the process may grow by well under 1 GiB
    case = Case('resnet18', (2048, 2048), 'fwd+bwd', batch_size=2, iters=1)
    result = run_in_child(ctx, measure.measure, (case, 'cpu', 1, 2.), str(tmp_path / 'log'), 2., timeout_s=300)
    assert result['status'] == 'oom', result


@pytest.mark.slow
def test_quick_run_writes_table_json_and_chart(tmp_path):
    out = tmp_path / 'results'
    subprocess.run([sys.executable, '-m', 'benchmarks.run', '--quick', '--models', 'resnet50', '--threads', '1',
                    '--out', str(out)], cwd=ROOT, check=True, capture_output=True, timeout=600)
    doc = json.loads((out / 'results.json').read_text())
    assert doc['device']['torch'] and doc['device']['threads'] == 1 and doc['commit'] and doc['date']
    results = {c['mode']: c['result'] for c in doc['cases']}
    assert set(results) == set(MODES) and all(r['status'] == 'ok' for r in results.values()), results
    param_bytes = results['fwd']['params_m'] * 1e6 * 4
    for r in results.values():
        assert r['img_per_s'] > 0 and r['peak_bytes'] > r['resident_bytes'] > param_bytes
    # training holds the gradients on top of the weights, which were resident before the runs
    assert results['fwd+bwd']['peak_bytes'] > results['fwd']['peak_bytes'] + param_bytes
    assert results['fwd+bwd']['runs_rss_rise_bytes'] > param_bytes > results['fwd']['runs_rss_rise_bytes'] > 0
    md = (out / 'results.md').read_text()
    assert '| resnet50 | 64x64 | 25.6 |' in md and doc['commit'] in md and doc['date'] in md
    assert '(flags: ' in doc['device']['description'] and doc['device']['description'] in md
    assert '1 intra-op threads' in md and 'are wall time' in md
    assert (out / report.CHART).read_bytes().startswith(b'\x89PNG')


def test_profile_names_one_case_of_either_suite_or_lists_the_keys_to_choose_from():
    from benchmarks.profile import find_case

    case = find_case('lesa_resnet50_det-1024x1024-b1-fwd+bwd-fused')
    assert (case.model, case.img_size, case.mode, case.attn_impl, case.compiled) == (
        'lesa_resnet50_det', (1024, 1024), 'fwd+bwd', 'fused', False)
    assert find_case('lit_ti-800x1344-*-fwd+bwd-compiled').compiled
    with pytest.raises(ValueError, match=r'(?s)cases match .*-ckpt.*-ckpt'):
        find_case('lesa_resnet50_det-1024x1024-b1-fwd+bwd-*-ckpt*')
    with pytest.raises(ValueError, match=r'(?s)no case matches .*lit_s-800x1344-b1-fwd-fused'):
        find_case('lit_s-800x1344-b1-fwd-flash')


def test_library_kernel_share_counts_what_inductor_leaves_to_libraries():
    from benchmarks.profile import library_kernel_share

    times = {'aten::mkldnn_convolution': 40, 'aten::convolution_backward': 20, 'aten::addmm': 5, 'aten::mm': 5,
             'aten::bmm': 2, 'aten::_scaled_dot_product_flash_attention_for_cpu': 4, 'torchvision::deform_conv2d': 4,
             # fused by inductor, or generated kernels named after what they fuse
             'aten::add_': 6, 'aten::native_batch_norm': 8, 'aten::gelu': 3, 'cpp_fused_convolution_backward_0': 3}
    events = [SimpleNamespace(key=k, self_cpu_time_total=t) for k, t in times.items()]
    assert library_kernel_share(events) == pytest.approx(80 / 100)
    assert library_kernel_share([]) == 0.


def test_profile_times_one_step_and_lists_its_operators_by_self_time():
    from benchmarks.profile import profile_case

    report_ = profile_case(Case('resnet18', (64, 64), 'fwd+bwd', warmup=1, iters=1), threads=1, rows=5)
    first, share, table = report_.split('\n', 2)
    assert first.startswith('resnet18-64x64-b1-fwd+bwd: one step ') and '(threads=1;' in first
    percent, bound = re.fullmatch(r'library kernels .*: (\d+)% of the CPU self time; compiling can make the step at '
                                  r'most (\d+\.\d\d)x faster', share).groups()
    assert 30 < int(percent) < 100 and float(bound) == pytest.approx(100 / int(percent), rel=0.02), share
    operators = [line.split()[0] for line in table.splitlines() if line.strip().startswith('aten::')]
    assert len(operators) == 5 and any('conv' in op for op in operators), table


def test_runs_select_cases_by_model_and_by_case_key():
    from benchmarks.run import select

    picked = select(compile_suite(), 'lit_ti,lesa_resnet50_det', '*-fwd+bwd*')
    assert {(c.model, c.img_size, c.mode, c.compiled) for c in picked} == {
        (m, size, 'fwd+bwd', compiled) for m, size in (('lit_ti', (224, 224)), ('lit_ti', (800, 1344)),
                                                       ('lesa_resnet50_det', (1024, 1024)))
        for compiled in (False, True)}
    assert select(compile_suite(), keys='*-800x1344-*-compiled, *-1024x1024-*-compiled') == [
        c for c in compile_suite() if c.compiled and c.detection and c.img_size != (1280, 1280)]
    assert select(suite(), 'lit_*', 'resnet*') == []
