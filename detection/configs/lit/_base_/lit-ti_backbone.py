# LIT-Ti backbone settings shared by the LIT-Ti detector configs of this folder (a fragment, not a config to run);
# wired in as in lit-s_backbone.py. LIT-Ti trains in fp32 with mmdet's stock OptimWrapper and uniform weight decay.
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

lit_backbone = dict(
    type='TimmBackbone',
    model_name='lit_ti',
    out_indices=(0, 1, 2, 3),
    drop_path_rate=0.1,
    # ImageNet LIT-Ti from the hub; or a local file: the authors' checkpoint (original or converted), e.g.
    # 'pretrained/lit_ti.pth'
    pretrained='hf-hub:lesa-lit-models/lit_ti.in1k')
lit_neck_in_channels = [64, 128, 320, 512]
