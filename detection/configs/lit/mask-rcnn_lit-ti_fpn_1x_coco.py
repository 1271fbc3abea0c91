# Mask R-CNN, LIT-Ti backbone, FPN, 8 GPUs x 2 images, AdamW lr 2e-4, weight decay 1e-4, 12 epochs (steps at 8
# and 11), fp32.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 42.0, mask AP 39.1.
# Upstream: ziplab/LIT detection/configs/lit/mask_rcnn_lit_ti_fpn_1x_coco.py.
# Released COCO checkpoint (the authors', mmdet 2.x; test.sh converts it on the fly):
#   detection/test.sh detection/configs/lit/mask-rcnn_lit-ti_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/mask_rcnn_lit_ti.pth 8
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='lit_ti',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        # the authors' ImageNet LIT-Ti, downloaded into the torch hub cache when training starts; a local copy
        # (original or converted) works too: --cfg-options model.backbone.init_cfg.checkpoint=PATH
        init_cfg=dict(type='Pretrained', checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=0.0002, weight_decay=0.0001))
