"""Draw COCO-format predictions (``<prefix>.bbox.json`` / ``<prefix>.segm.json``) next to the ground truth, as one
PNG, and format a COCO metrics dict as a table."""
import json
import os.path as osp
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torchvision.ops import box_convert, nms

__all__ = ['OVERLAP_THR', 'draw_predictions', 'metrics_table']

# box IoU at which predictions of any classes count as one object in the picture (the top-scored is drawn)
OVERLAP_THR = 0.5

_PALETTE = [(230, 25, 75), (0, 130, 200), (255, 200, 0), (60, 180, 75), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]
_GAP, _CAPTION, _PAGE = 8, 22, (255, 255, 255)
_METRIC_COLUMNS = ('mAP', 'mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l')


def metrics_table(metrics: Dict[str, float], prefix: str = 'coco/') -> str:
    """The COCO AP columns of ``metrics`` (CocoMetric's ``coco/bbox_mAP``, ... keys) as a text table."""
    rows = [f'{"":6}' + ''.join(f'{c.replace("mAP", "AP"):>8}' for c in _METRIC_COLUMNS)]
    for kind, label in (('bbox', 'box'), ('segm', 'mask')):
        if f'{prefix}{kind}_mAP' in metrics:
            rows.append(f'{label:6}' + ''.join(f'{metrics.get(f"{prefix}{kind}_{c}", float("nan")):8.3f}'
                                              for c in _METRIC_COLUMNS))
    if len(rows) == 1:
        raise ValueError(f'metrics_table: no {prefix}bbox_mAP or {prefix}segm_mAP in {sorted(metrics)}.')
    return '\n'.join(rows)


def _load_results(path: str) -> Dict[int, List[Dict]]:
    by_image = defaultdict(list)
    if osp.isfile(path):
        with open(path) as f:
            for result in json.load(f):
                by_image[result['image_id']].append(result)
    return by_image


def _decode(segmentation, height: int, width: int) -> np.ndarray:
    """Boolean mask of a COCO segmentation: polygons, uncompressed or compressed RLE."""
    from pycocotools import mask as mask_utils
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get('counts'), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def _panel(image: Image.Image, objects: Sequence[Dict], colors: Dict[int, Tuple[int, int, int]],
           names: Dict[int, str], caption: str, tile: int, font) -> Image.Image:
    """``image`` scaled to fit ``tile`` with the masks (tinted, outlined), boxes and labels of ``objects``, under a
    caption."""
    scale = min(tile / image.width, tile / image.height)
    size = (round(image.width * scale), round(image.height * scale))
    pixels = np.asarray(image.resize(size, Image.BILINEAR)).astype(np.float32)
    for obj in objects:
        if 'segmentation' in obj:
            mask = Image.fromarray(_decode(obj['segmentation'], image.height, image.width)).resize(size, Image.NEAREST)
            mask = np.asarray(mask)
            inner = np.asarray(Image.fromarray(mask).filter(ImageFilter.MinFilter(5)))
            color = np.array(colors[obj['category_id']])
            pixels[mask] = 0.6 * pixels[mask] + 0.4 * color
            pixels[mask & ~inner] = color
    drawn = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(drawn)
    for obj in objects:
        x, y, w, h = (v * scale for v in obj['bbox'])
        color = colors[obj['category_id']]
        draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
        label = names[obj['category_id']] + (f' {obj["score"]:.2f}' if 'score' in obj else '')
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        ty = y - bottom - 3 if y - bottom - 3 >= 0 else y + 2
        draw.rectangle([x, ty, x + right - left + 4, ty + bottom + 2], fill=color)
        draw.text((x + 2, ty + 1), label, fill=(0, 0, 0), font=font)
    panel = Image.new('RGB', (tile, tile + _CAPTION), (235, 235, 235))
    ImageDraw.Draw(panel).text((2, 3), caption, fill=(0, 0, 0), font=font)
    panel.paste(drawn, (0, _CAPTION))
    return panel


def _header(width: int, lines: Sequence[str], classes: Sequence[Tuple[str, Tuple[int, int, int]]], font) -> Image.Image:
    """Title lines, then the colour legend: one swatch and name per class."""
    line = font.size + 6
    header = Image.new('RGB', (width, line * (len(lines) + 1) + _GAP), _PAGE)
    draw = ImageDraw.Draw(header)
    for row, text in enumerate(lines):
        draw.text((_GAP, _GAP + row * line), text, fill=(0, 0, 0), font=font)
    x, y = _GAP, _GAP + len(lines) * line
    for name, color in classes:
        draw.rectangle([x, y + 2, x + font.size, y + font.size + 2], fill=color, outline=(0, 0, 0))
        draw.text((x + font.size + 5, y), name, fill=(0, 0, 0), font=font)
        x += font.size + 5 + int(draw.textlength(name, font=font)) + 3 * _GAP
    return header


def _top_of_overlaps(results: Sequence[Dict], iou_thr: float) -> List[int]:
    """Indices of the results that no higher-scored result overlaps at box IoU >= ``iou_thr``, any class."""
    boxes = box_convert(torch.tensor([r['bbox'] for r in results], dtype=torch.float64), 'xywh', 'xyxy')
    return nms(boxes, torch.tensor([r['score'] for r in results], dtype=torch.float64), iou_thr).tolist()


def draw_predictions(
        ann_file: str,
        img_dir: str,
        results_prefix: str,
        out_file: str,
        score_thr: float = 0.3,
        max_images: int = 8,
        pairs_per_row: int = 2,
        tile: int = 320,
        metrics: Optional[Dict[str, float]] = None,
        overlap_thr: Optional[float] = OVERLAP_THR,
) -> str:
    """Draw the first ``max_images`` images twice, side by side: the predictions scoring at least ``score_thr``
    (masks, boxes, class names and scores) and the ground truth of ``ann_file`` (masks, boxes, class names).
    Of predictions whose boxes overlap at IoU >= ``overlap_thr``, whatever their classes, only the top-scored is
    drawn (one class per object, as read by a person; the detector's per-class results, which the AP scores, keep
    them all); ``None`` draws every prediction.

    ``results_prefix`` is the CocoMetric ``outfile_prefix``: ``<prefix>.bbox.json`` is required,
    ``<prefix>.segm.json`` adds the predicted masks. A header names the dataset, the score threshold, the box and
    mask AP when ``metrics`` (CocoMetric's dict) is given, and the colour of each class. Returns ``out_file``.
    """
    with open(ann_file) as f:
        dataset = json.load(f)
    if not osp.isfile(results_prefix + '.bbox.json'):
        raise FileNotFoundError(f'{results_prefix}.bbox.json not found: run the test with --out-prefix '
                                f'{results_prefix} first.')
    names = {c['id']: c['name'] for c in dataset['categories']}
    boxes, masks = _load_results(results_prefix + '.bbox.json'), _load_results(results_prefix + '.segm.json')
    truth = defaultdict(list)
    for ann in dataset.get('annotations', []):
        truth[ann['image_id']].append(ann)

    images = dataset['images'][:max_images]
    predictions = {}
    for info in images:
        found = boxes[info['id']]
        if masks[info['id']]:  # CocoMetric writes the segm json in the order of the bbox json
            found = [dict(box, segmentation=mask['segmentation']) for box, mask in zip(found, masks[info['id']])]
        found = [r for r in found if r['score'] >= score_thr]
        if overlap_thr is not None and found:
            found = [found[i] for i in _top_of_overlaps(found, overlap_thr)]
        predictions[info['id']] = sorted(found, key=lambda r: r['score'])
    shown = sorted({o['category_id'] for i in images for o in predictions[i['id']] + truth[i['id']]})
    colors = {cid: _PALETTE[i % len(_PALETTE)] for i, cid in enumerate(shown)}

    font = ImageFont.load_default(size=14)
    pair = 2 * tile + _GAP
    width = pairs_per_row * pair + (pairs_per_row + 1) * 2 * _GAP
    title = [dataset.get('info', {}).get('description') or osp.basename(ann_file),
             f'left: prediction (class score >= {score_thr:.2f}'
             + (f'; of boxes overlapping at IoU >= {overlap_thr:.2f}, the top-scored' if overlap_thr is not None else '')
             + '), right: ground truth']
    if metrics:
        title.append('  '.join(f'{label} AP {metrics[key]:.3f}' for label, key in (
            ('box', 'coco/bbox_mAP'), ('mask', 'coco/segm_mAP')) if key in metrics))
    header = _header(width, title, [(names[cid], colors[cid]) for cid in shown], font)
    rows = (len(images) + pairs_per_row - 1) // pairs_per_row
    cell = tile + _CAPTION + 2 * _GAP
    sheet = Image.new('RGB', (width, header.height + rows * cell), _PAGE)
    sheet.paste(header, (0, 0))
    for index, info in enumerate(images):
        image = Image.open(osp.join(img_dir, info['file_name'])).convert('RGB')
        x = 2 * _GAP + (index % pairs_per_row) * (pair + 2 * _GAP)
        y = header.height + (index // pairs_per_row) * cell
        found, expected = predictions[info['id']], truth[info['id']]
        sheet.paste(_panel(image, found, colors, names, f'{info["file_name"]}: {len(found)} found', tile, font),
                    (x, y))
        sheet.paste(_panel(image, expected, colors, names, f'ground truth: {len(expected)}', tile, font),
                    (x + tile + _GAP, y))
    sheet.save(out_file)
    return out_file
