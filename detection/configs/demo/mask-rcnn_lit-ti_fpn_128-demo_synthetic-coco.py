# CPU demo (detection/demo.sh): the LIT-Ti Mask R-CNN of configs/lit/ at 128 pixels, trained from scratch on the
# synthetic dataset (detection/tools/make_synthetic_coco.py; pass its folder with --data-root), then evaluated once
# with test.sh (no validation during training); its results: detection/README.md.
# Not a paper setting. The paper's LIT-Ti Mask R-CNN (LIT, arXiv 2105.14217): COCO val2017 box AP 42.0, mask AP 39.1.
#
# What differs from the paper config, and why (a short from-scratch run on a CPU):
# - one head per shape: the dataset's three categories (tv, clock, kite), not COCO's 80;
# - anchors scaled with the input (anchor scale 2): the 20-70 pixel shapes match anchors on the stride 16-32 maps;
#   the RoIs keep mmdet's levels, so at this size all pool from the stride-4 map, the only one fine enough for
#   the corners that tell a rectangle from an ellipse (RoIs mostly from stride 8: mask AP 0.05 lower);
# - GroupNorm in the FPN and the mask head (as mmdet's from-scratch "gn" configs);
# - one box regressor for all classes (as Cascade R-CNN's heads): a shape whose class is still wrong is boxed well,
#   and every positive RoI trains the one regressor;
# - 32 RoIs per image, half of them positive (mmdet: 512, a quarter): the classifier sees twice the shapes (one-thread
#   trials: box AP 0.61 against 0.53-0.54 for a quarter, 0.58 for three quarters), the 4-conv mask head runs on every
#   positive RoI; no drop path;
# - AdamW (fused: one kernel per step on the CPU) at a from-scratch learning rate for the heads and the paper's for
#   the backbone, short warmup, cosine decay over 4 epochs of 900 images of one to six shapes (demo.sh generates
#   them): LIT-Ti from scratch learns where the shapes are before it learns which, and more distinct shapes beat more
#   epochs of fewer (240 images x 16 epochs: box AP 0.05 lower; up to four shapes an image: box AP 0.07 lower on the
#   same validation images, two seeds); the AP grows with the steps (1800 steps: box AP 0.79; 1000: 0.02 above
#   these 900), and 900 steps of 4 images keep the demo well under 15 minutes on a 2-core AVX2-only CPU
#   (docs/development.md);
# - heads for 128-pixel images of three shapes, not COCO at 1333 px (a step costs two thirds of the stock heads'): 128
#   channels in FPN, RPN, RoI features (stock 256), 64 in the mask convs, 512-wide box fcs;
# - RoI features by mmcv's SimpleRoIAlign (PointRend's: one bilinear sample at each bin's centre, as grid_sample), not
#   RoIAlign's mean of up to 5x5 samples a bin: RoIAlign's backward runs on one core on the CPU and took 12% of a late
#   step (0.36 against 0.40 s a step), at the same AP over two seeds;
# - data loaded in the training process, so every core computes (the images are small).
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
        rcnn=dict(sampler=dict(num=32, pos_fraction=0.5))),
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
