"""A synthetic COCO-format instance dataset: JPEG images of filled shapes with polygon masks.

The files use the real COCO layout and conventions, so every detector config runs on it after changing only
its data root (``--data-root``)::

    ROOT/annotations/instances_train2017.json        images, annotations (polygons, area, xywh bbox), categories
    ROOT/annotations/instances_val2017.json
    ROOT/annotations/image_info_test-dev2017.json    images and categories only (the test-dev json path)
    ROOT/{train2017,val2017,test2017}/*.jpg
    ROOT/stuffthingmaps/train2017/*.png              COCO-stuff label maps for HTC's semantic branch
    ROOT/synthetic_coco.json                         the generator settings (marks the folder as ours)

The category list is COCO's 80 thing categories (names and ids); the three shapes are annotated as three of them
(rectangle -> tv, ellipse -> clock, triangle -> kite). So the stock 80-class heads, ``CocoDataset``'s labels and
``CocoMetric``'s id mapping apply unchanged, and a prediction of any class is a valid result. Stuff maps follow
COCO-stuff: pixel value = category id - 1, 255 = unlabelled; the background of each image is one stuff class.
Everything is drawn from one seed (a stream per split, so the validation images stay the same whatever the
number of training images), and the same arguments give byte-identical files.
"""
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['SyntheticCocoSpec', 'make_synthetic_coco', 'COCO_CATEGORIES', 'SHAPE_CATEGORIES']

MARKER = 'synthetic_coco.json'

# COCO's 80 thing categories: name -> id (the ids of instances_*2017.json, with their gaps)
COCO_CATEGORIES = dict(zip(
    ('person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
     'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
     'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
     'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
     'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
     'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
     'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
     'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
     'hair drier', 'toothbrush'),
    (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91)),
))
# shape -> the COCO category it is annotated as
SHAPE_CATEGORIES = {'rectangle': 'tv', 'ellipse': 'clock', 'triangle': 'kite'}
_SHAPES_AS = ', '.join(f'{shape}s as {name}' for shape, name in SHAPE_CATEGORIES.items())
# background stuff classes (COCO-stuff id, name) and the colour range the background is drawn in
BACKGROUNDS = [
    (157, 'sky-other', (90, 150, 210)),
    (124, 'grass', (70, 140, 60)),
    (154, 'sand', (200, 180, 130)),
]
SPLITS = {'train': 'train2017', 'val': 'val2017', 'test': 'test2017'}


@dataclass(frozen=True)
class SyntheticCocoSpec:
    """What to generate. Image sides are drawn uniformly from ``[min_side, max_side]``."""
    num_train: int = 16
    num_val: int = 8
    num_test: int = 4
    min_side: int = 160
    max_side: int = 256
    max_objects: int = 4
    stuff_maps: bool = True
    seed: int = 0


class DatasetExistsError(FileExistsError):
    """The output folder holds files this generator did not write, or was written with other settings."""


def _shape_polygon(rng: np.random.Generator, shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Vertices (N, 2) of a shape centred at (cx, cy) that fits in a circle of ``radius``."""
    angle = rng.uniform(0, 2 * math.pi)
    if shape == 'rectangle':
        aspect = rng.uniform(0.5, 1.0)
        half_diag_angle = math.atan(aspect)
        corners = [half_diag_angle, math.pi - half_diag_angle, math.pi + half_diag_angle, -half_diag_angle]
        angles = np.array(corners) + angle
        radii = np.full(4, radius)
    elif shape == 'ellipse':
        aspect = rng.uniform(0.55, 1.0)
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        x, y = radius * np.cos(t), radius * aspect * np.sin(t)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        return np.stack([x, y], 1) @ rot.T + (cx, cy)
    else:
        angles = angle + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        radii = np.full(3, radius)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)


def _distinct_color(rng: np.random.Generator, background: Tuple[int, int, int]) -> Tuple[int, int, int]:
    while True:
        color = rng.integers(0, 256, 3)
        if np.abs(color - np.array(background)).sum() > 180:
            return tuple(int(c) for c in color)


def _draw_image(rng: np.random.Generator, spec: SyntheticCocoSpec):
    """One image: returns (RGB uint8 array, stuff map or None, list of (category id, polygon, mask))."""
    width, height = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, 2))
    stuff_id, _, base = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    gradient = np.linspace(-25, 25, height)[:, None, None]
    noise = rng.normal(0, 8, (height, width, 3))
    pixels = np.clip(np.array(base)[None, None] + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    canvas = ImageDraw.Draw(image)
    stuff = np.full((height, width), stuff_id - 1, np.uint8) if spec.stuff_maps else None

    objects, placed = [], []
    shapes = list(SHAPE_CATEGORIES)
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        shape = shapes[int(rng.integers(len(shapes)))]
        for _attempt in range(20):  # place without overlap so every mask is fully visible
            radius = rng.uniform(0.12, 0.28) * min(width, height)
            cx, cy = rng.uniform(radius + 1, width - radius - 1), rng.uniform(radius + 1, height - radius - 1)
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        polygon = _shape_polygon(rng, shape, cx, cy, radius)
        points = [tuple(p) for p in polygon.round(2).tolist()]
        canvas.polygon(points, fill=_distinct_color(rng, base))
        mask_image = Image.new('L', (width, height), 0)
        ImageDraw.Draw(mask_image).polygon(points, fill=1)
        mask = np.asarray(mask_image, dtype=bool)
        category_id = COCO_CATEGORIES[SHAPE_CATEGORIES[shape]]
        if stuff is not None:
            stuff[mask] = category_id - 1
        objects.append((category_id, polygon.round(2), mask))
    return np.asarray(image), stuff, objects


def _annotation(ann_id: int, image_id: int, category_id: int, polygon: np.ndarray, mask: np.ndarray) -> Dict:
    x0, y0 = float(polygon[:, 0].min()), float(polygon[:, 1].min())
    x1, y1 = float(polygon[:, 0].max()), float(polygon[:, 1].max())
    return {
        'id': ann_id, 'image_id': image_id, 'category_id': category_id,
        'segmentation': [polygon.reshape(-1).tolist()],
        'area': float(mask.sum()), 'bbox': [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
        'iscrowd': 0,
    }


def _categories() -> List[Dict]:
    return [{'id': cid, 'name': name} for name, cid in COCO_CATEGORIES.items()]


def _check_destination(root: str, spec: SyntheticCocoSpec, overwrite: bool) -> bool:
    """True when ``root`` already holds this exact dataset; raise if it holds anything we may not replace."""
    if not os.path.isdir(root) or not os.listdir(root):
        return False
    marker = os.path.join(root, MARKER)
    if not os.path.isfile(marker):
        raise DatasetExistsError(
            f'{root!r} exists and is not a synthetic dataset written by this generator; refusing to write into it. '
            f'Choose an empty or new folder.')
    with open(marker) as f:
        if json.load(f) == asdict(spec):
            return True
    if not overwrite:
        raise DatasetExistsError(
            f'{root!r} holds a synthetic dataset generated with other settings ({marker}); pass overwrite=True '
            f'(--overwrite) to replace it, or choose another folder.')
    shutil.rmtree(root)
    return False


def make_synthetic_coco(root: str, spec: SyntheticCocoSpec = SyntheticCocoSpec(), overwrite: bool = False,
                        progress: bool = False) -> Dict:
    """Write the dataset to ``root`` and return a summary (image/annotation counts per split).

    An existing folder with the same settings is reused as is; other contents raise :class:`DatasetExistsError`
    (with ``overwrite=True`` only a dataset this generator wrote is replaced, never a foreign folder).
    ``progress`` shows a progress bar (mmengine's) while the images are drawn.
    """
    summary_path = os.path.join(root, 'annotations')
    if _check_destination(root, spec, overwrite):
        return _summary(summary_path, reused=True)
    if progress:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(spec.num_train + spec.num_val + spec.num_test, file=sys.stdout)
    os.makedirs(summary_path, exist_ok=True)
    image_id = ann_id = 0
    for split_index, (split, count) in enumerate((('train', spec.num_train), ('val', spec.num_val),
                                                  ('test', spec.num_test))):
        folder = SPLITS[split]
        rng = np.random.default_rng([spec.seed, split_index])  # a split's images do not depend on the others' counts
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        if split == 'train' and spec.stuff_maps:
            os.makedirs(os.path.join(root, 'stuffthingmaps', folder), exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            image_id += 1
            pixels, stuff, objects = _draw_image(rng, spec)
            file_name = f'{image_id:012d}.jpg'
            Image.fromarray(pixels).save(os.path.join(root, folder, file_name), quality=95)
            if split == 'train' and stuff is not None:
                Image.fromarray(stuff).save(os.path.join(root, 'stuffthingmaps', folder, f'{image_id:012d}.png'))
            images.append({'id': image_id, 'file_name': file_name, 'height': pixels.shape[0],
                           'width': pixels.shape[1], 'license': 1})
            for category_id, polygon, mask in objects:
                ann_id += 1
                annotations.append(_annotation(ann_id, image_id, category_id, polygon, mask))
            if progress:
                bar.update()
        content = {
            'info': {'description': f'synthetic shapes ({split}): {_SHAPES_AS}', 'version': '1.0', 'year': 2026},
            'licenses': [{'id': 1, 'name': 'CC0', 'url': ''}],
            'images': images,
            'categories': _categories(),
        }
        if split == 'test':
            name = 'image_info_test-dev2017.json'
        else:
            name = f'instances_{folder}.json'
            content['annotations'] = annotations
        with open(os.path.join(summary_path, name), 'w') as f:
            json.dump(content, f)
    if progress:
        bar.file.write('\n')
    with open(os.path.join(root, MARKER), 'w') as f:
        json.dump(asdict(spec), f, indent=1)
    return _summary(summary_path, reused=False)


def _summary(annotation_dir: str, reused: bool) -> Dict:
    summary = {'reused': reused}
    for name in sorted(os.listdir(annotation_dir)):
        with open(os.path.join(annotation_dir, name)) as f:
            content = json.load(f)
        summary[name] = dict(images=len(content['images']), annotations=len(content.get('annotations', [])))
    return summary
