# Mask R-CNN, LESA-ResNet-50 backbone (DCN in stages 2-4, LESA in stages 3-4), FPN, fixed 1024x1024 input,
# 8 GPUs x 1 image, SGD lr 0.01, 20 epochs (steps at 16 and 19).
# Paper (LESA, arXiv 2107.05637): COCO val2017 box AP 44.0, mask AP 39.2; test-dev box AP 44.2, mask AP 39.6.
# Upstream: Chenglin-Yang/LESA_detection configs/lesa/lesa_mask_rcnn_r50_dconv_c3-c5_8x1_20e.py.
# Released COCO checkpoint (the authors' epoch_20.pth, mmdet 2.x; OneDrive, download by hand):
#   https://livejohnshopkins-my.sharepoint.com/:f:/g/personal/cyang76_jh_edu/Egpo87VmMmlEg0jY_KHYAJsBS7EFDJ4YxJ2zhkTxcJCzWg?e=SGSKmx
#   detection/test.sh detection/configs/lesa/mask-rcnn_lesa-r50-dconv-c3-c5_fpn_1024-8xb1-20e_coco.py \
#       epoch_20.pth 8
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_20e.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

image_size = 1024  # LESA's position tables are built for this grid; train and test use the same fixed size
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='lesa_resnet50_det',  # DCN in stages 2-4, LESA in stages 3-4
        img_size=image_size,
        out_indices=(1, 2, 3, 4),
        frozen_stages=1,
        norm_eval=True,
        with_cp=True,
        # the authors' ImageNet "detection pretrain" of LESA-ResNet-50 (their "Pretrained" link), where their README
        # puts it; the classification weights (lesa_resnet50.in1k) also load
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/lesa_pretrained_imagenet/lesa_resnet50_pretrained/lesa_resnet50/checkpoint.pth',
            origin_url=('https://livejohnshopkins-my.sharepoint.com/:f:/g/personal/cyang76_jh_edu/'
                        'EsV_fGZY-uhEkciwVckp4c8BlInA1GFv7gett1_LOZ0vFg?e=g1If75'))),
    neck=dict(in_channels=[256, 512, 1024, 2048]))

# the stock pipelines at LESA's fixed size
fixed_size = dict(type='Resize', scale=(image_size, image_size), keep_ratio=False)
train_pipeline = [fixed_size if t.type == 'Resize' else t for t in _base_.train_pipeline]
test_pipeline = [fixed_size if t.type == 'Resize' else t for t in _base_.test_pipeline]
train_dataloader = dict(batch_size=1, num_workers=1, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.01))
auto_scale_lr = dict(base_batch_size=8)
