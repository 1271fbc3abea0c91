# Mask R-CNN, LIT-S backbone with output LayerNorms on levels 2-4, FPN, 8 GPUs x 2 images, AdamW lr 2e-4, weight
# decay 1e-4 (none on norms and position tables), 12 epochs (steps at 8 and 11), mixed precision on GPU (fp32 on
# CPU), gradient checkpointing.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 42.9, mask AP 39.6.
# Upstream: zhuang-group/LIT detection/configs/lit/mask_rcnn_lit_s_fpn_1x_coco.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='lit_s',
        out_indices=(0, 1, 2, 3),
        out_norms=(1, 2, 3),
        drop_path_rate=0.2,
        pos_img_size=800,  # relative-position tables laid out for 800x800 (99x99, 49x49), as the authors' backbone
        with_cp=True,
        # ImageNet LIT-S from the hub; or a local file: the authors' checkpoint (original or converted), e.g.
        # 'pretrained/lit_s.pth'
        pretrained='hf-hub:lesa-lit-models/lit_s.in1k'),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0002, weight_decay=0.0001),
    paramwise_cfg=dict(custom_keys={
        'absolute_pos_embed': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
    }))
