# RetinaNet, LIT-Ti backbone, FPN (start_level 1, extra convs on the input), 8 GPUs x 2 images, AdamW lr 1e-4,
# weight decay 1e-4, 12 epochs (steps at 8 and 11), fp32.
# Paper (LIT, arXiv 2105.14217): COCO val2017 box AP 41.6.
# Upstream: zhuang-group/LIT detection/configs/lit/retinanet_lit_ti_fpn_1x_coco.py.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['lesa_lit_models', 'lesa_lit_det'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='lit_ti',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        # ImageNet LIT-Ti from the hub; or a local file: the authors' checkpoint (original or converted), e.g.
        # 'pretrained/lit_ti.pth'
        pretrained='hf-hub:lesa-lit-models/lit_ti.in1k'),
    neck=dict(in_channels=[64, 128, 320, 512]))

optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001))
