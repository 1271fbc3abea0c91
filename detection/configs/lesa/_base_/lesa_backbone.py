# LESA backbone settings shared by the LESA detector configs of this folder (a fragment, not a config to run),
# wired in as described in ../../lit/_base_/lit-s_backbone.py; the detector config adds the backbone's model_name,
# img_size (its fixed input size) and ImageNet weights (init_cfg).
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

# the *_det models: DCN in stages 2-4, LESA in stages 3-4; stage 1 frozen, BN statistics frozen, gradient checkpointing
lesa_backbone = dict(type='TimmBackbone', out_indices=(1, 2, 3, 4), frozen_stages=1, norm_eval=True, with_cp=True)
lesa_neck_in_channels = [256, 512, 1024, 2048]
