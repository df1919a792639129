r"""How long the data and anchor report takes on a COCO train2017-sized annotation set.

    python references/benchmarks/report_speed.py [--images 118287 --boxes 860001]

Generates the annotations in memory (COCO-like image sizes and a long-tailed box-size distribution,
80 classes), then times the report for torchvision's Mask R-CNN R50-FPN (weights=None: the anchors
and resize are the same as the pretrained model's). Prints the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # references/

import numpy as np  # noqa: E402


def coco_like(n_images: int, n_boxes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # COCO's images are mostly 640 px on the long side, landscape or portrait.
    long_side = rng.choice([640, 640, 640, 612, 500, 480], size=n_images)
    short = (long_side * rng.uniform(0.55, 0.9, size=n_images)).astype(int)
    landscape = rng.random(n_images) < 0.7
    w = np.where(landscape, long_side, short)
    h = np.where(landscape, short, long_side)
    images = [
        {"id": i + 1, "width": int(w[i]), "height": int(h[i]), "file_name": f"{i:012d}.jpg"} for i in range(n_images)
    ]
    img = rng.integers(0, n_images, size=n_boxes)
    side = np.exp(rng.normal(np.log(40), 1.0, size=n_boxes)).clip(2, 600)  # long-tailed, many small
    ratio = np.exp(rng.normal(0, 0.5, size=n_boxes))
    bw = np.minimum(side / np.sqrt(ratio), w[img] - 1)
    bh = np.minimum(side * np.sqrt(ratio), h[img] - 1)
    x = rng.uniform(0, 1, size=n_boxes) * (w[img] - bw)
    y = rng.uniform(0, 1, size=n_boxes) * (h[img] - bh)
    cats = rng.integers(1, 81, size=n_boxes)
    anns = [
        {
            "id": k + 1,
            "image_id": int(img[k]) + 1,
            "category_id": int(cats[k]),
            "bbox": [float(x[k]), float(y[k]), float(bw[k]), float(bh[k])],
            "iscrowd": 0,
        }
        for k in range(n_boxes)
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}


def main(argv=None) -> int:
    import tv_lossfix

    import data_report as A

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=118287)
    p.add_argument("--boxes", type=int, default=860001)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    data = coco_like(args.images, args.boxes)
    t1 = time.perf_counter()
    model = tv_lossfix.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    t2 = time.perf_counter()
    report = A.data_report(None, model, dataset=data)
    t3 = time.perf_counter()
    print(report.text())
    print(
        f"\n{args.images} images, {args.boxes} boxes: generating {t1 - t0:.1f} s (not counted), building the model "
        f"{t2 - t1:.1f} s (not counted), the report {t3 - t2:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
