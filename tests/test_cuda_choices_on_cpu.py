"""The choices the code makes only on CUDA, taken on the CPU: SDPA given q, k and v of different head dims (no zero
padding), bands of CUDA's default size, torchvision's deform_conv2d kernel. Each family, with all of them, computes
what the reference attention with the CPU's choices computes, in float64, outputs and gradients: a GPU run adds the
device alone (tests/test_cuda.py)."""
import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import lesa_lit_models  # noqa: F401  (registers the models)
from lesa_lit_models.layers import banded_attention, deform_conv
from _helpers import small_model


@contextlib.contextmanager
def cuda_choices():
    """Every CUDA-only choice forced; yields the (q, v) head dims of every SDPA call and the number of calls of
    torchvision's deform_conv2d."""
    head_dims, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        head_dims.append((q.shape[-1], v.shape[-1]))
        return sdpa(q, k, v, *args, **kwargs)

    cuda_band = banded_attention.default_max_chunk_logits(torch.device('cuda'))
    with mock.patch.object(banded_attention, '_sdpa_takes_unequal_head_dims', return_value=True), \
            mock.patch.object(banded_attention, 'default_max_chunk_logits', return_value=cuda_band), \
            mock.patch.object(deform_conv, '_uses_torchvision_kernel', return_value=True), \
            mock.patch.object(deform_conv, 'deform_conv2d', wraps=deform_conv.deform_conv2d) as torchvision_dcn, \
            mock.patch.object(banded_attention.F, 'scaled_dot_product_attention', recording_sdpa):
        yield head_dims, torchvision_dcn


def outputs_and_grads(model, x):
    features = model(x)
    loss = sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in features)
    return features, torch.autograd.grad(loss, [x, *model.parameters()])


@pytest.mark.parametrize('mode', ['eval', 'train'])
@pytest.mark.parametrize('name', ['lesa_resnet50_det', 'lit_s'])
def test_every_cuda_choice_computes_the_reference(name, mode):
    """lesa_resnet50_det: deformable unary convs and the fused binary term (v twice as wide as q and k); LIT-S:
    Deformable Token Merging and the banded offset-bias attention."""
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                    requires_grad=True)
    kwargs = dict(features_only=True, img_size=64) if name.startswith('lesa') else dict(features_only=True)
    reference = small_model(name, attn_impl='reference', **kwargs).double().train(mode == 'train')
    fused = small_model(name, **kwargs).double().train(mode == 'train')
    fused.load_state_dict(reference.state_dict())
    want, want_grads = outputs_and_grads(reference, x)
    with cuda_choices() as (head_dims, torchvision_dcn):
        got, got_grads = outputs_and_grads(fused, x)
    assert torchvision_dcn.call_count > 0 and head_dims
    if name.startswith('lesa'):
        assert any(q != v for q, v in head_dims)  # v went in at its own width
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    for (param, _), g, w in zip([('x', x), *fused.named_parameters()], got_grads, want_grads, strict=True):
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9 * max(scale, 1.), msg=lambda m: f'{param}: {m}')
