# HTC with the semantic branch (COCO-stuff maps), LESA-Wide-ResNet-50-2 backbone (DCN in stages 2-4, LESA in
# stages 3-4), FPN, fixed 1280x1280 input, 4 GPUs x 1 image, SGD lr 0.005, 20 epochs (steps at 16 and 19).
# Paper (LESA, arXiv 2107.05637): COCO val2017 box AP 50.1, mask AP 43.9; test-dev box AP 50.5, mask AP 44.4.
# Upstream: Chenglin-Yang/LESA_detection configs/lesa/lesa_htc_wrn50_fpn_dconv_c3-c5_4x1_20e_coco_1280.py.
# Released COCO checkpoint (the authors' epoch_20.pth, mmdet 2.x; OneDrive, download by hand):
#   https://livejohnshopkins-my.sharepoint.com/:f:/g/personal/cyang76_jh_edu/EmSPz8ToSK5GuYyWELj3Y0QBwP3Q_Jd4FhK1WDvf2FuADw?e=xRsbl5
#   detection/test.sh detection/configs/lesa/htc_lesa-wrn50-dconv-c3-c5_fpn_1280-4xb1-20e_coco.py \
#       epoch_20.pth 4
# Training reads data/coco/stuffthingmaps/train2017/*.png; without them use the htc-without-semantic config.
_base_ = 'mmdet::htc/htc_r50_fpn_20e_coco.py'
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

image_size = 1280  # LESA's position tables are built for this grid; train and test use the same fixed size
model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='lesa_wrn50_det',  # DCN in stages 2-4, LESA in stages 3-4
        img_size=image_size,
        out_indices=(1, 2, 3, 4),
        frozen_stages=1,
        norm_eval=True,
        with_cp=True,
        # the authors' ImageNet "detection pretrain" of LESA-WRN-50 (their "Pretrained" link), where their README puts
        # it; the classification weights (lesa_wrn50.in1k) also load
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/lesa_pretrained_imagenet/lesa_wrn50_pretrained/lesa_wrn50/checkpoint.pth',
            origin_url=('https://livejohnshopkins-my.sharepoint.com/:f:/g/personal/cyang76_jh_edu/'
                        'ElagAKEgXttArEbtVR6NpmEBWAZN0pNE5Q6MMXEJZ27VHg?e=dIdwAI'))),
    neck=dict(in_channels=[256, 512, 1024, 2048]))

# the stock pipelines at LESA's fixed size
fixed_size = dict(type='Resize', scale=(image_size, image_size), keep_ratio=False)
train_pipeline = [fixed_size if t.type == 'Resize' else t for t in _base_.train_pipeline]
test_pipeline = [fixed_size if t.type == 'Resize' else t for t in _base_.test_pipeline]
train_dataloader = dict(batch_size=1, num_workers=1, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=0.005))
auto_scale_lr = dict(base_batch_size=4)
