# LIT-Ti backbone settings shared by the LIT-Ti detector configs of this folder (a fragment, not a config to run);
# wired in as in lit-s_backbone.py. LIT-Ti trains in fp32 with mmdet's stock OptimWrapper and uniform weight decay.
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

lit_backbone = dict(
    type='TimmBackbone',
    model_name='lit_ti',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.1,
    # the authors' ImageNet LIT-Ti (GitHub release, downloaded into the torch hub cache when training starts);
    # a local copy (original or converted) works too: --cfg-options model.backbone.init_cfg.checkpoint=PATH
    init_cfg=dict(type='Pretrained', checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth'))
lit_neck_in_channels = [64, 128, 320, 512]
