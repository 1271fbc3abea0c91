"""Hugging Face transformers as a client: DETR and Deformable DETR build LESA and LIT backbones from
``TimmBackboneConfig`` (offline, random weights) and swap every BatchNorm2d of them for their frozen batch norm."""
import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn

import lesa_lit_models  # noqa: F401  (registers the models with timm)
from lesa_lit_models.layers import Lesa, lesa_fused

transformers = pytest.importorskip('transformers')

# timm feature levels: LESA-ResNet's 0 is the stem (stride 2), 1-4 are C2-C5; LIT's 0-3 are C2-C5
OUT_INDICES = {'lesa_resnet50_det': (2, 3, 4), 'lit_ti': (1, 2, 3)}
DETECTORS = {
    'DETR': (transformers.DetrConfig, transformers.DetrModel),
    'Deformable DETR': (transformers.DeformableDetrConfig, transformers.DeformableDetrModel),
}


@pytest.mark.slow
@pytest.mark.parametrize('backbone, detector', [('lesa_resnet50_det', 'DETR'), ('lit_ti', 'Deformable DETR')])
def test_detr_detectors_run_on_our_backbones_with_their_frozen_batchnorms(backbone, detector):
    config_cls, model_cls = DETECTORS[detector]
    out_indices = OUT_INDICES[backbone][-1:] if detector == 'DETR' else OUT_INDICES[backbone]  # DETR reads C5
    config = config_cls(
        backbone_config=transformers.TimmBackboneConfig(backbone=backbone, out_indices=out_indices),
        num_queries=10, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2)
    torch.manual_seed(0)
    model = model_cls(config).double().eval()
    encoder = model.backbone.model
    assert not any(type(m) is nn.BatchNorm2d for m in encoder.modules())
    pixels = torch.randn(1, 3, 128, 128, dtype=torch.float64)

    with mock.patch.object(lesa_fused, 'detection_qr_binary', wraps=lesa_fused.detection_qr_binary) as spy, \
            torch.no_grad():
        features = encoder(pixels)
        queries = model(pixel_values=pixels).last_hidden_state
    assert (spy.call_count > 0) == backbone.startswith('lesa')
    assert queries.shape == (1, 10, 32) and queries.isfinite().all()

    reference = copy.deepcopy(encoder)
    for module in reference.modules():
        if isinstance(module, Lesa):
            module.attn_impl = 'reference'
    with torch.no_grad():
        for got, want in zip(features, reference(pixels), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
