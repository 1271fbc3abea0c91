"""Draw COCO-format predictions (``<prefix>.bbox.json`` / ``<prefix>.segm.json``) on their images, as one PNG."""
import json
import os.path as osp
from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['draw_predictions']

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230)]


def _load_results(path: Optional[str]) -> Dict[int, List[Dict]]:
    by_image = defaultdict(list)
    if path and osp.isfile(path):
        with open(path) as f:
            for result in json.load(f):
                by_image[result['image_id']].append(result)
    return by_image


def draw_predictions(
        ann_file: str,
        img_dir: str,
        results_prefix: str,
        out_file: str,
        score_thr: float = 0.3,
        max_images: int = 8,
        columns: int = 4,
        tile: int = 256,
) -> str:
    """Draw boxes, masks, class names and scores above ``score_thr`` for the first ``max_images`` images.

    ``results_prefix`` is the CocoMetric ``outfile_prefix``: ``<prefix>.bbox.json`` is required,
    ``<prefix>.segm.json`` is drawn when present. Returns ``out_file``.
    """
    from pycocotools import mask as mask_utils

    with open(ann_file) as f:
        dataset = json.load(f)
    names = {c['id']: c['name'] for c in dataset['categories']}
    colors = {cid: _PALETTE[i % len(_PALETTE)] for i, cid in enumerate(sorted(names))}
    if not osp.isfile(results_prefix + '.bbox.json'):
        raise FileNotFoundError(f'{results_prefix}.bbox.json not found: run the test with --out-prefix '
                                f'{results_prefix} first.')
    boxes, masks = _load_results(results_prefix + '.bbox.json'), _load_results(results_prefix + '.segm.json')

    images = dataset['images'][:max_images]
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new('RGB', (columns * tile, rows * tile), (255, 255, 255))
    for index, info in enumerate(images):
        image = Image.open(osp.join(img_dir, info['file_name'])).convert('RGB')
        pixels = np.asarray(image).astype(np.float32)
        for result in masks[info['id']]:
            if result['score'] >= score_thr:
                mask = mask_utils.decode(result['segmentation']).astype(bool)
                pixels[mask] = 0.5 * pixels[mask] + 0.5 * np.array(colors[result['category_id']])
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for result in sorted(boxes[info['id']], key=lambda r: r['score']):
            if result['score'] < score_thr:
                continue
            x, y, w, h = result['bbox']
            color = colors[result['category_id']]
            draw.rectangle([x, y, x + w, y + h], outline=color, width=2)
            draw.text((x + 2, y + 1), f'{names[result["category_id"]]} {result["score"]:.2f}', fill=color)
        image.thumbnail((tile, tile))
        sheet.paste(image, ((index % columns) * tile, (index // columns) * tile))
    sheet.save(out_file)
    return out_file
