# Mask R-CNN, LIT-S backbone with output LayerNorms on levels 2-4, FPN, 8 GPUs x 2 images, AdamW lr 2e-4, weight
# decay 1e-4 (none on norms and position tables), 12 epochs (steps at 8 and 11), mixed precision on GPU (fp32 on
# CPU), gradient checkpointing.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 42.9, mask AP 39.6.
# Upstream: ziplab/LIT detection/configs/lit/mask_rcnn_lit_s_fpn_1x_coco.py.
# Released COCO checkpoint (the authors', mmdet 2.x; test.sh converts it on the fly):
#   detection/test.sh detection/configs/lit/mask-rcnn_lit-s_fpn_amp-1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/mask_rcnn_lit_s.pth 8
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './_base_/lit-s_backbone.py']

model = dict(backbone=dict(_delete_=True, **_base_.lit_backbone), neck=dict(in_channels=_base_.lit_neck_in_channels))
optim_wrapper = dict(
    _base_.lit_optim_wrapper, optimizer=dict(_delete_=True, type='AdamW', lr=0.0002, weight_decay=0.0001))
