"""The grid_sample DCN equals torchvision's deform_conv2d: outputs and gradients, every geometry the models use."""
import pytest
import torch
from torchvision.ops import deform_conv2d

from lesa_lit_models.layers.deform_conv import DeformConv2dPack, deform_conv2d_sampled


@pytest.mark.parametrize('batch,chans,out_chans,size,kernel,stride,padding,dilation,groups,deform_groups,bias', [
    (2, 8, 6, (7, 9), 3, 1, 1, 1, 2, 2, True),  # groups and deformable groups
    (1, 16, 16, (8, 6), 3, 2, 1, 1, 8, 1, False),  # the stride-2 grouped unary DCN of a LESA block
    (2, 4, 8, (6, 6), 2, 2, 0, 1, 1, 1, True),  # LIT's Deformable Token Merging (2x2, stride 2, bias)
    (1, 4, 4, (5, 5), 3, 1, 2, 2, 1, 4, False),  # dilation
    (1, 4, 4, (1, 5), 3, 1, 1, 1, 1, 1, False),  # a one-pixel side
])
def test_sampled_deform_conv_equals_torchvision(
        batch, chans, out_chans, size, kernel, stride, padding, dilation, groups, deform_groups, bias):
    gen = torch.Generator().manual_seed(0)
    out_size = [(s + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for s in size]

    def rand(*shape, scale=1.):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    x = rand(batch, chans, *size)
    offset = rand(batch, deform_groups * 2 * kernel * kernel, *out_size, scale=3.)  # many points off the map
    weight = rand(out_chans, chans // groups, kernel, kernel)
    bias_t = rand(out_chans) if bias else None
    inputs = [t for t in (x, offset, weight, bias_t) if t is not None]
    expected = deform_conv2d(x, offset, weight, bias_t, stride=stride, padding=padding, dilation=dilation)
    out = deform_conv2d_sampled(x, offset, weight, bias_t, (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for g, g_ref in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_layer_uses_the_sampled_op_off_cuda_and_keeps_no_columns_for_backward(saved_for_backward):
    layer = DeformConv2dPack(8, 8, 3, padding=1).double()
    with torch.no_grad():
        layer.conv_offset.bias.normal_()
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64, requires_grad=True)
    with saved_for_backward() as saved:
        out = layer(x)
    expected = deform_conv2d(x, layer.conv_offset(x), layer.weight, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the (N, C * 9, H, W) sampled columns are recomputed, not saved
    assert max(t.numel() for t in saved) < 9 * x.numel()
