"""Deformable convolution (DCN v1, mmcv's layout): the formula, mmcv's offset convention, and the grid_sample op
against torchvision's deform_conv2d (outputs and gradients, every geometry the models use)."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from lesa_lit_models.layers.deform_conv import DeformConv2dPack, deform_conv2d_sampled
from lesa_lit_models.layers.deform_merge import DeformableTokenMerging
from _helpers import randomise


def _bilinear_zero(x, py, px):
    """DCN v1 sampling: 0 outside (-1, H) x (-1, W); otherwise bilinear with zero-valued out-of-map neighbours."""
    B, C, H, W = x.shape
    out = x.new_zeros(B, C, *py.shape[-2:])
    valid = (py > -1) & (py < H) & (px > -1) & (px < W)
    y0, x0 = torch.floor(py), torch.floor(px)
    for dy, wy in ((0, 1 - (py - y0)), (1, py - y0)):
        for dx, wx in ((0, 1 - (px - x0)), (1, px - x0)):
            yy, xx = (y0 + dy).long(), (x0 + dx).long()
            for b in range(B):
                for h in range(py.shape[-2]):
                    for w in range(py.shape[-1]):
                        y, xpos = yy[b, h, w].item(), xx[b, h, w].item()
                        if valid[b, h, w] and 0 <= y < H and 0 <= xpos < W:
                            out[b, :, h, w] += x[b, :, y, xpos] * wy[b, h, w] * wx[b, h, w]
    return out


def _deform_conv_k2s2_reference(x, offset, weight, bias):
    """Y = bias + sum_{c,i,j} W[o,c,i,j] * bilin(X[c], 2h + i + dy_{2i+j}, 2w + j + dx_{2i+j})."""
    B, _, Ho, Wo = offset.shape
    base_y = torch.arange(Ho, dtype=x.dtype).view(1, Ho, 1) * 2
    base_x = torch.arange(Wo, dtype=x.dtype).view(1, 1, Wo) * 2
    out = bias.view(1, -1, 1, 1).expand(B, -1, Ho, Wo).clone()
    for i in range(2):
        for j in range(2):
            n = 2 * i + j
            sampled = _bilinear_zero(x, base_y + i + offset[:, 2 * n], base_x + j + offset[:, 2 * n + 1])
            out += torch.einsum('bchw,oc->bohw', sampled, weight[:, :, i, j])
    return out


def test_dtm_with_random_offsets_matches_bilinear_reference():
    torch.manual_seed(0)
    dtm = randomise(DeformableTokenMerging(3, 4), seed=1).eval()
    with torch.no_grad():
        dtm.dconv.conv_offset.weight.normal_(0, 0.5)
        dtm.dconv.conv_offset.bias.normal_(0, 1.5)
    x = torch.randn(5, 3, 6, 8)  # batch 5: the authors' im2col_step crashed on odd batches >= 5
    offset = dtm.dconv.conv_offset(x)
    # sampling points: some partly outside the map (bilinear with zero neighbours), some wholly outside (zero)
    ys = torch.arange(3).view(1, 1, 3, 1) * 2 + torch.tensor([0, 0, 1, 1]).view(1, 4, 1, 1) + offset[:, 0::2]
    xs = torch.arange(4).view(1, 1, 1, 4) * 2 + torch.tensor([0, 1, 0, 1]).view(1, 4, 1, 1) + offset[:, 1::2]
    assert ((ys < 0) | (ys > 5) | (xs < 0) | (xs > 7)).any()
    assert ((ys <= -1) | (ys >= 6) | (xs <= -1) | (xs >= 8)).any()
    bn = dtm.norm_layer
    expected = F.gelu(F.batch_norm(
        _deform_conv_k2s2_reference(x, offset, dtm.dconv.weight, dtm.dconv.bias), bn.running_mean, bn.running_var,
        bn.weight, bn.bias, eps=bn.eps))
    torch.testing.assert_close(dtm(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_offsets_give_the_plain_conv_and_offsets_follow_mmcv_layout():
    torch.manual_seed(0)
    dcn = DeformConv2dPack(32, 32, 3, padding=1, groups=4, bias=False)
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(dcn(x), F.conv2d(x, dcn.weight, padding=1, groups=4))
    down = DeformConv2dPack(16, 16, 3, stride=2, padding=1, bias=False)  # the stride-2 DCN of LESA's stage entries
    torch.testing.assert_close(down(x[:, :16]), F.conv2d(x[:, :16], down.weight, stride=2, padding=1))
    # mmcv offset convention: channel 2n is dy, 2n+1 is dx of kernel point n; dx = +1 everywhere reads x + 1
    with torch.no_grad():
        dcn.conv_offset.bias[1::2] = 1.
    shifted = F.conv2d(F.pad(x[..., 1:], (0, 1)), dcn.weight, padding=1, groups=4)
    torch.testing.assert_close(dcn(x)[..., 1:], shifted[..., 1:], rtol=1e-5, atol=1e-5)  # column 0 reads x[0], not pad


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
