"""Plain helpers shared by the test modules (fixtures are in conftest.py): the smallest model of each family,
random weights with nothing zero or identity, "same tensors" assertions, the authors' checkpoint layouts and
pickles that would run code if a loader let them.

The key renames below are written from the authors' code, independently of the package's checkpoint filters, which
the tests check against them.
"""
import math
import os
import re
import sys
import types
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import timm
import torch
import torch.nn as nn

# Each family's code at a fraction of the cost: fewer blocks and narrower stages than the registered models
# (lesa_resnet50: LESA in stage 3's second block and stage 4; LIT: one block a stage). LESA-WRN50 and LIT-M/B are
# LESA-R50 and LIT-S at other widths and depths.
SMALL_LIT = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 2, 4))
SMALL = {
    'lesa_resnet50': dict(layers=(1, 1, 2, 1)),
    'lesa_resnet50_det': dict(layers=(1, 1, 2, 1)),
    'lit_ti': SMALL_LIT,
    'lit_s': SMALL_LIT,
}
SMALL['lesa_wrn50'], SMALL['lesa_wrn50_det'] = SMALL['lesa_resnet50'], SMALL['lesa_resnet50_det']
SMALL['lit_m'] = SMALL['lit_b'] = SMALL['lit_s']
# SMALL as the tracing tests (compile, export, ONNX) build it at SIZE px: LESA's tables laid out for that size, the
# banded attention one query row per band so that it attends in several bands
SIZE = 64
_BANDED = ('lesa_resnet50_det', 'lesa_wrn50_det', 'lit_s', 'lit_m', 'lit_b')
TRACED = {name: dict(kwargs, **(dict(img_size=SIZE) if name.startswith('lesa') else {}),
                     **(dict(max_chunk_logits=1) if name in _BANDED else {}))
          for name, kwargs in SMALL.items()}


def small_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``SMALL[name]`` built by timm (``kwargs`` override it) and :func:`randomise`-d."""
    torch.manual_seed(seed)
    return randomise(timm.create_model(name, **{**SMALL[name], **kwargs}), seed)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affines, LayerNorm affines, position tables and embeddings, deformable
    offsets and classifier: nothing zero or identity that would hide a wrong term."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale=1.):
        return (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(t.dtype)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(rand(m.running_mean, .2))
                m.running_var.copy_(1 + rand(m.running_var, .2).abs())
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + rand(m.weight, .2))
                m.bias.copy_(rand(m.bias, .2))
            elif hasattr(m, 'conv_offset'):  # deformable convolutions (LESA's DCN, LIT's DTM)
                m.conv_offset.weight.copy_(rand(m.conv_offset.weight, .02))
                m.conv_offset.bias.copy_(rand(m.conv_offset.bias, .5))
        for name, p in model.named_parameters():
            if name.endswith(('relative', 'rel_height', 'rel_width', 'relative_position_bias_table', 'pos_embed',
                              'cls_token')) or name.startswith(('fc.', 'head.')):
                p.copy_(rand(p, .3))
    return model


def calibrate_batchnorms(model: nn.Module, batches) -> nn.Module:
    """Running statistics of every BatchNorm: the average over ``batches`` (inputs of ``model``), as a trained
    network's match its activations. A fresh network with statistics 0 / 1 explodes in eval mode and turns float32
    rounding into large differences. The mode ``model`` was in is kept."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, training = [m.momentum for m in norms], model.training
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        model.train()
        for x in batches:
            model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.train(training)


def relative_logits_2d_oracle(q: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, grid) -> torch.Tensor:
    """LESA's ``detection_qr`` relative logits from the formula: ``qr[..., i, j] = q_i . (rel_height[x_j - x_i + H - 1]
    + rel_width[y_j - y_i + W - 1])`` for q (N, G, L, d), token i at ``(x_i, y_i) = divmod(i, W)``."""
    height, width = grid
    x, y = torch.arange(height * width).div(width, rounding_mode='floor'), torch.arange(height * width) % width
    relative = rel_height[x[None, :] - x[:, None] + height - 1] + rel_width[y[None, :] - y[:, None] + width - 1]
    return torch.einsum('ngid,ijd->ngij', q, relative)


def as_list(out) -> List[torch.Tensor]:
    """A model's output (one tensor or a list / tuple of feature maps) as a list."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def outputs_and_grads(module: nn.Module, *inputs, call=None, grad_out=None) -> Dict[str, torch.Tensor]:
    """One forward of ``inputs`` through ``module`` (or ``call``, e.g. the compiled module or a function of the
    module) and backward of ``grad_out`` (default: of ``sum(o * cos(o))``): ``output:i``, ``grad:input<i>`` of the
    floating-point tensor inputs, ``grad:<name>`` of every parameter (zero where unused) and ``buffer:<name>`` after."""
    inputs = [t.detach().clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t
              for t in inputs]
    module.zero_grad(set_to_none=True)
    outs = as_list((module if call is None else call)(*inputs))
    if grad_out is None:
        sum((o * torch.cos(o)).sum() for o in outs).backward()
    else:
        torch.autograd.backward(outs, as_list(grad_out))
    result = {f'output:{i}': o.detach() for i, o in enumerate(outs)}
    result.update({f'grad:input{i}': t.grad for i, t in enumerate(inputs) if torch.is_tensor(t) and t.requires_grad})
    result.update({f'grad:{n}': torch.zeros_like(p) if p.grad is None else p.grad
                   for n, p in module.named_parameters()})
    result.update({f'buffer:{n}': b.clone() for n, b in module.named_buffers()})
    return result


def assert_same_results(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], rtol=None, atol=None,
                        grads: Optional[dict] = None, buffers: Optional[dict] = None):
    """Every entry of ``got`` (:func:`outputs_and_grads`) is close to ``want``'s: outputs within ``rtol`` / ``atol``,
    gradients and buffers within ``grads`` / ``buffers`` (rtol and atol) where given, else the same."""
    assert got.keys() == want.keys()
    tolerances = {'output': dict(rtol=rtol, atol=atol)}
    tolerances['grad'] = grads or tolerances['output']
    tolerances['buffer'] = buffers or tolerances['output']
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, **tolerances[k.split(':')[0]], msg=lambda m: f'{k}: {m}')


def state_of(weights: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
    return weights.state_dict() if isinstance(weights, nn.Module) else weights


def assert_same_tensors(got, want, same_keys: bool = False):
    """Every tensor of ``got`` (a module or a state dict) equals ``want``'s of the same name, bit for bit; with
    ``same_keys`` the two hold the same names."""
    got, want = state_of(got), state_of(want)
    if same_keys:
        assert set(got) == set(want)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


def load_file(name: str, path, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` with the weights read from the file ``path``."""
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


# ------------------------------------------------------------------------------------------- the authors' layouts

def lit_ti_upstream_key(key: str) -> str:
    """A timm key of LIT-Ti as the authors' DeiT-based code names it."""
    key = re.sub(r'^patch_embed\.', 'patch_embed1.', key)
    key = re.sub(r'^stages\.(\d)\.downsample\.', lambda m: f'patch_embed{int(m[1]) + 1}.', key)
    key = re.sub(r'^stages\.(\d)\.pos_embed$', lambda m: f'pos_embed{int(m[1]) + 1}', key)
    return re.sub(r'^stages\.(\d)\.blocks\.', lambda m: f'block{int(m[1]) + 1}.', key)


def lit_smb_upstream_key(key: str) -> str:
    """A timm key of LIT-S/M/B as the authors' Swin-based code names it (detection output norms: ``norm{i}``)."""
    key = re.sub(r'^out_norms\.(\d)\.', r'norm\1.', key)
    key = re.sub(r'^stages\.(\d)\.downsample\.', lambda m: f'layers.{int(m[1]) - 1}.downsample.', key)
    return re.sub(r'^stages\.(\d)\.blocks\.', r'layers.\1.blocks.', key)


def upstream_key(key: str, model_name: str) -> str:
    """A timm key of ``model_name`` as the authors' code names it (LESA keeps theirs: torchvision's)."""
    if model_name.startswith('lesa'):
        return key
    return lit_ti_upstream_key(key) if model_name == 'lit_ti' else lit_smb_upstream_key(key)


def swin_relative_position_index(h: int, w: int) -> torch.Tensor:
    """Swin's relative position index of an h x w window (written from its definition)."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    return rel.sum(-1)


def to_upstream(state_dict: Mapping[str, torch.Tensor], model_name: str) -> dict:
    """A timm state dict of ``model_name`` as the authors' classification code saves it: their key names, and in
    LIT-S/M/B the persistent ``relative_position_index`` buffer beside each table."""
    out = {}
    for k, v in state_dict.items():
        k = upstream_key(k, model_name)
        out[k] = v
        if k.endswith('relative_position_bias_table'):
            side = (math.isqrt(v.shape[0]) + 1) // 2
            out[k.replace('bias_table', 'index')] = swin_relative_position_index(side, side)
    return out


def upstream_detector(state_dict: Mapping[str, torch.Tensor], model_name: str, prefix: str = '') -> dict:
    """A detector state dict in the authors' mmdet 2.x layout: the keys under ``prefix`` are the backbone's (timm
    names below ``prefix``; the adapter's ``body.model.`` / ``body.`` are dropped), renamed and put under
    ``backbone.``; neck and heads as they are."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            k = re.sub(r'^body\.(model\.)?', '', k[len(prefix):])
            k = 'backbone.' + upstream_key(k, model_name)
        out[k] = v
    return out


def mmdet2_checkpoint(backbone_state: Mapping[str, torch.Tensor], channels: int = 8) -> dict:
    """An mmdet 2.x detector file around a backbone state dict in the authors' names: a ``meta`` with numpy objects,
    a neck and heads, an optimizer."""
    return {
        'meta': {'mmdet_version': '2.11.0', 'epoch': 20, 'CLASSES': np.array(['person', 'car']),
                 'hook_msgs': {'last_ckpt': 'work_dirs/epoch_19.pth'}, 'img_norm': np.array([123.675, 116.28])},
        'state_dict': {**{'backbone.' + k: v for k, v in backbone_state.items()},
                       'neck.lateral_convs.0.conv.weight': torch.randn(channels, channels, 1, 1),
                       'rpn_head.rpn_conv.weight': torch.randn(channels, channels, 3, 3),
                       'roi_head.bbox_head.fc_cls.weight': torch.randn(81, channels)},
        'optimizer': {'state': {}, 'param_groups': []},
    }


class CfgNode(dict):
    """What yacs.config.CfgNode pickles as: a dict subclass with its flags in __dict__."""

    def __init__(self, init=None):
        super().__init__(init or {})
        self.__dict__.update({'__immutable__': False, '__deprecated_keys__': set(), '__renamed_keys__': {},
                              '__new_allowed__': False})


def save_with_module(obj, path, monkeypatch, module: str, *classes: type, **kwargs):
    """torch.save ``obj`` while ``classes`` are importable from ``module`` (the names the pickle records); they are
    gone again afterwards, as on a machine without that package."""
    fake = types.ModuleType(module)
    for cls in classes:
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(fake, cls.__name__, cls)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, module, fake)
        m.setitem(sys.modules, module.split('.')[0], types.ModuleType(module.split('.')[0]))
        torch.save(obj, path, **kwargs)
    assert module not in sys.modules


# --------------------------------------------------------------------------- pickles that call code when unpickled

class OpensAFile:
    """Unpickling calls ``open(path, 'w')`` (recorded as ``io.open``): the file appears if a loader ran it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


class RunsAShellCommand:
    """Unpickling calls ``os.system('touch path')`` (recorded as ``posix.system``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f'touch {self.path}',)


class EvaluatesCode:
    """Unpickling calls ``eval`` on code that creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return eval, (f'open({self.path!r}, "w")',)


def save_crafted(path, marker, payload: type = RunsAShellCommand, state_dict=None, **save_kwargs):
    """A checkpoint whose ``meta`` creates the file ``marker`` if anything unpickles it unsafely."""
    state_dict = {'w': torch.zeros(2)} if state_dict is None else state_dict
    torch.save({'state_dict': state_dict, 'meta': {'note': payload(marker)}}, path, **save_kwargs)
    return path


# ------------------------------------------------------------------------------------------------------ detection

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / 'detection'
LESA_CONFIGS, LIT_CONFIGS = DETECTION / 'configs' / 'lesa', DETECTION / 'configs' / 'lit'
DEMO_CONFIG = DETECTION / 'configs' / 'demo' / 'mask-rcnn_lit-ti_fpn_128-demo_synthetic-coco.py'
MASK_RCNN_LESA = LESA_CONFIGS / 'mask-rcnn_lesa-r50-dconv-c3-c5_fpn_1024-8xb1-20e_coco.py'
HTC_LESA = LESA_CONFIGS / 'htc_lesa-wrn50-dconv-c3-c5_fpn_1280-4xb1-20e_coco.py'
HTC_LESA_NO_SEM = LESA_CONFIGS / 'htc-without-semantic_lesa-wrn50-dconv-c3-c5_fpn_1280-4xb1-20e_coco.py'
RETINA_LIT_TI = LIT_CONFIGS / 'retinanet_lit-ti_fpn_1x_coco.py'
RETINA_LIT_S = LIT_CONFIGS / 'retinanet_lit-s_fpn_amp-1x_coco.py'
MASK_RCNN_LIT_TI = LIT_CONFIGS / 'mask-rcnn_lit-ti_fpn_1x_coco.py'
MASK_RCNN_LIT_S = LIT_CONFIGS / 'mask-rcnn_lit-s_fpn_amp-1x_coco.py'
DETECTION_SIZE = 128  # input side for CPU steps; a multiple of 32, so LESA's grids stay exact
# the synthetic COCO dataset of the tests (conftest.py ``coco``)
COCO_SPEC = dict(num_train=4, num_val=2, num_test=2, min_side=96, max_side=144)


def reduced_depth(model_name: str) -> dict:
    """The block counts of ``SMALL[model_name]``: the same channels (the neck's inputs), fewer blocks."""
    return {k: v for k, v in SMALL.get(model_name, {}).items() if k in ('layers', 'depths')}


def small_config(path, data_root=None, size=DETECTION_SIZE, **cfg_options):
    """A paper config at a small input, random backbone init, fewer proposals and the backbone's stages one or two
    blocks deep."""
    from lesa_lit_det.engine import load_config, reduce_proposals
    cfg = load_config(str(path), dict(cfg_options, **{'model.backbone.init_cfg': None}),
                      data_root=None if data_root is None else str(data_root), input_size=size)
    cfg.model.backbone.update(reduced_depth(cfg.model.backbone.model_name))
    reduce_proposals(cfg, proposals=50, samples=32)
    return cfg


def build(cfg):
    """The detector of ``cfg``, its weights initialised as mmengine's runner does."""
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def make_backbone(model_name, **kwargs):
    """The adapter (``lesa_lit_det.TimmBackbone``) for ``model_name``."""
    from mmdet.registry import MODELS
    return MODELS.build(dict(type='TimmBackbone', model_name=model_name, **kwargs))


def pretrained(path, **kwargs):
    """An mmengine ``init_cfg`` reading the weights from ``path``."""
    return dict(type='Pretrained', checkpoint=str(path), **kwargs)
