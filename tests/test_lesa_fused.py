"""The fused LESA binary term equals the straightforward computation: outputs, gradients, BatchNorm state."""
import copy
import functools
from unittest import mock

import pytest
import timm
import timm.layers
import torch
import torch.nn as nn
import torchvision.ops
from torch.nn.attention import SDPBackend, sdpa_kernel

from lesa_lit_models.layers import lesa_fused
from lesa_lit_models.layers.lesa_attention import Lesa, detection_qr_binary_reference
from lesa_lit_models.layers.lesa_fused import detection_qr_binary
from _helpers import assert_same_results, calibrate_batchnorms, outputs_and_grads, randomise, \
    relative_logits_2d_oracle


def reference_detection_qr_binary(q, k, v, rel_height, rel_width, grid, bn_similarity):
    """From the formulas: materialise qk and qr (N, G, L, L), run a real BatchNorm2d on their stack."""
    batch, groups, tokens, _ = q.shape
    qk = torch.einsum('ngid,ngjd->ngij', q, k)
    qr = relative_logits_2d_oracle(q, rel_height, rel_width, grid)
    logits = bn_similarity(torch.cat([qk, qr], dim=1)).view(batch, 2, groups, tokens, tokens).sum(1)
    return logits.softmax(-1) @ v


def make_bn(channels, dtype, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, **kwargs).to(dtype)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(channels, generator=gen))
        if bn.track_running_stats:
            bn.running_mean.copy_(torch.randn(channels, generator=gen))
            bn.running_var.copy_(torch.rand(channels, generator=gen) * 2 + 0.5)
            bn.num_batches_tracked.fill_(3)
    return bn


def make_detection_inputs(batch, groups, grid, dim_qk, dim_v, dtype, seed, offset=0.0, spread=0.7):
    gen = torch.Generator().manual_seed(seed)
    height, width = grid
    tokens = height * width

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    q = (torch.randn(batch, groups, tokens, dim_qk, generator=gen, dtype=dtype) * spread + offset).requires_grad_()
    k = (torch.randn(batch, groups, tokens, dim_qk, generator=gen, dtype=dtype) * spread + offset).requires_grad_()
    return [q, k, rand(batch, groups, tokens, dim_v),
            rand(2 * height - 1, dim_qk, scale=dim_qk ** -0.5), rand(2 * width - 1, dim_qk, scale=dim_qk ** -0.5)]


def run_with_grads(fn, tensors, grid, bn, seed):
    """:func:`outputs_and_grads` of ``fn(q, k, v, rel_height, rel_width, grid, bn)`` for a seeded output gradient."""
    v = tensors[2]
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return outputs_and_grads(bn, *tensors, grid, bn, call=fn, grad_out=grad_out.to(v.dtype))


def assert_bn_state_equal(bn_a, bn_b, rtol, atol):
    for name, buf in bn_a.named_buffers():
        torch.testing.assert_close(buf, dict(bn_b.named_buffers())[name], rtol=rtol, atol=atol, msg=name)


def check_fused_matches_reference(batch, groups, grid, mode, dtype, rtol, atol, seed=0, dims=(6, 5),
                                  max_chunk_logits=None, **bn_kwargs):
    tensors = make_detection_inputs(batch, groups, grid, *dims, dtype=dtype, seed=seed)
    bn_ref = make_bn(2 * groups, dtype, seed, **bn_kwargs).train(mode == 'train')
    bn_fused = copy.deepcopy(bn_ref)
    want = run_with_grads(reference_detection_qr_binary, tensors, grid, bn_ref, seed)
    fused = functools.partial(detection_qr_binary, max_chunk_logits=max_chunk_logits)
    got = run_with_grads(fused, tensors, grid, bn_fused, seed)
    assert got.keys() == want.keys()
    for name, value in want.items():
        # d out / d bn.bias is exactly zero (softmax is shift invariant): both sides hold summation noise only
        value_atol = atol * 50 if name == 'grad:bias' else atol
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=value_atol, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('batch,groups,grid', [
    (1, 2, (4, 4)), (2, 4, (3, 5)), (3, 8, (8, 8)), (2, 3, (5, 2)), (1, 8, (1, 6)),
])
def test_detection_fused_matches_reference_float64(batch, groups, grid, mode):
    check_fused_matches_reference(batch, groups, grid, mode, torch.float64, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('rows', [1, 2, 3])
def test_detection_fused_in_bands_of_query_rows_matches_reference_float64(rows, mode):
    """Bands of 1, 2 or 3 rows of a 7x5 grid (the last band shorter): the same numbers as one band."""
    batch, groups, grid = 2, 3, (7, 5)
    logits_per_row = batch * groups * grid[1] * grid[0] * grid[1]
    check_fused_matches_reference(batch, groups, grid, mode, torch.float64, rtol=1e-9, atol=1e-10,
                                  max_chunk_logits=rows * logits_per_row)


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('batch,groups,grid,dims', [(2, 4, (8, 8), (16, 32)), (1, 8, (6, 10), (8, 16))])
def test_detection_fused_matches_reference_float32(batch, groups, grid, dims, mode):
    check_fused_matches_reference(batch, groups, grid, mode, torch.float32, rtol=1e-4, atol=2e-5, dims=dims)


def test_detection_fused_keeps_the_scaled_queries_not_their_relative_logits_for_backward(saved_for_backward):
    """Of the relative logits (L x (H + W) per group) only their queries [b q | shift] are kept for backward: every
    band forms its logits again in backward."""
    grid, dims = (8, 12), (4, 4)
    tensors = make_detection_inputs(1, 2, grid, *dims, dtype=torch.float64, seed=0)
    with saved_for_backward() as saved:
        detection_qr_binary(*tensors, grid, make_bn(4, torch.float64, seed=0).eval(), max_chunk_logits=1)
    widths = [t.shape[-1] for t in saved if t.dim() == 4 and t.shape[2] == grid[0] * grid[1]]  # (N, G, L, width)
    assert max(widths) == dims[0] + 1 < sum(grid)


def test_detection_train_statistics_stable_with_large_mean_float32():
    """Content logits ~7200 +- 13: E[x^2] - E[x]^2 in float32 would be ~4% off; the centred forms are not."""
    grid, groups = (8, 8), 4
    tensors64 = make_detection_inputs(2, groups, grid, 8, 8, torch.float64, seed=3, offset=30.0, spread=0.1)
    tensors32 = [t.detach().float().requires_grad_() for t in tensors64]
    bn64 = make_bn(2 * groups, torch.float64, 3).train()
    bn32 = copy.deepcopy(bn64).float()
    results64 = run_with_grads(reference_detection_qr_binary, tensors64, grid, bn64, seed=3)
    results32 = run_with_grads(detection_qr_binary, tensors32, grid, bn32, seed=3)
    torch.testing.assert_close(bn32.running_var, bn64.running_var.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(bn32.running_mean, bn64.running_mean.float(), rtol=1e-5, atol=1e-5)
    # the logits themselves carry float32 rounding of 7200 (~5e-4): compare at that resolution
    torch.testing.assert_close(results32['output:0'], results64['output:0'].float(), rtol=1e-3, atol=1e-3)
    for name in [f'grad:input{i}' for i in range(5)]:  # q, k, v, rel_height, rel_width
        scale = results64[name].abs().max().item()
        torch.testing.assert_close(results32[name], results64[name].float(), rtol=0, atol=1e-2 * scale,
                                   msg=lambda m: f'{name}: {m}')


def test_detection_train_updates_running_stats_like_batchnorm_over_calls():
    """momentum=None (cumulative average) over two batches; buffers end equal to nn.BatchNorm2d's."""
    groups, grid = 2, (3, 4)
    bn_ref = make_bn(2 * groups, torch.float64, 0, momentum=None).train()
    bn_fused = copy.deepcopy(bn_ref)
    bn_fused.num_batches_tracked.zero_()
    bn_ref.num_batches_tracked.zero_()
    for seed in (1, 2):
        tensors = make_detection_inputs(2, groups, grid, 4, 4, torch.float64, seed)
        out_ref = reference_detection_qr_binary(*tensors, grid, bn_ref)
        out_fused = detection_qr_binary(*tensors, grid, bn_fused)
        torch.testing.assert_close(out_fused, out_ref, rtol=1e-9, atol=1e-10)
    assert bn_fused.num_batches_tracked.item() == 2
    assert_bn_state_equal(bn_fused, bn_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('bn_kwargs', [{'track_running_stats': False}, {'affine': False}, {'momentum': 0.3}])
def test_detection_other_batchnorm_configurations(mode, bn_kwargs):
    check_fused_matches_reference(2, 2, (3, 3), mode, torch.float64, rtol=1e-9, atol=1e-10, **bn_kwargs)


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_detection_autocast_bfloat16_no_less_accurate_than_reference(mode):
    """Under autocast the statistics stay float32 and the large logit mean never meets bfloat16 rounding."""
    grid, groups = (8, 8), 4
    tensors64 = [t.detach() for t in make_detection_inputs(2, groups, grid, 16, 16, torch.float64, seed=1,
                                                           offset=3.0, spread=0.3)]
    tensors32 = [t.float() for t in tensors64]
    bn = make_bn(2 * groups, torch.float64, 1).train(mode == 'train')
    with torch.no_grad():  # running statistics of the data, as after training
        qk = tensors64[0] @ tensors64[1].transpose(-1, -2)
        bn.running_mean[:groups], bn.running_var[:groups] = qk.mean((0, 2, 3)), qk.var((0, 2, 3))
    exact = reference_detection_qr_binary(*tensors64, grid, copy.deepcopy(bn))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference = reference_detection_qr_binary(*tensors32, grid, copy.deepcopy(bn).float())
        fused = detection_qr_binary(*tensors32, grid, copy.deepcopy(bn).float())
    assert fused.dtype == reference.dtype == torch.bfloat16
    assert (fused.double() - exact).abs().max() <= (reference.double() - exact).abs().max()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_detection_fused_runs_on_the_flash_kernel(mode, dtype):
    """The operands are eligible for the flash kernel (no L x L math fallback), forward and backward."""
    tensors = make_detection_inputs(2, 4, (5, 7), 6, 11, dtype, seed=0)
    bn = make_bn(8, dtype, 0).train(mode == 'train')
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = detection_qr_binary(*tensors, (5, 7), bn)
        out.square().sum().backward()
    assert out.shape == (2, 4, 35, 11)
    assert all(t.grad is not None for t in tensors) and bn.weight.grad is not None


def test_detection_sync_batchnorm():
    """One process, or eval mode: SyncBatchNorm is a BatchNorm to fold. Several processes in train mode: it pools
    statistics across them, which the fused term cannot; the caller is told to run the reference term, once."""
    groups, grid = 2, (3, 4)
    tensors = make_detection_inputs(2, groups, grid, 4, 4, torch.float64, seed=0)
    bn_ref = nn.SyncBatchNorm.convert_sync_batchnorm(make_bn(2 * groups, torch.float64, 0)).train()
    bn_fused = copy.deepcopy(bn_ref)
    torch.testing.assert_close(detection_qr_binary(*tensors, grid, bn_fused),
                               reference_detection_qr_binary(*tensors, grid, bn_ref))
    assert_bn_state_equal(bn_fused, bn_ref, rtol=1e-9, atol=1e-10)
    with mock.patch.object(lesa_fused.dist, 'is_initialized', return_value=True), \
            mock.patch.object(lesa_fused.dist, 'get_world_size', return_value=2), \
            mock.patch.object(lesa_fused, '_reported_unfoldable', set()), \
            mock.patch.object(lesa_fused._logger, 'warning') as warning:
        assert not lesa_fused.can_fold(bn_fused) and not lesa_fused.can_fold(bn_fused)
        warning.assert_called_once()
        assert 'SyncBatchNorm pooling batch statistics across processes' in warning.call_args[0][0]
        with pytest.raises(ValueError, match='SyncBatchNorm pooling.*Use detection_qr_binary_reference'):
            detection_qr_binary(*tensors, grid, bn_fused)
        assert lesa_fused.can_fold(bn_fused.eval())


def _freeze(library: str, module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of ``module`` frozen the way ``library`` does it (torchvision's detection models build
    theirs with ``norm_layer=FrozenBatchNorm2d``)."""
    if library == 'transformers DETR':
        pytest.importorskip('transformers.models.detr.modeling_detr').replace_batch_norm(module)
    elif library == 'timm':
        module = timm.layers.freeze_batch_norm_2d(module)
    else:
        for parent in module.modules():
            for name, child in parent.named_children():
                if type(child) is nn.BatchNorm2d:
                    frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, child.eps)
                    frozen.load_state_dict(child.state_dict())
                    setattr(parent, name, frozen)
    return module.double()


FROZEN_BATCHNORMS = ['torchvision', 'timm', 'transformers DETR']


@pytest.mark.parametrize('library', FROZEN_BATCHNORMS)
def test_detection_frozen_batchnorms_fold_into_the_fused_term_float64(library):
    """Frozen batch norms (fixed statistics and affine, eps however each library keeps it) are folded exactly."""
    groups, grid = 3, (4, 5)
    tensors = make_detection_inputs(2, groups, grid, 6, 5, torch.float64, seed=2)
    frozen = _freeze(library, nn.Sequential(make_bn(2 * groups, torch.float64, 2)))[0]
    assert type(frozen) is not nn.BatchNorm2d and lesa_fused.can_fold(frozen)
    assert_same_results(run_with_grads(detection_qr_binary, tensors, grid, frozen, seed=2),
                        run_with_grads(reference_detection_qr_binary, tensors, grid, frozen, seed=2),
                        rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('slot', FROZEN_BATCHNORMS + ['BatchNormAct2d'])
def test_lesa_module_runs_fused_where_its_norm_folds_and_reference_elsewhere(slot, mode):
    """The BatchNorm2ds of a LESA module frozen (as DETR does), or a norm with an activation in the similarity slot:
    attn_impl='fused' computes what 'reference' does, through the fused term only where the norm folds."""
    def build(impl):
        torch.manual_seed(0)
        module = randomise(Lesa(16, 4, groups=2, pos_embed='detection_qr', attn_impl=impl)).double()
        if slot != 'BatchNormAct2d':
            return _freeze(slot, module)
        norm = timm.layers.BatchNormAct2d(4, act_layer=nn.Tanh).double()
        norm.load_state_dict(module.bn_similarity.state_dict())
        module.bn_similarity = norm
        return module

    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    reference, fused = build('reference').train(mode == 'train'), build('fused').train(mode == 'train')
    with mock.patch.object(lesa_fused, 'detection_qr_binary', wraps=lesa_fused.detection_qr_binary) as spy:
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-9, atol=1e-10)
    assert spy.call_count == (0 if slot == 'BatchNormAct2d' else 1)


def test_detection_bad_inputs_name_the_problem():
    q, k, v, rel_h, rel_w = make_detection_inputs(1, 2, (4, 4), 4, 4, torch.float32, seed=0)
    bn = make_bn(4, torch.float32, 0)
    with pytest.raises(ValueError, match='grid'):
        detection_qr_binary(q, k, v, rel_h, rel_w, (4, 5), bn)
    with pytest.raises(ValueError, match='resample'):
        detection_qr_binary(q, k, v, rel_h[:-1], rel_w, (4, 4), bn)
    with pytest.raises(ValueError, match='2G = 4'):
        detection_qr_binary(q, k, v, rel_h, rel_w, (4, 4), make_bn(6, torch.float32, 0))


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_own_reference_matches_the_module_reference(mode):
    """Conventions cross-check: the formulas above and the LESA module's ``detection_qr_binary_reference`` agree (the
    ``classification`` term is checked against the formulas through the module in test_lesa.py)."""
    groups, grid = 3, (3, 4)
    tensors = [t.detach() for t in make_detection_inputs(2, groups, grid, 4, 5, torch.float64, seed=5)]
    bn = make_bn(2 * groups, torch.float64, 5).train(mode == 'train')
    torch.testing.assert_close(
        detection_qr_binary_reference(*tensors, grid, copy.deepcopy(bn)),
        reference_detection_qr_binary(*tensors, grid, copy.deepcopy(bn)))


def calibrate_with_random_similarity_norms(model, image, seed):
    """BatchNorm statistics of ``image``, then non-trivial ``bn_similarity`` affine parameters and running
    statistics."""
    calibrate_batchnorms(model, [image])
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, module in model.named_modules():
            if name.endswith('bn_similarity'):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
                module.running_var.mul_(torch.rand(module.running_var.shape, generator=gen) + 0.5)


@pytest.mark.slow
def test_lesa_resnet50_det_fused_equals_reference():
    """Whole detection backbone, eval then train mode: attn_impl='fused' routes every LESA block here and
    changes no number (features, every parameter gradient, every BatchNorm buffer).

    float64 with plain 3x3 convs in place of the deformable ones, whose layer computes in float32 whatever the
    input dtype (in float32 the rounding differences of an untrained 16-block net grow ~3x per block).
    """
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    models = {}
    for impl in ('reference', 'fused'):
        torch.manual_seed(0)
        models[impl] = timm.create_model(
            'lesa_resnet50_det', img_size=64, features_only=True, attn_impl=impl, dcn_stages=(False,) * 4,
        ).double()
    calibrate_with_random_similarity_norms(models['reference'], image, seed=0)
    models['fused'].load_state_dict(models['reference'].state_dict())

    for mode in ('eval', 'train'):
        results = {}
        for impl, model in models.items():
            model.train(mode == 'train').zero_grad(set_to_none=True)
            with mock.patch.object(lesa_fused, 'detection_qr_binary', wraps=lesa_fused.detection_qr_binary) as spy:
                features = model(image)
            loss = sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in features)
            loss.backward()
            results[impl] = (features, spy.call_count)
        assert results['reference'][1] == 0 and results['fused'][1] == 8  # 5 LESA blocks in stage 3, 3 in stage 4

        for f_fused, f_ref in zip(results['fused'][0], results['reference'][0]):
            torch.testing.assert_close(f_fused, f_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f'{mode}: {m}')
        grads_ref = {n: p.grad for n, p in models['reference'].named_parameters()}

        def block_grad_scale(name):
            # rounding noise scales with the gradients of the whole LESA module (conv2), not of one parameter:
            # bn_similarity.bias has an exactly zero true gradient (softmax is shift invariant), and in the last
            # block of this untrained net the softmax saturates (|q|, |k| ~ 1e3), so its relative-position
            # gradients vanish (~1e-24): there both sides are noise of the module's scale
            block = name.split('.conv2.')[0] + '.conv2.' if '.conv2.' in name else name
            return max(g.abs().max().item() for n, g in grads_ref.items() if n.startswith(block))

        for name, param in models['fused'].named_parameters():
            torch.testing.assert_close(param.grad, grads_ref[name], rtol=1e-7, atol=1e-9 * block_grad_scale(name),
                                       msg=lambda m: f'{mode}, grad {name}: {m}')
        assert_bn_state_equal(models['fused'], models['reference'], rtol=1e-9, atol=1e-9)
