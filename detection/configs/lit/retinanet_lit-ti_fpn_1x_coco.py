# RetinaNet, LIT-Ti backbone, FPN (start_level 1, extra convs on the input), 8 GPUs x 2 images, AdamW lr 1e-4,
# weight decay 1e-4, 12 epochs (steps at 8 and 11), fp32.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 41.6.
# Upstream: ziplab/LIT detection/configs/lit/retinanet_lit_ti_fpn_1x_coco.py.
# Released COCO checkpoint (the authors', mmdet 2.x; test.sh converts it on the fly):
#   detection/test.sh detection/configs/lit/retinanet_lit-ti_fpn_1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/retina_lit_ti.pth 8
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/lit-ti_backbone.py']

model = dict(backbone=dict(_delete_=True, **_base_.lit_backbone), neck=dict(in_channels=_base_.lit_neck_in_channels))
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001))
