"""CUDA paths the CPU never takes (skipped without a GPU): fused kernels, operand layouts, DCN on the device."""
import contextlib
import copy

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lesa_lit_models  # noqa: F401  (registers the models)
from lesa_lit_models.layers.deform_conv import DeformConv2dPack
from lesa_lit_models.layers.lesa_attention import Lesa
from lesa_lit_models.lit import LITAttention
from _helpers import assert_same_results, outputs_and_grads, randomise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_fused_lesa_runs_on_the_memory_efficient_kernel_and_is_as_accurate_as_the_reference(mode):
    """On CUDA v keeps its own (narrow) head dim, which only the memory-efficient kernel takes: forcing that kernel
    fails on any operand it cannot run (a non-contiguous v, say) instead of falling back to an L x L math path.
    Against a float64 computation of the reference, the fused float32 result is no less accurate than the
    reference's own float32 result, outputs and every gradient."""
    torch.manual_seed(0)
    exact = randomise(Lesa(256, (16, 24), groups=8, pos_embed='detection_qr', attn_impl='reference'))
    exact = exact.cuda().double().train(mode == 'train')
    x = torch.randn(2, 256, 16, 24, device='cuda', dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 256, 16, 24, device='cuda', dtype=torch.float64)
    exact_results = outputs_and_grads(copy.deepcopy(exact), x, grad_out=grad_out)

    results = {}
    for impl in ('fused', 'reference'):
        module = copy.deepcopy(exact).float()
        module.attn_impl = impl
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if impl == 'fused' else contextlib.nullcontext():
            results[impl] = outputs_and_grads(module, x.float(), grad_out=grad_out.float())
    fused, reference = results['fused'], results['reference']
    assert _rel_err(fused['output:0'], exact_results['output:0']) <= max(
        2 * _rel_err(reference['output:0'], exact_results['output:0']), 1e-6)
    for name, g_exact in exact_results.items():
        # bn_similarity.bias: true gradient exactly zero (softmax is shift invariant)
        if name.startswith('grad:') and not name.endswith('bn_similarity.bias'):
            assert _rel_err(fused[name], g_exact) <= max(2 * _rel_err(reference[name], g_exact), 1e-5), name


def test_lit_row_bands_on_cuda_match_one_band_outputs_and_grads():
    torch.manual_seed(0)
    attn = LITAttention(96, num_heads=4, rel_pos_grid=(6, 6)).cuda().train()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.)
    # bands of three query rows of an 8x10 map
    banded = LITAttention(96, num_heads=4, rel_pos_grid=(6, 6), max_chunk_logits=2 * 4 * 3 * 10 * 80).cuda().train()
    banded.load_state_dict(attn.state_dict())
    x = torch.randn(2, 80, 96, device='cuda')
    grad_out = torch.randn(2, 80, 96, device='cuda')
    assert_same_results(outputs_and_grads(banded, x, (8, 10), grad_out=grad_out),
                        outputs_and_grads(attn, x, (8, 10), grad_out=grad_out), rtol=1e-5, atol=1e-5,
                        grads=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize('name', ['lesa_resnet50_det', 'lit_s'])
def test_detection_backbone_trains_under_bf16_autocast_on_cuda(name):
    model = timm.create_model(name, features_only=True, img_size=256) if name.startswith('lesa') else \
        timm.create_model(name, features_only=True)
    model = model.cuda().train()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        features = model(torch.randn(2, 3, 256, 320 if name == 'lit_s' else 256, device='cuda'))
    sum(f.float().sum() for f in features).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(f.float()).all() for f in features)
    assert len(grads) > 0.9 * len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)


def test_deformable_conv_on_cuda_matches_cpu():
    torch.manual_seed(0)
    conv = DeformConv2dPack(16, 16, 3, padding=1, groups=2, bias=False)
    torch.nn.init.normal_(conv.conv_offset.weight, std=0.1)
    x = torch.randn(2, 16, 12, 10)
    torch.testing.assert_close(copy.deepcopy(conv).cuda()(x.cuda()).cpu(), conv(x), rtol=1e-4, atol=1e-4)
