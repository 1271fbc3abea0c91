# Mask R-CNN, LIT-S backbone with output LayerNorms on levels 2-4, FPN, 8 GPUs x 2 images, AdamW lr 2e-4, weight
# decay 1e-4 (none on norms and position tables), 12 epochs (steps at 8 and 11), mixed precision on GPU (fp32 on
# CPU), gradient checkpointing.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 42.9, mask AP 39.6.
# Upstream: ziplab/LIT detection/configs/lit/mask_rcnn_lit_s_fpn_1x_coco.py.
# Released COCO checkpoint (the authors', mmdet 2.x; test.sh converts it on the fly):
#   detection/test.sh detection/configs/lit/mask-rcnn_lit-s_fpn_amp-1x_coco.py \
#       https://github.com/ziplab/LIT/releases/download/v2.0/mask_rcnn_lit_s.pth 8
_base_ = './mask-rcnn_lit-ti_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        model_name='lit_s',
        out_norms=(1, 2, 3),
        drop_path_rate=0.2,
        img_size=800,  # relative-position tables laid out for 800x800 (99x99, 49x49), as the authors' backbone
        with_cp=True,
        init_cfg=dict(checkpoint='https://github.com/ziplab/LIT/releases/download/v1.0/lit_s.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    paramwise_cfg=dict(custom_keys={'relative_position_bias_table': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
