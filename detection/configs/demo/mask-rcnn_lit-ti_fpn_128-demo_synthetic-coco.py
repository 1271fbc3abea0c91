# CPU demo (detection/demo.sh): the LIT-Ti Mask R-CNN of configs/lit/ at 128 pixels, trained from scratch on the
# synthetic dataset (detection/tools/make_synthetic_coco.py; pass its folder with --data-root) in a few minutes,
# then evaluated once with test.sh (no validation during training).
# Not a paper setting. The paper's LIT-Ti Mask R-CNN (LIT, arXiv 2105.14217): COCO val2017 box AP 42.0, mask AP 39.1.
#
# What makes a few minutes of CPU go furthest (together these lifted box / mask AP from about 0.10 / 0.14 to
# 0.15 / 0.21 at the same 240 steps; see detection/README.md):
# - a head per shape: the dataset's three categories (tv, clock, kite), not COCO's 80;
# - anchors and RoI levels scaled with the input (anchor scale 2, RoI levels from 14 px): the 20-60 pixel shapes
#   match anchors on the stride 16-32 maps and pool their RoIs mostly from stride 8, closer to LIT's attention
#   stages, which see the whole image, than the stride-4 map of its token-local first stage (the stock config puts
#   them all on stride 4-8; scaling all the way with the input, by 1/8, trained far worse);
# - GroupNorm in the FPN and the mask head (as mmdet's from-scratch "gn" configs);
# - one box regressor for all classes (as Cascade R-CNN's heads): a shape whose class is still wrong is boxed well,
#   and every positive RoI trains the one regressor;
# - 32 RoIs per image, a quarter of them positive: at most 8 positives, since the 4-conv mask head runs on every
#   positive RoI, and more background for the classifier; no drop path, and
#   AdamW (fused: one kernel per step on the CPU) at a from-scratch learning rate for the heads and the paper's for
#   the backbone (below), short warmup, cosine decay;
# - 16 epochs (960 steps; about 13 minutes on 2 AVX-512 cores): LIT-Ti from scratch learns where the shapes are long
#   before it learns which, so the classes gain most from more steps: at seed 0, 1 thread, box / mask AP 0.545 / 0.624
#   against 0.498 / 0.578 at 12 epochs (a 160-pixel input at 12 epochs, the same added cost: 0.528 / 0.601); 12
#   epochs gave 0.47 / 0.53 on a fresh clone (0.41 / 0.49 with a regressor per class and 16 RoIs, half positive;
#   6 epochs: 0.25 / 0.32; with the backbone at 1e-3 too, 0.33 / 0.40 and 0.15 / 0.22);
# - data loaded in the training process, so both cores compute (the images are small).
_base_ = '../lit/mask-rcnn_lit-ti_fpn_1x_coco.py'

image_size = 128
epochs = 16
batch_size = 4
classes = ('tv', 'clock', 'kite')  # rectangles, ellipses, triangles (lesa_lit_det.synthetic.SHAPE_CATEGORIES)
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(init_cfg=None, drop_path_rate=0.0),  # from scratch: no ImageNet weights (nor download)
    neck=dict(norm_cfg=norm_cfg),
    rpn_head=dict(anchor_generator=dict(scales=[2])),
    roi_head=dict(
        bbox_roi_extractor=dict(finest_scale=14),
        mask_roi_extractor=dict(finest_scale=14),
        bbox_head=dict(num_classes=len(classes), reg_class_agnostic=True),
        mask_head=dict(num_classes=len(classes), norm_cfg=norm_cfg)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=200, max_per_img=100),
        rcnn=dict(sampler=dict(num=32, pos_fraction=0.25))),
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

train_cfg = dict(max_epochs=epochs, val_interval=epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=epochs, T_max=epochs, eta_min_ratio=0.01,
         convert_to_iter_based=True),
]
# the backbone at the paper's lr (2e-4), the from-scratch heads at 5x: at 6 epochs box / mask AP 0.254 / 0.317 against
# 0.151 / 0.220 with everything at 1e-3 (a shape classifier LIT-Ti does not learn at all at 1e-3 from scratch)
optim_wrapper = dict(optimizer=dict(lr=0.001, fused=True), clip_grad=dict(max_norm=10),
                     paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.2)}))
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=epochs))
randomness = dict(seed=0)
