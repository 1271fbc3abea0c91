# RetinaNet, LIT-Ti backbone, FPN (start_level 1, extra convs on the input), 8 GPUs x 2 images, AdamW lr 1e-4,
# weight decay 1e-4, 12 epochs (steps at 8 and 11), fp32.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 41.6.
# Upstream: ziplab/LIT detection/configs/lit/retinanet_lit_ti_fpn_1x_coco.py.
# Released COCO checkpoint (the authors', mmdet 2.x; test.sh converts it on the fly):
#   detection/test.sh detection/configs/lit/retinanet_lit-ti_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/retina_lit_ti.pth 8
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='lit_ti',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001))
