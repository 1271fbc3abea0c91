# LIT-S backbone settings shared by the LIT-S detector configs of this folder (a fragment, not a config to run).
# A detector config inherits it next to mmdet's stock detector config and wires the pieces in:
#   model = dict(backbone=dict(_delete_=True, **_base_.lit_backbone),
#                neck=dict(in_channels=_base_.lit_neck_in_channels))
# mmengine refuses two bases that define the same key (here `model`, `optim_wrapper`), so the pieces have names of
# their own; they stay in the resolved config, unused: override model.backbone (not lit_backbone) with --cfg-options.
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

# LIT-S with output LayerNorms on levels 2-4, gradient checkpointing
lit_backbone = dict(
    type='TimmBackbone',
    model_name='lit_s',
    out_indices=(0, 1, 2, 3),
    out_norms=(1, 2, 3),
    drop_path_rate=0.2,
    img_size=800,  # relative-position tables laid out for 800x800 (99x99, 49x49), as the authors' backbone
    with_cp=True,
    # the authors' ImageNet LIT-S (GitHub release, downloaded into the torch hub cache when training starts);
    # a local copy (original or converted) works too: --cfg-options model.backbone.init_cfg.checkpoint=PATH
    init_cfg=dict(type='Pretrained', checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth'))
lit_neck_in_channels = [96, 192, 384, 768]

# mixed precision on GPU (fp32 on CPU); no weight decay on norms and position tables. The detector config adds the
# optimizer (AdamW, its lr).
lit_optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(custom_keys={
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }))
