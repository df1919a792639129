"""The embedded dataset: deterministic synthetic instance segmentation, written as COCO files.

Shapes of several classes on textured backgrounds, with knobs for image size, count, objects per
image, class imbalance, tiny objects and empty images. Written once per setting to
``<root>/shapes-<hash>/{train,val}.json`` + ``images/*.png`` (real COCO: xywh boxes, polygon
segmentations), so the files show users the format their own data needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("square", "circle", "triangle", "star")


@dataclass(frozen=True)
class ShapesSpec:
    num_train: int = 240
    num_val: int = 48
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_size: int = 16  # object size in px (the tiny_fraction draws below it)
    max_size: int = 48
    # Probability of each class is proportional to class_imbalance ** index: 1.0 = balanced,
    # 0.2 = each class is 5x rarer than the one before.
    class_imbalance: float = 1.0
    tiny_fraction: float = 0.0  # fraction of objects drawn 4 to 8 px wide
    empty_fraction: float = 0.1  # fraction of images with no object (kept as negatives)
    num_classes: int = 4  # shape classes used, at most len(CLASSES)
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(CLASSES):
            raise ValueError(f"shapes.num_classes must be 1..{len(CLASSES)}, got {self.num_classes}")
        if self.min_objects < 0 or self.max_objects < self.min_objects:
            raise ValueError("shapes.min_objects/max_objects: need 0 <= min_objects <= max_objects")
        if not 4 <= self.min_size <= self.max_size < self.image_size:
            raise ValueError("shapes: need 4 <= min_size <= max_size < image_size")
        for k in ("tiny_fraction", "empty_fraction"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"shapes.{k} must be in [0, 1], got {getattr(self, k)}")
        if self.class_imbalance <= 0:
            raise ValueError(f"shapes.class_imbalance must be > 0, got {self.class_imbalance}")

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    # Smooth colour gradient + stripes + noise: enough clutter that the RPN must learn shapes.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, size=3)
    grad = rng.uniform(-60, 60, size=(2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    freq, angle = rng.uniform(4, 14), rng.uniform(0, math.pi)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq * 2 * math.pi)
    img += stripes[..., None] * rng.uniform(5, 25)
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(cls: int, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    name = CLASSES[cls]
    if name == "square":
        n, radii = 4, [r * math.sqrt(2) / 1.2] * 4
        rot += math.pi / 4
    elif name == "circle":
        n, radii = 24, [r] * 24
    elif name == "triangle":
        n, radii = 3, [r * 1.15] * 3
    else:  # star
        n, radii = 10, [r if i % 2 == 0 else r * 0.45 for i in range(10)]
    return [
        (cx + radii[i] * math.cos(rot + 2 * math.pi * i / n), cy + radii[i] * math.sin(rot + 2 * math.pi * i / n))
        for i in range(n)
    ]


def _make_image(spec: ShapesSpec, rng: np.random.Generator, image_id: int, probs: np.ndarray):
    s = spec.image_size
    img = Image.fromarray(_texture(rng, s))
    draw = ImageDraw.Draw(img)
    anns = []
    n = 0 if rng.random() < spec.empty_fraction else int(rng.integers(spec.min_objects, spec.max_objects + 1))
    for _ in range(n):
        cls = int(rng.choice(spec.num_classes, p=probs))
        size = rng.uniform(4, 8) if rng.random() < spec.tiny_fraction else rng.uniform(spec.min_size, spec.max_size)
        r = size / 2
        cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
        poly = _polygon(cls, cx, cy, r, rng.uniform(0, 2 * math.pi))
        poly = [(min(max(x, 0.0), s - 1.0), min(max(y, 0.0), s - 1.0)) for x, y in poly]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon(poly, fill=colour, outline=tuple(255 - c for c in colour))
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0 = min(xs), min(ys)
        w, h = max(xs) - x0, max(ys) - y0
        flat = [round(v, 2) for p in poly for v in p]
        area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))
        anns.append(
            {
                "category_id": cls + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                "segmentation": [flat],
                "area": round(area, 2),
                "iscrowd": 0,
            }
        )
    return img, anns


def _write_split(spec: ShapesSpec, out_dir: str, split: str, count: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    probs = np.array([spec.class_imbalance**i for i in range(spec.num_classes)], dtype=np.float64)
    probs /= probs.sum()
    images, annotations = [], []
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(count):
        image_id = i + 1
        img, anns = _make_image(spec, rng, image_id, probs)
        name = f"{split}_{image_id:05d}.png"
        img.save(os.path.join(img_dir, name))
        images.append({"id": image_id, "file_name": name, "width": spec.image_size, "height": spec.image_size})
        for a in anns:
            a.update(id=len(annotations) + 1, image_id=image_id)
            annotations.append(a)
    categories = [{"id": i + 1, "name": CLASSES[i], "supercategory": "shape"} for i in range(spec.num_classes)]
    path = os.path.join(out_dir, f"{split}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(
            {
                "info": {"description": "tv_lossfix shapes", "spec": asdict(spec)},
                "images": images,
                "annotations": annotations,
                "categories": categories,
            },
            f,
        )
    os.replace(tmp, path)  # the JSON appears only once its images are all written
    return path


def ensure_shapes(root: str, spec: ShapesSpec) -> Dict[str, str]:
    """Write the dataset for ``spec`` under ``root`` unless it is there; return its paths."""
    out_dir = os.path.join(root, f"shapes-{spec.key()}")
    paths = {
        "train_ann": os.path.join(out_dir, "train.json"),
        "val_ann": os.path.join(out_dir, "val.json"),
        "train_images": os.path.join(out_dir, "images"),
        "val_images": os.path.join(out_dir, "images"),
    }
    if not os.path.exists(paths["train_ann"]):
        _write_split(spec, out_dir, "train", spec.num_train, spec.seed)
    if not os.path.exists(paths["val_ann"]):
        _write_split(spec, out_dir, "val", spec.num_val, spec.seed + 1_000_003)
    return paths
