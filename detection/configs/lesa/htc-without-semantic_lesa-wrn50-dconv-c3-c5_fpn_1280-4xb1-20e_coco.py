# HTC without the semantic branch (needs no COCO-stuff maps), otherwise the LESA-WRN-50 HTC recipe: fixed
# 1280x1280 input, 4 GPUs x 1 image, SGD lr 0.005, 20 epochs.
# Paper: no number for this variant; the LESA paper's HTC (box AP 50.1 / mask AP 43.9 on val2017) uses the
# semantic branch, so expect this variant to score somewhat lower.
_base_ = './htc_lesa-wrn50-dconv-c3-c5_fpn_1280-4xb1-20e_coco.py'

model = dict(
    data_preprocessor=dict(pad_seg=False),
    roi_head=dict(semantic_roi_extractor=None, semantic_head=None))

train_pipeline = [dict(t, with_seg=False) if t.type == 'LoadAnnotations' else t for t in _base_.train_pipeline]
train_dataloader = dict(dataset=dict(data_prefix=dict(_delete_=True, img='train2017/'), pipeline=train_pipeline))
