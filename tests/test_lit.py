"""LIT family: fidelity to the authors' math, the timm model API, and loading original checkpoints."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.optim import param_groups_weight_decay
from timm.models import group_parameters

import lesa_lit_models  # noqa: F401  (registers the models)
from lesa_lit_models import CheckpointError
from lesa_lit_models.layers.deform_merge import DeformableTokenMerging
from lesa_lit_models.layers.rel_pos import bias_from_grid, bias_row_keys_reversed, bias_rows_keys_reversed, \
    column_windows, relative_position_bias_grid, resample_bias_table
from lesa_lit_models.lit import AttentionBlock, LITAttention, MLPBlock
from _helpers import SMALL_LIT, assert_same_results, assert_same_tensors, load_file, mmdet2_checkpoint, \
    outputs_and_grads, randomise, small_model, swin_relative_position_index, to_upstream

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# sum(p.numel()) of the authors' models with the 1000-class head, built with their code
PARAM_COUNTS = {'lit_ti': 19_886_272, 'lit_s': 27_973_720, 'lit_m': 49_372_264, 'lit_b': 87_292_384}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _create(name, **kwargs):
    return timm.create_model(name, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Hand-written references (written from the paper / the notes' formulas, independent of the package code)


def _upstream_detection_bias(table, table_grid, h, w):
    """The authors' detection RelPosAttention bias: the table resized bicubically to (2h-1, 2w-1) where its grid
    differs, then gathered through Swin's index."""
    heads = table.shape[1]
    if tuple(table_grid) != (2 * h - 1, 2 * w - 1):
        table = F.interpolate(table.permute(1, 0).reshape(1, heads, *table_grid), size=(2 * h - 1, 2 * w - 1),
                              mode='bicubic').reshape(heads, -1).permute(1, 0)
    return table[swin_relative_position_index(h, w).view(-1)].view(h * w, h * w, -1).permute(2, 0, 1)


def _dense_bias(table, table_grid, feat_size):
    """The package's dense bias of every query against every key."""
    return bias_from_grid(relative_position_bias_grid(table, table_grid, feat_size), feat_size)


def _explicit_attention(attn: LITAttention, x, feat_size):
    B, N, C = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * (C // heads) ** -0.5
    if attn.relative_position_bias_table is not None:
        th, tw = attn.table_size
        logits = logits + _upstream_detection_bias(attn.relative_position_bias_table, (th, tw), *feat_size)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def _assert_same_outputs_and_grads(model: nn.Module, expected: nn.Module, x: torch.Tensor):
    """Two copies of one model (other attention settings) give the same outputs, gradients and buffers."""
    assert_same_results(outputs_and_grads(model, x), outputs_and_grads(expected, x), rtol=1e-5, atol=1e-5,
                        grads=dict(rtol=1e-4, atol=1e-5))


# ---------------------------------------------------------------------------------------------------------------
# Fidelity


def test_dtm_with_zero_offsets_is_conv_bn_gelu():
    dtm = randomise(DeformableTokenMerging(6, 10)).eval()
    nn.init.zeros_(dtm.dconv.conv_offset.weight)
    nn.init.zeros_(dtm.dconv.conv_offset.bias)
    x = torch.randn(2, 6, 9, 7)  # odd sides: floor, as the authors' k2/s2 conv
    bn = dtm.norm_layer
    expected = F.gelu(F.batch_norm(
        F.conv2d(x, dtm.dconv.weight, dtm.dconv.bias, stride=2), bn.running_mean, bn.running_var, bn.weight,
        bn.bias, eps=bn.eps))
    out = dtm(x)
    assert out.shape == (2, 10, 4, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('feat_size', [(3, 3), (4, 6), (5, 2)])
def test_relative_position_bias_layout_is_swin(feat_size):
    h, w = feat_size
    table = torch.randn((2 * h - 1) * (2 * w - 1), 3)
    expected = _upstream_detection_bias(table, (2 * h - 1, 2 * w - 1), h, w)
    assert torch.equal(_dense_bias(table, (2 * h - 1, 2 * w - 1), feat_size), expected)


@pytest.mark.parametrize('feat_size', [(4, 6), (7, 7), (9, 5)])
def test_relative_position_bias_resamples_like_the_detection_backbone(feat_size):
    table = torch.randn(13 * 13, 4)  # a 7x7-grid table (LIT-S stage 4 at 224)
    expected = _upstream_detection_bias(table, (13, 13), *feat_size)
    torch.testing.assert_close(_dense_bias(table, (13, 13), feat_size), expected, rtol=1e-6, atol=1e-6)


def test_resample_bias_table():
    table = torch.randn(27 * 27, 12)
    assert torch.equal(resample_bias_table(table, (27, 27), (27, 27)), table)
    resized = resample_bias_table(table, (27, 27), (99, 49))
    expected = F.interpolate(table.t().reshape(1, 12, 27, 27), size=(99, 49), mode='bicubic', align_corners=False)
    assert torch.equal(resized, expected.reshape(12, -1).t())
    with pytest.raises(ValueError, match='rows'):
        resample_bias_table(table, (25, 25), (27, 27))


@pytest.mark.parametrize('with_table', [True, False])
def test_attention_equals_explicit_softmax(with_table):
    torch.manual_seed(0)
    attn = LITAttention(48, num_heads=3, rel_pos_grid=(4, 4) if with_table else None).eval()
    if with_table:
        nn.init.normal_(attn.relative_position_bias_table, std=1.)
    x = torch.randn(2, 15, 48)
    for impl in ('fused', 'reference'):
        attn.attn_impl = impl
        torch.testing.assert_close(attn(x, (3, 5)), _explicit_attention(attn, x, (3, 5)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('feat_size, rows', [((5, 4), (0, 2)), ((5, 4), (3, 5)), ((7, 3), (2, 6)), ((4, 6), (0, 4))])
def test_bias_of_a_band_of_query_rows_is_that_slice_of_the_dense_bias(feat_size, rows):
    """A band's bias (eager's strided view) and each of its rows from the column windows (a step of the exported
    scan, the row a tensor) are their rows of the dense bias."""
    h, w = feat_size
    table = torch.randn(9 * 11, 3)  # a 5x6-grid table, resampled for every size here but (5, 6)
    dense = _dense_bias(table, (9, 11), feat_size)
    offset_bias = relative_position_bias_grid(table, (9, 11), feat_size)
    band = bias_rows_keys_reversed(offset_bias, feat_size, rows[0], rows[1] - rows[0]).flip(-1)
    assert torch.equal(band, dense[:, rows[0] * w:rows[1] * w])
    windows = column_windows(offset_bias, feat_size)
    for row in range(*rows):
        got = bias_row_keys_reversed(windows, feat_size, torch.tensor(row)).flip(-1)
        assert torch.equal(got, dense[:, row * w:(row + 1) * w])


@pytest.mark.parametrize('feat_size', [(9, 8), (11, 5)])
def test_attention_in_row_bands_is_exact_and_keeps_no_full_logits_for_backward(feat_size, saved_for_backward):
    h, w = feat_size
    n = h * w
    # bands of two query rows, the last one shorter (odd heights)
    attn = LITAttention(48, num_heads=3, rel_pos_grid=(4, 4), max_chunk_logits=2 * 3 * 2 * w * n).train()
    nn.init.normal_(attn.relative_position_bias_table, std=1.)
    x = torch.randn(2, n, 48, requires_grad=True)

    def largest_saved():
        with saved_for_backward() as saved:
            out = attn(x, feat_size)
        return out, max(t.numel() for t in saved)

    out, largest = largest_saved()
    assert largest < 2 * 3 * n * n  # no (batch, heads, N, N) logits, probabilities or bias kept
    expected = _explicit_attention(attn, x, feat_size)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    params = [x, attn.relative_position_bias_table, attn.qkv.weight, attn.qkv.bias]
    grads = torch.autograd.grad(out, params, grad_out)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for name, g, g_expected in zip(('x', 'table', 'qkv.weight', 'qkv.bias'), grads, expected_grads):
        torch.testing.assert_close(g, g_expected, rtol=1e-4, atol=1e-5, msg=name)

    attn.attn_impl = 'reference'  # the upstream formulation keeps them, so the bound above can fail
    assert largest_saved()[1] >= 2 * 3 * n * n
    attn.attn_impl = 'fused'
    with torch.no_grad():
        torch.testing.assert_close(attn.eval()(x, feat_size), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_row_band_attention_leaves_a_whole_model_unchanged(grad_checkpointing):
    model = small_model('lit_s', num_classes=4).train()
    banded = small_model('lit_s', num_classes=4, max_chunk_logits=1).train()  # one query row per band
    banded.load_state_dict(model.state_dict())
    assert {m.max_chunk_logits for m in banded.modules() if isinstance(m, LITAttention)} == {1}
    banded.set_grad_checkpointing(grad_checkpointing)  # bands recomputed inside recomputed blocks
    _assert_same_outputs_and_grads(banded, model, torch.randn(2, 3, 96, 64))


def test_parameter_counts_match_the_authors_models():
    for name, expected in PARAM_COUNTS.items():
        with torch.device('meta'):
            model = _create(name)
        assert sum(p.numel() for p in model.parameters()) == expected, name


def test_architecture_details_of_each_flavour():
    with torch.device('meta'):
        ti, s = _create('lit_ti', drop_path_rate=0.1), _create('lit_s')
    # LayerNorm eps: LIT-Ti 1e-6 in blocks and final norm, 1e-5 in the stem; LIT-S/M/B 1e-5 everywhere
    assert ti.patch_embed.norm.eps == 1e-5 and ti.norm.eps == 1e-6 and ti.stages[0].blocks[0].norm2.eps == 1e-6
    assert s.patch_embed.norm.eps == s.norm.eps == s.stages[3].blocks[1].norm1.eps == 1e-5
    # MLP-only blocks in stages 1-2, global attention in 3-4; tables only in LIT-S/M/B
    for model in (ti, s):
        assert [type(stage.blocks[0]) for stage in model.stages] == [MLPBlock, MLPBlock, AttentionBlock, AttentionBlock]
    assert ti.stages[2].blocks[0].attn.relative_position_bias_table is None
    assert ti.stages[3].pos_embed.shape == (1, 50, 512) and ti.global_pool == 'token' and s.global_pool == 'avg'
    # stochastic depth grows linearly over all 16 blocks, MLP blocks included
    rates = [getattr(block.drop_path if isinstance(block, MLPBlock) else block.drop_path1, 'drop_prob', 0.)
             for stage in ti.stages for block in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 16).tolist())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_lit_ti_position_embedding_resampling(dtype):
    """Bilinear to the stage grid, in the embedding's precision (float64 is not rounded through float32)."""
    stage = _create('lit_ti', **SMALL_LIT, dtype=dtype).stages[1]  # stored for a 28x28 grid
    tolerance = dict(rtol=1e-15, atol=1e-15) if dtype == torch.float64 else {}
    assert torch.equal(stage.grid_pos_embed((28, 28)), stage.pos_embed)
    # 56x56 has the stage-1 token count of a 224 input: the authors' size check skipped resampling here
    for size in [(56, 56), (12, 20)]:
        expected = F.interpolate(stage.pos_embed.reshape(1, 28, 28, -1).permute(0, 3, 1, 2), size=size,
                                 mode='bilinear', align_corners=False).flatten(2).transpose(1, 2)
        assert stage.grid_pos_embed(size).dtype == dtype
        torch.testing.assert_close(stage.grid_pos_embed(size), expected, **tolerance)


# ---------------------------------------------------------------------------------------------------------------
# timm model API


@pytest.mark.parametrize('name', [
    'lit_ti', 'lit_s', pytest.param('lit_m', marks=pytest.mark.slow), pytest.param('lit_b', marks=pytest.mark.slow)])
def test_model_runs_at_224_and_non_square(name):
    model = _create(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        out = model(torch.randn(2, 3, 96, 128))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('name, channels', [
    ('lit_ti', [64, 128, 320, 512]), ('lit_s', [96, 192, 384, 768]), ('lit_m', [96, 192, 384, 768]),
    ('lit_b', [128, 256, 512, 1024])])
def test_features_only(name, channels):
    with torch.device('meta'):
        info = _create(name, features_only=True).feature_info
        picked = _create(name, features_only=True, out_indices=(1, 2)).feature_info
    assert info.channels() == channels and info.reduction() == [4, 8, 16, 32]
    assert picked.channels() == channels[1:3] and picked.reduction() == [8, 16]
    tiny = _create(name, features_only=True, **SMALL_LIT).eval()
    with torch.no_grad():
        feats = tiny(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 96 // r, 128 // r) for c, r in zip(SMALL_LIT['embed_dims'], [4, 8, 16, 32])]
    pruned = _create(name, features_only=True, out_indices=(0, 1), **SMALL_LIT)
    assert len(pruned.model.stages) == 2


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s'])
def test_forward_intermediates_match_forward_features_and_features_only(name):
    model = small_model(name).eval()
    features = _create(name, features_only=True, **SMALL_LIT).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for a, b in zip(intermediates, features(x)):
            torch.testing.assert_close(a, b)
        last_only = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(last_only[0], intermediates[-1])
        assert len(model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)) == 1


def test_lit_ti_class_token_joins_classification_not_features():
    model = small_model('lit_ti').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        logits = model(x)
        # the classifier is the whole last stage run on the stage-3 map with the class token, then norm and head;
        # forward_features stops at that stage's token merging, forward_head runs its blocks
        tokens = model.stages[-1](feats[-2].permute(0, 2, 3, 1), prefix_tokens=model.cls_token)
        torch.testing.assert_close(logits, model.head(model.norm(tokens)[:, 0]), rtol=0, atol=0)
        model.cls_token.add_(1.)
        feats_after = model.forward_intermediates(x, intermediates_only=True)
        assert not torch.allclose(model(x), logits)
    assert torch.equal(feats[-1], feats_after[-1])


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s'])
def test_every_parameter_gets_a_gradient(name):
    model = small_model(name, num_classes=7).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # a features_only model (e.g. a detection backbone under DDP) has no unused parameters either
    features = _create(name, features_only=True, **SMALL_LIT).train()
    sum(f.sum() for f in features(torch.randn(2, 3, 64, 64))).backward()
    assert [n for n, p in features.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s'])
def test_grad_checkpointing_leaves_outputs_and_grads_unchanged(name):
    model = small_model(name, num_classes=5).train()
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    assert_same_results(outputs_and_grads(model, x), outputs_and_grads(reference, x))


def test_mlp_block_recomputes_its_activation_exactly_and_keeps_one_wide_tensor(saved_for_backward):
    tokens, dim, hidden = 2 * 40, 16, 16 * 8
    block = MLPBlock(dim, mlp_ratio=8., proj_drop=0.1, dtype=torch.float64).train()
    keeping = copy.deepcopy(block)
    keeping.recompute_act = False
    x = torch.randn(2, 40, dim, dtype=torch.float64, requires_grad=True)
    x_keeping = x.detach().clone().requires_grad_()
    torch.manual_seed(1)  # same dropout masks in both, and again inside the recomputation
    out = block(x, (5, 8))
    torch.manual_seed(1)
    out_keeping = keeping(x_keeping, (5, 8))
    torch.testing.assert_close(out, out_keeping, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    out_keeping.backward(grad_out)
    torch.testing.assert_close(x.grad, x_keeping.grad, rtol=0, atol=0)
    for (n, p), p_keeping in zip(block.named_parameters(), keeping.parameters()):
        torch.testing.assert_close(p.grad, p_keeping.grad, rtol=0, atol=0, msg=n)

    def wide(fn):
        with saved_for_backward() as saved:
            fn()
        return sum(t.numel() == tokens * hidden for t in saved)
    assert wide(lambda: keeping(x, (5, 8))) >= 2  # GELU input and fc2 input (+ dropout mask)
    assert wide(lambda: block(x, (5, 8))) == 1  # fc1's output only
    with torch.no_grad():  # eval / inference: nothing to recompute
        torch.testing.assert_close(block.eval()(x, (5, 8)), keeping.eval()(x, (5, 8)), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s'])
def test_recomputed_mlp_activations_leave_a_whole_model_unchanged(name):
    model = small_model(name, num_classes=4).double().train()
    keeping = small_model(name, num_classes=4, recompute_mlp_act=False).double().train()
    keeping.load_state_dict(model.state_dict())
    assert {m.recompute_act for m in model.modules() if isinstance(m, MLPBlock)} == {True}
    assert {m.recompute_act for m in keeping.modules() if isinstance(m, MLPBlock)} == {False}
    _assert_same_outputs_and_grads(model, keeping, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_odd_batch_size():
    model = small_model('lit_ti').eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out[3:4], model(x[3:4]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['lit_ti', 'lit_s'])
def test_bf16_autocast_on_cpu_is_finite_and_dtm_runs_in_fp32(name):
    model = small_model(name).eval()
    dconv_dtypes = []
    for stage in model.stages[1:]:
        stage.downsample.dconv.register_forward_hook(lambda m, i, o: dconv_dtypes.append(o.dtype))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 96))
    assert dconv_dtypes == [torch.float32] * 3
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize('name, size', [('lit_s', (64, 96)), ('lit_s', (128, 96)), ('lit_ti', (96, 64))])
def test_fused_matches_reference_attention_outputs_and_grads(name, size):
    model = small_model(name, num_classes=4).train()
    reference = copy.deepcopy(model)
    reference.set_attn_impl('reference')
    _assert_same_outputs_and_grads(model, reference, torch.randn(2, 3, *size))


def test_bias_follows_the_live_table_across_steps_and_sizes():
    model = small_model('lit_s', num_classes=3).train()
    tables = [p for n, p in model.named_parameters() if n.endswith('relative_position_bias_table')]
    optimizer = torch.optim.SGD(tables, lr=10.)
    attn = model.stages[2].blocks[0].attn
    sizes = [(64, 64), (96, 64)]
    for size in sizes:  # a training step at each input size changes every table
        table_before = attn.relative_position_bias_table.detach().clone()
        model(torch.randn(2, 3, *size)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert not torch.equal(attn.relative_position_bias_table, table_before)
    model.eval()
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for size in sizes + sizes[:1]:
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(model(x), fresh(x))
        bias = _dense_bias(attn.relative_position_bias_table, attn.table_size, (6, 4))
        expected = _upstream_detection_bias(attn.relative_position_bias_table, attn.table_size, 6, 4)
        torch.testing.assert_close(bias, expected, rtol=1e-6, atol=1e-6)


def test_classifier_api_no_weight_decay_and_group_matcher():
    with torch.device('meta'):
        ti_names = _create('lit_ti').no_weight_decay()
        s_model = _create('lit_s')
    assert ti_names == {'cls_token'} | {f'stages.{i}.pos_embed' for i in range(4)}
    assert s_model.no_weight_decay() == {
        f'stages.{i}.blocks.{j}.attn.relative_position_bias_table' for i, n in ((2, 6), (3, 2)) for j in range(n)}
    grouping = group_parameters(s_model, s_model.group_matcher())
    assert sum(len(v) for v in grouping.values()) == len(list(s_model.parameters()))
    assert len(group_parameters(s_model, s_model.group_matcher(coarse=True))) == 6  # stem, 4 stages, norm+head

    model = small_model('lit_ti')
    groups = param_groups_weight_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())
    decayed = {id(p) for p in groups[1]['params']}
    assert id(model.cls_token) not in decayed and id(model.stages[2].pos_embed) not in decayed
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    model.reset_classifier(0, '')
    assert model(x).shape == (1, 2, 2, 64)  # the map of the class-token stage, without the class token
    s_tiny = small_model('lit_s')
    s_tiny.reset_classifier(0, '')
    assert s_tiny(x).shape == (1, 2, 2, 64)
    with pytest.raises(ValueError, match='class token'):
        s_tiny.reset_classifier(3, 'token')


def test_bad_arguments_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match='attn_impl'):
        _create('lit_s', attn_impl='flash', **SMALL_LIT)
    with pytest.raises(ValueError, match='attn_impl'):
        _create('lit_ti', **SMALL_LIT).set_attn_impl('nope')
    with pytest.raises(ValueError, match='too small'):
        _create('lit_s', **SMALL_LIT)(torch.randn(1, 3, 24, 64))
    features = _create('lit_s', features_only=True, out_indices=(0, 1), **SMALL_LIT)
    assert features(torch.randn(1, 3, 24, 24))[1].shape[-1] == 3


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_loads_lit_ti_upstream_classification_checkpoint(tmp_path):
    with torch.device('meta'):
        upstream_keys = set(to_upstream(_create('lit_ti').state_dict(), 'lit_ti'))
    assert len(upstream_keys) == 190  # the authors' lit_ti.pth key count
    assert {'pos_embed4', 'patch_embed4.dconv.conv_offset.weight', 'block1.0.norm2.weight', 'cls_token'} <= upstream_keys
    source = small_model('lit_ti', seed=3).state_dict()
    torch.save(to_upstream(source, 'lit_ti'), tmp_path / 'lit_ti.pth')  # bare state dict
    assert_same_tensors(load_file('lit_ti', tmp_path / 'lit_ti.pth', **SMALL_LIT), source)


def test_loads_lit_s_upstream_classification_checkpoint_and_adapts_head(tmp_path):
    source = small_model('lit_s', seed=4).state_dict()
    upstream = to_upstream(source, 'lit_s')
    assert 'layers.2.downsample.norm_layer.running_var' in upstream
    assert upstream['layers.3.blocks.0.attn.relative_position_bias_table'].shape == (169, 4)
    path = tmp_path / 'lit_s.pth'
    torch.save({'model': upstream, 'epoch': 299}, path)
    assert_same_tensors(load_file('lit_s', path, **SMALL_LIT), source)
    assert_same_tensors(load_file('lit_s', path, num_classes=0, **SMALL_LIT), source)
    assert load_file('lit_s', path, num_classes=10, **SMALL_LIT).head.weight.shape == (10, 64)


def test_loads_lit_s_coco_checkpoint_with_its_99x99_tables(tmp_path):
    coco = small_model('lit_s', seed=5, img_size=800).state_dict()
    assert coco['stages.2.blocks.0.attn.relative_position_bias_table'].shape == (99 * 99, 2)
    assert coco['stages.3.blocks.0.attn.relative_position_bias_table'].shape == (49 * 49, 4)
    backbone = {k: v for k, v in to_upstream(coco, 'lit_s').items()
                if not k.startswith(('norm.', 'head.')) and not k.endswith('relative_position_index')}
    norms = {f'norm{i}.{p}': torch.randn(SMALL_LIT['embed_dims'][i]) for i in (1, 2, 3) for p in ('weight', 'bias')}
    path = tmp_path / 'mask_rcnn_lit_s.pth'
    torch.save(mmdet2_checkpoint({**backbone, **norms}), path)

    features = load_file('lit_s', path, features_only=True, **SMALL_LIT)
    assert features.model.img_size == (800, 800)  # tables kept at the checkpoint's size
    assert_same_tensors(features.model, coco)
    with torch.no_grad():
        assert [f.shape[1] for f in features(torch.randn(1, 3, 64, 96))] == list(SMALL_LIT['embed_dims'])
    # a classifier keeps its initial final norm and head; everything else comes from the file
    classifier = load_file('lit_s', path, **SMALL_LIT)
    assert torch.equal(classifier.stages[1].downsample.dconv.weight, coco['stages.1.downsample.dconv.weight'])


def test_loads_lit_ti_coco_checkpoint(tmp_path):
    source = small_model('lit_ti', seed=6).state_dict()
    backbone = {k: v for k, v in to_upstream(source, 'lit_ti').items()
                if not k.startswith(('cls_token', 'norm.', 'head.'))}
    path = tmp_path / 'retina_lit_ti.pth'
    torch.save(mmdet2_checkpoint(backbone), path)
    assert_same_tensors(load_file('lit_ti', path, features_only=True, **SMALL_LIT).model, source)


def test_imagenet_tables_resampled_for_a_coco_sized_model(tmp_path):
    source = small_model('lit_s', seed=7).state_dict()
    path = tmp_path / 'lit_s.pth'
    torch.save({'model': to_upstream(source, 'lit_s')}, path)
    model = load_file('lit_s', path, img_size=800, **SMALL_LIT)
    key = 'stages.2.blocks.0.attn.relative_position_bias_table'
    # the authors' mmcv_custom loader: square bicubic resize 27x27 -> 99x99
    expected = F.interpolate(source[key].permute(1, 0).reshape(1, 2, 27, 27), size=(99, 99), mode='bicubic')
    torch.testing.assert_close(model.state_dict()[key], expected.reshape(2, -1).permute(1, 0))


def test_timm_format_state_dict_passes_through(tmp_path):
    from safetensors.torch import save_file
    source = small_model('lit_ti', seed=8).state_dict()
    path = tmp_path / 'model.safetensors'
    save_file(source, str(path))
    assert_same_tensors(load_file('lit_ti', path, **SMALL_LIT), source)


def test_wrong_architecture_and_corrupt_files_raise_checkpoint_error(tmp_path):
    lit_s = tmp_path / 'lit_s.pth'
    torch.save({'model': to_upstream(_create('lit_s', **SMALL_LIT).state_dict(), 'lit_s')}, lit_s)
    with pytest.raises(CheckpointError, match=r"architecture 'lit_m'(.|\n)*missing keys: stages\.2\.blocks\.1"):
        load_file('lit_m', lit_s, **dict(SMALL_LIT, depths=(1, 1, 3, 1)))
    with pytest.raises(CheckpointError, match='shape mismatches'):
        load_file('lit_b', lit_s, **dict(SMALL_LIT, embed_dims=(16, 32, 48, 96)))
    with pytest.raises(CheckpointError, match="architecture 'lit_ti'"):
        load_file('lit_ti', lit_s, **SMALL_LIT)
    truncated = tmp_path / 'truncated.pth'
    data = lit_s.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])  # an interrupted download
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        load_file('lit_s', truncated, **SMALL_LIT)


def test_export_of_a_coco_checkpoint_rebuilds_its_tables(tmp_path):
    coco = small_model('lit_s', seed=9, img_size=800).state_dict()
    path = tmp_path / 'retina_lit_s.pth'
    backbone = {k: v for k, v in to_upstream(coco, 'lit_s').items() if not k.startswith('head.')}
    torch.save(mmdet2_checkpoint(backbone), path)
    model = load_file('lit_s', path, **SMALL_LIT)  # table size taken from the checkpoint, not passed by the user
    timm.models.save_for_hf(model, tmp_path / 'export', safe_serialization=True)
    reloaded = _create(f'local-dir:{tmp_path / "export"}', pretrained=True)
    assert reloaded.img_size == (800, 800)
    assert_same_tensors(reloaded, model.state_dict())
