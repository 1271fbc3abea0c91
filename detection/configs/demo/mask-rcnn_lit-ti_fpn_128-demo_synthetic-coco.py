# CPU demo (detection/demo.sh): the paper's LIT-Ti Mask R-CNN (configs/lit/) from scratch on synthetic shapes, 128 px,
# 4 epochs: 3 classes, slim GN heads, 32 hard-mined RoIs, SimpleRoIAlign, AdamW; why: docs/development.md, "The demo".
_base_ = '../lit/mask-rcnn_lit-ti_fpn_1x_coco.py'

image_size = 128
epochs = 4
batch_size = 4
classes = ('tv', 'clock', 'kite')  # rectangles, ellipses, triangles (lesa_lit_det.synthetic.SHAPE_CATEGORIES)
channels = 128  # FPN, RPN, RoI features
mask_channels = 64  # the mask head's convs
fc_channels = 512  # the box head's two fcs
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    # from scratch: no ImageNet weights (nor download); the MLP activations kept for backward, not recomputed (at
    # 128 pixels memory is no concern: a step 9% faster)
    backbone=dict(init_cfg=None, drop_path_rate=0.0, recompute_mlp_act=False),
    neck=dict(out_channels=channels, norm_cfg=norm_cfg),
    rpn_head=dict(in_channels=channels, feat_channels=channels, anchor_generator=dict(scales=[2])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels,
                                roi_layer=dict(_delete_=True, type='SimpleRoIAlign', output_size=7)),
        mask_roi_extractor=dict(out_channels=channels,
                                roi_layer=dict(_delete_=True, type='SimpleRoIAlign', output_size=14)),
        bbox_head=dict(in_channels=channels, fc_out_channels=fc_channels, num_classes=len(classes),
                       reg_class_agnostic=True),
        mask_head=dict(in_channels=channels, conv_out_channels=mask_channels, num_classes=len(classes),
                       norm_cfg=norm_cfg)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=200, max_per_img=100),
        rcnn=dict(sampler=dict(type='OHEMSampler', num=32, pos_fraction=0.5))),
    test_cfg=dict(
        rpn=dict(nms_pre=200, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [dict(t, scale=(image_size, image_size)) if t.type == 'Resize' else t for t in _base_.train_pipeline]
test_pipeline = [dict(t, scale=(image_size, image_size)) if t.type == 'Resize' else t for t in _base_.test_pipeline]
train_dataloader = dict(batch_size=batch_size, num_workers=0, persistent_workers=False,
                        dataset=dict(metainfo=dict(classes=classes), pipeline=train_pipeline))
test_dataloader = dict(num_workers=0, persistent_workers=False,
                       dataset=dict(metainfo=dict(classes=classes), pipeline=test_pipeline))
val_dataloader = val_cfg = val_evaluator = None
test_evaluator = dict(classwise=True)  # test.sh also prints the box and mask AP of each shape

train_cfg = dict(max_epochs=epochs, val_interval=epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=epochs, T_max=epochs, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]
# the backbone at the paper's lr (2e-4), the from-scratch heads at 5x (LIT-Ti trained from scratch at 1e-3 does not
# learn to classify the shapes)
optim_wrapper = dict(optimizer=dict(lr=0.001, fused=True), clip_grad=dict(max_norm=10),
                     paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.2)}))
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=epochs))
custom_hooks = [dict(type='TrainingTimeHook')]  # how long training takes here, after its first 10 iterations
randomness = dict(seed=0)
