"""LESA family: fidelity of the LESA module to the paper's formulas, the timm model API, and loading the authors'
checkpoint formats (written here with the authors' key names: the released files cannot be downloaded).

Sizes are tiny (4x4 token grids, 64 px detection inputs); the ImageNet models run at their only size, 224.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import lesa_lit_models  # noqa: F401
from lesa_lit_models import CheckpointError
from lesa_lit_models.layers.deform_conv import DeformConv2dPack
from lesa_lit_models.layers.attn_impl import ATTN_IMPLS
from lesa_lit_models.layers.lesa_attention import Lesa
from lesa_lit_models.layers.lesa_rel_pos import resample_rel_table
from _helpers import assert_same_results, load_file, mmdet2_checkpoint, outputs_and_grads, randomise, \
    relative_logits_2d_oracle

DET_SIZE = 64


def _det(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(timm.create_model('lesa_resnet50_det', img_size=DET_SIZE, **kwargs), seed).eval()


def _image(size, batch: int = 1, seed: int = 1) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the LESA module vs the paper

def _bn(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """BatchNorm over channel dim 1 from its definition (batch statistics in train mode)."""
    dims = [d for d in range(x.ndim) if d != 1]
    shape = [1, -1] + [1] * (x.ndim - 2)
    if bn.training:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def _qkv_from_formulas(m: Lesa, x: torch.Tensor):
    """q, k: (N, G, dqk, L), v: (N, G, dv, L); projection channels are group-major, [q | k | v] per group."""
    N, C, H, W = x.shape
    qkv = _bn(torch.einsum('oc,ncl->nol', m.qkv_transform.weight[:, :, 0], x.flatten(2)), m.bn_qkv)
    qkv = qkv.view(N, m.groups, 2 * m.qk_dim + m.v_dim, H * W)
    return qkv[:, :, :m.qk_dim], qkv[:, :, m.qk_dim:2 * m.qk_dim], qkv[:, :, 2 * m.qk_dim:]


def _lesa_from_formulas(m: Lesa, x: torch.Tensor) -> torch.Tensor:
    """One LESA module written from the formulas, every relative index spelled out token by token."""
    N, C, H, W = x.shape
    G, dqk, dv, L = m.groups, m.qk_dim, m.v_dim, H * W
    unary = _bn(F.conv2d(F.conv2d(x, m.x_transform[0].weight, padding=1, groups=G), m.x_transform[1].weight), m.bn_x)

    q, k, v = _qkv_from_formulas(m, x)
    qk = torch.einsum('ngci,ngcj->ngij', q, k)
    if m.pos_embed == 'detection_qr':
        rel_h = resample_rel_table(m.rel_height, 2 * H - 1)
        rel_w = resample_rel_table(m.rel_width, 2 * W - 1)
        terms = [qk, relative_logits_2d_oracle(q.transpose(-1, -2), rel_h, rel_w, (H, W))]
    else:
        rel = m.relative  # E[c, a, b] = rel[c, a - b + L - 1]; rows [Eq | Ek | Ev]
        qr, kr = torch.zeros_like(qk), torch.zeros_like(qk)
        for i in range(L):
            for j in range(L):
                qr[:, :, i, j] = torch.einsum('ngc,c->ng', q[..., i], rel[:dqk, i - j + L - 1])
                kr[:, :, i, j] = torch.einsum('ngc,c->ng', k[..., j], rel[dqk:2 * dqk, j - i + L - 1])
        terms = [qk, qr, kr]
    logits = _bn(torch.cat(terms, 1), m.bn_similarity).view(N, len(terms), G, L, L).sum(1)
    attn = logits.softmax(-1)
    sv = torch.einsum('ngij,ngcj->ngci', attn, v).reshape(N, C, L)  # output channel g * dv + c
    if m.pos_embed == 'detection_qr':
        binary = _bn(sv, m.bn_output)
    else:
        sve = torch.zeros_like(attn[:, :, :, :dv].transpose(2, 3))  # (N, G, dv, L)
        for i in range(L):
            for j in range(L):
                sve[..., i] += attn[:, :, i, j, None] * m.relative[2 * dqk:, i - j + L - 1]
        stacked = torch.stack([sv, sve.reshape(N, C, L)], 2).reshape(N, 2 * C, L)  # bn channel 2 * (g*dv+c) + t
        normed = _bn(stacked, m.bn_output)
        binary = normed[:, 0::2] + normed[:, 1::2]
    binary = binary.view(N, C, H, W)

    hidden = F.relu(_bn(F.conv2d(F.relu(torch.cat([unary, binary], 1)), m.reasoning[1].weight), m.reasoning[2]))
    gate = torch.sigmoid(_bn(F.conv2d(hidden, m.projection[0].weight), m.projection[1]))
    out = unary + gate * binary
    return F.avg_pool2d(out, m.stride) if m.stride > 1 else out


LESA_CASES = [
    ('classification', 4, 1, 'reference'),
    *[('detection_qr', 4, stride, impl) for impl in ATTN_IMPLS for stride in (1, 2)],
    *[('detection_qr', 3, 1, impl) for impl in ATTN_IMPLS],  # a 4x4 grid on 3x3 tables: resampled
]


@pytest.mark.parametrize('pos_embed,table_side,stride,attn_impl', LESA_CASES)
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_lesa_module_matches_formulas(pos_embed, table_side, stride, attn_impl, mode):
    torch.manual_seed(0)
    m = randomise(Lesa(32, table_side, stride=stride, groups=4, pos_embed=pos_embed, attn_impl=attn_impl)).double()
    m.train(mode == 'train')
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    before = {k: v.clone() for k, v in m.state_dict().items() if 'running' in k}
    expected = _lesa_from_formulas(m, x)  # uses the statistics before the module updates them
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    changed = {k for k, v in m.state_dict().items() if 'running' in k and not torch.equal(v, before[k])}
    assert changed == (set(before) if mode == 'train' else set())


def test_lesa_bn_similarity_running_stats_follow_batchnorm():
    """In train mode, bn_similarity's running statistics equal nn.BatchNorm2d's on the (N, T*G, L, L) stack."""
    for impl in ATTN_IMPLS:
        torch.manual_seed(0)
        m = randomise(Lesa(32, 4, groups=4, pos_embed='detection_qr', attn_impl=impl)).double().train()
        x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
        bn = m.bn_similarity
        start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
        m(x)
        # the stack from the formulas, then one step of the running-average rule
        with torch.no_grad():
            q, k, _ = _qkv_from_formulas(m, x)
            qk = torch.einsum('ngci,ngcj->ngij', q, k)
            qr = relative_logits_2d_oracle(q.transpose(-1, -2), m.rel_height, m.rel_width, (4, 4))
            stack = torch.cat([qk, qr], 1)
            mean, var = stack.mean((0, 2, 3)), stack.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(bn.running_mean, 0.9 * start_mean + 0.1 * mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(bn.running_var, 0.9 * start_var + 0.1 * var, rtol=1e-9, atol=1e-12)


def test_lesa_deformable_unary_is_a_grouped_dcn_without_bias():
    lesa = Lesa(32, 4, groups=4, pos_embed='detection_qr', deformable=True)
    assert isinstance(lesa.x_transform[0], DeformConv2dPack) and lesa.x_transform[0].bias is None
    assert lesa.x_transform[0].weight.shape == (32, 8, 3, 3)


def test_resample_rel_table_is_linear_along_offsets_and_keeps_zero_offset():
    table = torch.tensor([[0.], [2.], [10.]])  # offsets -1, 0, +1 of a 2-token side
    torch.testing.assert_close(resample_rel_table(table, 5), torch.tensor([[0.], [1.], [2.], [6.], [10.]]))
    assert resample_rel_table(table, 3) is table
    torch.testing.assert_close(resample_rel_table(table, 1), torch.tensor([[2.]]))
    big = torch.randn(63, 4)
    torch.testing.assert_close(resample_rel_table(big, 127)[63], big[31])  # zero offset stays the centre row


def test_classification_lesa_rejects_other_grids_naming_the_image_size():
    m = Lesa(32, 14, groups=4, pos_embed='classification', input_reduction=16)
    with pytest.raises(ValueError, match=r'14x14 token grid \(224x224 pixel images\).*16x16 grid'):
        m(torch.randn(1, 32, 16, 16))
    with pytest.raises(ValueError, match='multiples of 32'):
        Lesa(32, 4, stride=2, groups=4, pos_embed='detection_qr', input_reduction=16)(torch.randn(1, 32, 5, 5))


# ------------------------------------------------------------------------------------------------- the models

def test_parameter_counts_equal_upstream():
    """Counts of the authors' models built with their code: the ImageNet models with the
    classifier, the COCO backbones without, measured there at 256x256 (R50) and 320x320 (WRN) inputs."""
    def count(name, **kwargs):
        with torch.device('meta'):
            return sum(p.numel() for p in timm.create_model(name, **kwargs).parameters())

    assert count('lesa_resnet50') == 23_777_512
    assert count('lesa_wrn50') == 61_145_896
    assert count('lesa_resnet50_det', img_size=256) == 22_037_194
    assert count('lesa_wrn50_det', img_size=320) == 59_718_762

    def tables(width, side):  # rel_height + rel_width rows x dqk of the LESA blocks in stages 3 (5) and 4 (3)
        s3, s4 = side // 16, side // 32  # stage-4 block 1 attends on the stage-3 grid before pooling
        dqk3, dqk4 = width // 16, 2 * width // 16
        return 2 * (5 * (2 * s3 - 1) * dqk3 + (2 * s3 - 1) * dqk4 + 2 * (2 * s4 - 1) * dqk4)
    assert count('lesa_resnet50_det') == 22_037_194 + tables(256, 1024) - tables(256, 256)
    assert count('lesa_wrn50_det') == 59_718_762 + tables(512, 1280) - tables(512, 320)


@pytest.mark.parametrize('name', ['lesa_resnet50', 'lesa_wrn50', 'lesa_resnet50_det', 'lesa_wrn50_det'])
def test_registered_models_and_pretrained_cfgs(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert not cfg.get('hf_hub_id') and not cfg.get('url') and cfg['origin_url'].startswith('https://')  # OneDrive only
    assert '.pth' in timm.get_pretrained_cfg(name).release_file and 'release_file' not in cfg  # not in exports
    assert cfg['paper_ids'] == 'arXiv:2107.05637'
    if name.endswith('_det'):
        assert cfg['tag'] == 'coco'
        assert model.num_classes == 0 and not cfg['fixed_input_size']
        side = 1024 if name == 'lesa_resnet50_det' else 1280
        assert model.img_size == (side, side) and cfg['input_size'] == (3, side, side)
        assert model.layer4[2].conv2.rel_height.shape[0] == 2 * side // 32 - 1
        assert any('box AP' in n for n in cfg['notes'])
        assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 16, 32]
    else:
        assert cfg['tag'] == 'in1k'
        assert cfg['fixed_input_size'] and cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (14, 14)
        top1 = {'lesa_resnet50': '79.55', 'lesa_wrn50': '80.18'}[name]
        assert any(top1 in n for n in cfg['notes'])
        assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 16, 16]
        assert model.layer3[0].conv2.__class__ is nn.Conv2d and isinstance(model.layer3[1].conv2, Lesa)
        assert isinstance(model.layer4[0].conv2, Lesa)
    assert [f['num_chs'] for f in model.feature_info] == [64, 256, 512, 1024, 2048]
    tables = ('rel_height', 'rel_width') if name.endswith('_det') else ('relative',)
    lesa_blocks = [f'layer3.{i}' for i in range(1, 6)] + [f'layer4.{i}' for i in range(3)]
    assert model.no_weight_decay() == {f'{block}.conv2.{table}' for block in lesa_blocks for table in tables}
    groups = model.group_matcher()
    assert set(groups) == {'stem', 'blocks'}


def test_detection_backbone_layout():
    with torch.device('meta'):
        model = timm.create_model('lesa_resnet50_det')
    assert isinstance(model.layer1[0].conv2, nn.Conv2d)
    assert all(isinstance(b.conv2, DeformConv2dPack) for b in model.layer2)
    assert isinstance(model.layer3[0].conv2, DeformConv2dPack)
    lesa = [b.conv2 for b in (*model.layer3[1:], *model.layer4)]
    assert all(isinstance(m, Lesa) and isinstance(m.x_transform[0], DeformConv2dPack) for m in lesa)
    assert model.layer4[0].conv2.stride == 2 and model.layer4[0].conv2.feat_size == (64, 64)
    assert model.layer4[1].conv2.feat_size == (32, 32)


def test_imagenet_model_forward_and_wrong_size_error():
    torch.manual_seed(0)
    model = timm.create_model('lesa_resnet50').eval()
    with torch.no_grad():
        out = model(_image(224))
        assert out.shape == (1, 1000) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match='224x224'):
            model(_image(256))


def test_imagenet_layout_features_only():
    model = timm.create_model('lesa_resnet50', img_size=DET_SIZE, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 16]
    with torch.no_grad():
        feats = model(_image(DET_SIZE))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 4, 4)]


@pytest.mark.parametrize('feature_cls', [None, 'getter'])
def test_detection_features_only_gives_c2_to_c5(feature_cls):
    kwargs = dict(feature_cls=feature_cls) if feature_cls else {}
    model = timm.create_model('lesa_resnet50_det', img_size=DET_SIZE, features_only=True, out_indices=(1, 2, 3, 4),
                              **kwargs).eval()
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(_image(DET_SIZE))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]


def test_forward_intermediates_and_pruning():
    model = _det()
    x = _image(DET_SIZE)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in feats] == [64, 256, 512, 1024, 2048]
        assert [DET_SIZE // f.shape[-1] for f in feats] == [2, 4, 8, 16, 32]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        for got, want in zip(last_two, feats[-2:]):
            torch.testing.assert_close(got, want)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], feats[1])
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(model.layer3) == 0 and len(model.layer4) == 0 and model.num_features == 512
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        for got, want in zip(pruned, feats[1:3]):
            torch.testing.assert_close(got, want)


def test_classifier_api():
    with torch.device('meta'):
        model = timm.create_model('lesa_resnet50')
    image = torch.empty(2, 3, 224, 224, device='meta')
    assert model.get_classifier().out_features == 1000 and model.get_classifier(name_only=True) == 'fc'
    assert model.forward_head(model.forward_features(image), pre_logits=True).shape == (2, 2048)
    model.reset_classifier(10)
    assert model(image).shape == (2, 10)
    model.reset_classifier(0, '')
    assert model(image).shape == (2, 2048, 14, 14)


def test_detection_model_at_another_size_resamples_its_tables():
    """A 32 px backbone fed 64 px images equals a 64 px backbone holding the linearly resampled tables."""
    torch.manual_seed(0)
    small = randomise(timm.create_model('lesa_resnet50_det', img_size=DET_SIZE // 2)).eval()
    big = timm.create_model('lesa_resnet50_det', img_size=DET_SIZE).eval()
    resampled = {k: resample_rel_table(v, 2 * v.shape[0] + 1) if k.endswith(('rel_height', 'rel_width')) else v
                 for k, v in small.state_dict().items()}  # a side of s tokens becomes 2s: 2s - 1 rows -> 4s - 1
    assert resampled['layer3.1.conv2.rel_height'].shape == big.state_dict()['layer3.1.conv2.rel_height'].shape
    big.load_state_dict(resampled)
    x = _image(DET_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x))
        assert small.forward_features(_image((DET_SIZE, DET_SIZE // 2))).shape == (1, 2048, 2, 1)  # non-square
        with pytest.raises(ValueError, match='multiples of 32'):
            small(_image(DET_SIZE + 16))


def test_attention_implementations_agree_in_the_model():
    x = _image(DET_SIZE)
    with torch.no_grad():
        outs = {impl: _det(attn_impl=impl)(x) for impl in ATTN_IMPLS}
    torch.testing.assert_close(outs['fused'], outs['reference'], rtol=1e-4, atol=1e-4)


def _keeping(saved_for_backward, module, sizes, storage_bytes=False):
    """``module``'s forward that appends to ``sizes`` what autograd keeps for its backward: the elements of the saved
    tensors, or the bytes of their distinct storages."""
    def forward(x):
        with saved_for_backward() as kept:
            out = module(x)
        if storage_bytes:
            sizes.append(sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values()))
        else:
            sizes.append(sum(t.numel() for t in kept))
        return out
    return forward


@pytest.mark.parametrize('pos_embed', ['classification', 'detection_qr'])
@pytest.mark.parametrize('train', [False, True])
def test_grad_checkpointing_leaves_outputs_grads_and_running_stats_unchanged(pos_embed, train):
    torch.manual_seed(0)
    initial = randomise(Lesa(32, 4, groups=4, pos_embed=pos_embed, deformable=pos_embed == 'detection_qr'))
    x = torch.randn(2, 32, 4, 4)
    results = []
    for enable in (False, True):
        m = copy.deepcopy(initial).train(train)
        m.grad_checkpointing = enable
        results.append(outputs_and_grads(m, x))
    # the recomputation in backward does not update BatchNorm twice
    assert_same_results(results[1], results[0], buffers=dict(rtol=0, atol=0))
    if train:
        assert any(not torch.equal(results[1][f'buffer:{n}'], b) for n, b in initial.named_buffers())
    with torch.device('meta'):
        model = timm.create_model('lesa_resnet50_det')
    model.set_grad_checkpointing()
    assert all(b.conv2.grad_checkpointing for b in (*model.layer3[1:], *model.layer4))


@pytest.mark.parametrize('pos_embed,attn_impl', [
    ('classification', 'reference'), ('detection_qr', 'fused'), ('detection_qr', 'reference')])
def test_recomputed_gate_changes_nothing_and_keeps_less_for_backward(pos_embed, attn_impl, saved_for_backward):
    """recompute_gate (the default) recomputes the terms' norms and the fusion gate in backward: the same outputs,
    gradients and BatchNorm statistics in train mode (float64) as keeping them, and fewer bytes kept."""
    torch.manual_seed(0)
    initial = randomise(Lesa(32, 4, groups=4, pos_embed=pos_embed, attn_impl=attn_impl)).double()
    assert initial.recompute_gate
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    results, saved = [], []
    for recompute in (False, True):
        m = copy.deepcopy(initial).train()
        m.recompute_gate = recompute
        forward = _keeping(saved_for_backward, m, saved, storage_bytes=True)
        results.append(outputs_and_grads(m, x, call=forward))
    # buffers updated once, in forward
    assert_same_results(results[1], results[0], rtol=1e-12, atol=1e-12, buffers=dict(rtol=0, atol=0))
    assert any(not torch.equal(results[1][f'buffer:{n}'], b) for n, b in initial.named_buffers())
    # eight (N, C, H, W) activations fewer when the fused term's output is kept once (U and B before their norms
    # are all that is kept of the fusion), at least five otherwise
    fewer = 8 if attn_impl == 'fused' else 5
    assert saved[0] - saved[1] >= fewer * x.numel() * x.element_size()
    with torch.device('meta'):
        lesa_modules = [m for m in timm.create_model('lesa_resnet50_det', recompute_gate=False).modules()
                        if isinstance(m, Lesa)]
    assert lesa_modules and not any(m.recompute_gate for m in lesa_modules)


def test_model_grad_checkpointing_keeps_less_for_backward_and_changes_nothing(saved_for_backward):
    """set_grad_checkpointing / the grad_checkpointing flag recompute the LESA terms: same outputs and gradients,
    fewer activation elements saved for backward (counted through autograd's saved-tensor hooks)."""
    x = _image(DET_SIZE, batch=2)
    model = _det(layers=(1, 1, 2, 1))
    results, saved = [], []
    for enable in (False, True):
        model.grad_checkpointing = enable
        assert model.grad_checkpointing == enable == model.layer4[0].conv2.grad_checkpointing
        forward = _keeping(saved_for_backward, model, saved)
        results.append(outputs_and_grads(model, x, call=forward))
    assert_same_results(results[1], results[0])
    assert saved[1] < saved[0]


@pytest.mark.parametrize('name', ['lesa_resnet50_det', 'lesa_resnet50'])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)  # the ImageNet layout on a 64 px grid: same modules, small tables
    model = randomise(timm.create_model(name, img_size=DET_SIZE, num_classes=7)).train()
    out = model(_image(DET_SIZE, batch=2))
    (out * torch.cos(out)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # bn_similarity's shift is constant along each softmax row: its exact gradient is zero
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() and not n.endswith('bn_similarity.bias')]
    assert not zero


# ---------------------------------------------------------------------------------------- the authors' checkpoints

def _upstream_state_dict(model: nn.Module):
    """The authors' state dict of a model: our keys plus, in ImageNet models, the ``flatten_index`` buffers."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, Lesa) and m.pos_embed == 'classification':
            L = m.feat_size[0] * m.feat_size[1]
            sd[f'{name}.flatten_index'] = (torch.arange(L)[:, None] - torch.arange(L)[None] + L - 1).view(-1)
    return sd


def _imagenet_checkpoint(sd):
    """LESA_classification's training script: DataParallel keys, plus the optimizer and epoch."""
    return {'net': {'module.' + k: v for k, v in sd.items()}, 'optim': {'state': {}, 'param_groups': []}, 'epoch': 94}


def test_upstream_key_names():
    """The key names of one LESA block, spelled as in the authors' code."""
    with torch.device('meta'):
        sd = _upstream_state_dict(timm.create_model('lesa_resnet50'))
    block = {k[len('layer3.1.conv2.'):].rsplit('.', 1)[0] for k in sd if k.startswith('layer3.1.conv2.')}
    assert block == {
        'qkv_transform', 'bn_qkv', 'bn_similarity', 'bn_output', 'x_transform.0', 'x_transform.1', 'bn_x',
        'reasoning.1', 'reasoning.2', 'projection.0', 'projection.1', 'relative', 'flatten_index'}
    assert 'layer3.1.bn2.weight' not in sd and 'layer3.0.bn2.weight' in sd and 'layer3.0.downsample.1.weight' in sd
    with torch.device('meta'):
        det = timm.create_model('lesa_resnet50_det', img_size=DET_SIZE).state_dict()
    assert {'layer2.0.conv2.weight', 'layer2.0.conv2.conv_offset.weight', 'layer2.0.conv2.conv_offset.bias',
            'layer3.1.conv2.x_transform.0.conv_offset.weight', 'layer3.1.conv2.rel_height',
            'layer4.0.conv2.rel_width'} <= set(det)
    assert 'layer2.0.conv2.bias' not in det  # mmcv DCN: no bias on the main conv


@pytest.mark.slow
def test_imagenet_checkpoint_formats_round_trip(tmp_path):
    torch.manual_seed(0)
    source = randomise(timm.create_model('lesa_resnet50'))
    sd = _upstream_state_dict(source)
    for fmt, ckpt in [('imagenet', _imagenet_checkpoint(sd)), ('bare', sd)]:
        path = tmp_path / f'{fmt}.pth'
        torch.save(ckpt, path)
        loaded = load_file('lesa_resnet50', path).state_dict()
        assert loaded.keys() == source.state_dict().keys()
        for k, v in source.state_dict().items():
            assert torch.equal(loaded[k], v), k
    # converted (hub) weights pass through; other heads / input channels adapt as timm does
    from safetensors.torch import save_file
    save_file(source.state_dict(), str(tmp_path / 'model.safetensors'))
    adapted = load_file('lesa_resnet50', tmp_path / 'model.safetensors', num_classes=3, in_chans=1).state_dict()
    assert adapted['fc.weight'].shape == (3, 2048)
    torch.testing.assert_close(adapted['conv1.weight'], source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(adapted['layer4.2.conv2.relative'], source.layer4[2].conv2.relative)


def test_coco_checkpoint_round_trips_and_resamples(tmp_path):
    source = _det()
    path = tmp_path / 'epoch_20.pth'
    torch.save(mmdet2_checkpoint(source.state_dict()), path)
    loaded = load_file('lesa_resnet50_det', path, img_size=DET_SIZE).eval()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    features = load_file('lesa_resnet50_det', path, img_size=DET_SIZE, features_only=True, out_indices=(1, 2, 3, 4))
    x = _image(DET_SIZE)
    with torch.no_grad():
        _, expected = source.forward_intermediates(x, indices=(1, 2, 3, 4))
        for got, want in zip(features.eval()(x), expected):
            torch.testing.assert_close(got, want)
    # a backbone built for another size resamples the tables of the checkpoint
    bigger = load_file('lesa_resnet50_det', path, img_size=2 * DET_SIZE).state_dict()
    expected = resample_rel_table(source.layer4[1].conv2.rel_width, 7)
    torch.testing.assert_close(bigger['layer4.1.conv2.rel_width'], expected)
    assert torch.equal(bigger['layer3.2.conv2.qkv_transform.weight'], source.layer3[2].conv2.qkv_transform.weight)


@pytest.mark.slow
def test_imagenet_checkpoint_initialises_detection_backbone_as_upstream(tmp_path):
    torch.manual_seed(0)
    source = randomise(timm.create_model('lesa_resnet50'))
    path = tmp_path / 'checkpoint.pth'
    torch.save(_imagenet_checkpoint(_upstream_state_dict(source)), path)
    torch.manual_seed(5)
    fresh = timm.create_model('lesa_resnet50_det', img_size=DET_SIZE).state_dict()
    torch.manual_seed(5)
    loaded = load_file('lesa_resnet50_det', path, img_size=DET_SIZE).state_dict()
    source_sd = source.state_dict()
    kept_fresh = ('conv_offset', 'rel_height', 'rel_width', 'bn_similarity', 'bn_output')
    for k, v in loaded.items():
        if any(p in k for p in kept_fresh) and not k.endswith('num_batches_tracked'):
            assert torch.equal(v, fresh[k]), k
        else:
            assert torch.equal(v, source_sd[k]), k
    assert not torch.equal(fresh['layer2.0.conv2.weight'], source_sd['layer2.0.conv2.weight'])


def test_wrong_checkpoints_fail_with_a_listing(tmp_path):
    path = tmp_path / 'coco.pth'
    torch.save(mmdet2_checkpoint(_det().state_dict()), path)
    with pytest.raises(CheckpointError, match=r"architecture 'lesa_resnet50'(.|\n)*missing keys: .*relative"
                                              r"(.|\n)*unexpected keys: .*conv_offset(.|\n)*shape mismatches"):
        load_file('lesa_resnet50', path)
    with pytest.raises(CheckpointError, match=r"(?s)lesa_wrn50_det.*shape mismatches: layer1.0.conv1.weight"):
        load_file('lesa_wrn50_det', path, img_size=DET_SIZE)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        load_file('lesa_resnet50_det', truncated, img_size=DET_SIZE)
    partial = {k: v for k, v in _det().state_dict().items() if not k.startswith('layer4.2.')}
    with pytest.raises(CheckpointError, match=r'missing keys: layer4\.2\.'):
        timm.create_model('lesa_resnet50_det', img_size=DET_SIZE, pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=partial))
