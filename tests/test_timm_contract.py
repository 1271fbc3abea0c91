"""timm's generic model contract (the checks of timm's own ``tests/test_models.py``),
asserted for every model this package registers.

Models are found in timm's registry (every entrypoint defined in ``lesa_lit_models``), so a new model is
covered without editing this file. To keep the run short:

* the cfg / shape checks run for **every model and every pretrained tag**, at the test input size;
* the tests that compute (forward, backward, features, intermediates, pretrained loading, grad checkpointing,
  FX) run on the models with at most ``HEAVY_MAX_PARAMS`` parameters (lesa_resnet50, lesa_resnet50_det, lit_ti,
  lit_s). The giants (LESA-WRN50, LIT-M, LIT-B) are the same code, only wider or deeper, and are skipped there.

Every model is built at its SMALL configuration (_helpers.py: the same code with fewer blocks and narrower stages;
the contract does not depend on the size). Input sizes follow timm's harness: the cfg's ``input_size`` for
``fixed_input_size`` models, else ``SIZE`` px; a flexible model whose constructor sizes its tables by ``img_size``
is built with ``img_size=SIZE``.

TorchScript is not
covered: no model of the package runs scripted (LIT-S list sizes, and the shared
DeformConv2dPack's ``torch.autocast(device_type=x.device.type)`` is not a constant).
"""
import functools
import inspect
import math
from typing import Any, Dict, List, Tuple

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_channel_dim, get_graph_node_names, get_spatial_dim

from lesa_lit_models import package_models
from _helpers import SMALL

SIZE = 64
HEAVY_MAX_PARAMS = 30_000_000

@functools.lru_cache(maxsize=None)
def _num_params_and_class(name: str) -> Tuple[int, type]:
    with torch.device('meta'):  # no memory, no init cost
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters()), type(model)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


MODELS = package_models()
TAGGED = timm.list_models([f'{n}.*' for n in MODELS], include_tags=True) + [
    n for n in MODELS if not timm.list_models(n + '.*', include_tags=True)]  # every tag, with weights or not
HEAVY = [n for n in MODELS if _num_params_and_class(n)[0] <= HEAVY_MAX_PARAMS]


def _test_setup(name: str) -> Tuple[Dict[str, Any], Tuple[int, int, int]]:
    """(create_model kwargs, input size) for the computing tests of ``name``."""
    cfg = timm.get_pretrained_cfg(name).to_dict()
    if cfg.get('fixed_input_size'):
        return {}, tuple(cfg['input_size'])
    takes_img_size = 'img_size' in inspect.signature(_num_params_and_class(name)[1].__init__).parameters
    return (dict(img_size=SIZE) if takes_img_size else {}), (3, SIZE, SIZE)


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL[name.split('.')[0]], **_test_setup(name)[0], **kwargs})


def _input(name: str, batch_size: int = 1, in_chans: int = 3) -> torch.Tensor:
    size = _test_setup(name)[1][1:]
    return torch.randn((batch_size, in_chans, *size), generator=torch.Generator().manual_seed(1))


def _assert_feature_maps(
        features: List[torch.Tensor],
        feature_info: List[Dict[str, Any]],
        image: torch.Tensor,
        output_fmt: str = 'NCHW',
):
    """Channels match ``feature_info``; spatial size at most ceil(input / reduction) + 1; finite values."""
    channels, reductions = [f['num_chs'] for f in feature_info], [f['reduction'] for f in feature_info]
    assert len(features) == len(channels)
    for feature, num_chs, reduction in zip(features, channels, reductions):
        assert feature.shape[0] == image.shape[0]
        assert feature.shape[get_channel_dim(output_fmt)] == num_chs
        for dim, in_size in zip(get_spatial_dim(output_fmt), image.shape[-2:]):
            assert feature.shape[dim] <= math.ceil(in_size / reduction) + 1, \
                f'{tuple(feature.shape)} at reduction {reduction}'
        assert torch.isfinite(feature).all()


def test_models_are_discovered():
    assert {'lesa_resnet50', 'lit_ti'} <= set(MODELS)
    families = {timm.models.model_entrypoint(n).__module__ for n in MODELS}
    assert families == {timm.models.model_entrypoint(n).__module__ for n in HEAVY}, 'a family has no small model'


# ---------------------------------------------------------------- cfg checks: every model and every pretrained tag

@pytest.mark.parametrize('name', TAGGED)
def test_model_default_cfgs(name):
    """timm's default-cfg checks. A flexible-size model runs at the test size; its ``pool_size`` is checked at the
    cfg's ``input_size`` through the final feature reduction, and the forward through the same reduction."""
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    assert model.num_classes == cfg['num_classes'] >= 0
    assert model.num_features > 0
    head_hidden_size = getattr(model, 'head_hidden_size', model.num_features)
    assert head_hidden_size > 0
    reduction = model.feature_info[-1]['reduction']
    image = _input(name)

    with torch.no_grad():
        features = model.forward_features(image)
        out = model(image)
        grid = tuple(s // reduction for s in image.shape[-2:])
        output_fmt = getattr(model, 'output_fmt', 'NCHW')  # an unpooled map, as timm's standard models give
        assert features.ndim == 4 and features.shape[get_channel_dim(output_fmt)] == model.num_features
        assert tuple(features.shape[d] for d in get_spatial_dim(output_fmt)) == grid
        assert tuple(cfg['pool_size']) == tuple(s // reduction for s in cfg['input_size'][1:]), \
            f'pool_size {cfg["pool_size"]} != forward_features size at input_size {cfg["input_size"]}'
        torch.testing.assert_close(out, model.forward_head(features))  # forward == forward_head(forward_features)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, head_hidden_size)
        assert out.shape == (1, model.num_classes or head_hidden_size)

        model.reset_classifier(7)  # keeps the pooling
        assert model.forward_head(features).shape == (1, 7)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model.forward_head(features), pre_logits)
        model.reset_classifier(0, '')
        assert model.forward_head(features).shape == features.shape
        headless = _create(name, num_classes=0, global_pool='').eval()
        assert headless.forward_head(features).shape == features.shape  # its forward, by the assert_close above

    if cfg['num_classes']:
        for classifier in _as_tuple(cfg['classifier']):
            assert classifier + '.weight' in state_dict, f'cfg classifier {classifier!r} is not in the state_dict'
    for first_conv in _as_tuple(cfg['first_conv']):
        assert first_conv + '.weight' in state_dict, f'cfg first_conv {first_conv!r} is not in the state_dict'


# ---------------------------------------------------------------- computing tests: the small model of each family

@pytest.mark.parametrize('name', HEAVY)
def test_model_forward(name):
    model = _create(name).eval()
    image = _input(name, batch_size=2)
    with torch.no_grad():
        out = model(image)
    assert out.shape == (2, model.num_classes or model.num_features)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize('name', HEAVY)
def test_model_backward(name):
    model = _create(name, num_classes=42).train()
    out = model(_input(name, batch_size=2))
    assert out.shape == (2, 42)
    out.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without a gradient: {no_grad}'
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('name', HEAVY)
def test_grad_checkpointing_leaves_outputs_and_grads_unchanged(name):
    model = _create(name).eval()  # eval: BatchNorm must not update its statistics twice under recomputation
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(_input(name))
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out, grads), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out)
    for n, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[n], grad, msg=lambda m: f'{n}: {m}')


@pytest.mark.parametrize('name', HEAVY)
@pytest.mark.parametrize('feature_cls', [None, 'getter'])
def test_features_only(name, feature_cls):
    kwargs = dict(feature_cls=feature_cls) if feature_cls else {}
    model = _create(name, features_only=True, **kwargs).eval()
    assert len(model.feature_info) >= 3
    image = _input(name)
    with torch.no_grad():
        _assert_feature_maps(model(image), model.feature_info.get_dicts(), image)


@pytest.mark.parametrize('name', HEAVY)
def test_forward_intermediates_matches_feature_info_and_forward_features(name):
    model = _create(name).eval()
    image = _input(name)
    with torch.no_grad():
        expected_final = model.forward_features(image)
        for enable_checkpointing in (False, True):
            model.set_grad_checkpointing(enable_checkpointing)
            final, intermediates = model.forward_intermediates(image)
            torch.testing.assert_close(final, expected_final)
            _assert_feature_maps(intermediates, model.feature_info, image)
        # negative indices count from the last feature level; stop_early skips the rest of the network
        first_two = model.forward_intermediates(
            image, indices=[0, 1 - len(intermediates)], intermediates_only=True, stop_early=True)
        assert len(first_two) == 2
        for got, want in zip(first_two, intermediates[:2]):
            torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize('name', HEAVY)
def test_load_pretrained_state_dict_with_new_in_chans_and_num_classes(name):
    source = _create(name).eval()
    source_sd = source.state_dict()
    cfg = source.pretrained_cfg
    model = _create(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=source_sd), in_chans=1,
                    num_classes=5).eval()
    classifier_keys = {c + suffix for c in _as_tuple(cfg['classifier']) for suffix in ('.weight', '.bias')}
    first_conv_keys = {c + '.weight' for c in _as_tuple(cfg['first_conv'])}
    for key, value in model.state_dict().items():
        if key in classifier_keys:
            assert value.shape[0] == 5
        elif key in first_conv_keys:
            assert value.shape[1] == 1
            torch.testing.assert_close(value, source_sd[key].sum(dim=1, keepdim=True))  # timm's adapt_input_conv
        else:
            torch.testing.assert_close(value, source_sd[key], msg=lambda m: f'{key}: {m}')
    with torch.no_grad():
        assert model(_input(name, in_chans=1)).shape == (1, 5)

    features = _create(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=source_sd),
                       features_only=True).eval()
    image = _input(name)
    with torch.no_grad():
        _, expected = source.forward_intermediates(image, indices=features.feature_info.out_indices)
        for got, want in zip(features(image), expected):
            torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize('name', HEAVY)
def test_fx_forward_and_backward(name):
    model = _create(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, [eval_nodes[-1]])
    image = _input(name)
    with torch.no_grad():
        assert torch.equal(fx_model(image)[eval_nodes[-1]], model(image)), 'FX graph output != eager output'

    model.train()
    fx_model = create_feature_extractor(model, {train_nodes[-1]: 'out'}).train()
    fx_model(_input(name, batch_size=2))['out'].mean().backward()  # batch 2: BatchNorm in train mode
    no_grad = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without a gradient through the FX graph: {no_grad}'


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    pytest.param('lit_ti', marks=pytest.mark.xfail(strict=True, raises=IndexError, reason=(
        "FX feature extraction traces the classifier's forward, where LIT-Ti's stage 4 attends together with the "
        "class token, so that node is a (B, 1 + HW, C) token sequence, not a map; the default getter features "
        "run stage 4 without it, as the authors' detection backbone does"))) if n == 'lit_ti' else n
    for n in HEAVY
])
def test_fx_feature_extraction(name):
    model = _create(name, features_only=True, feature_cls='fx').eval()
    image = _input(name)
    with torch.no_grad():
        _assert_feature_maps(model(image), model.feature_info.get_dicts(), image, model.output_fmt)
