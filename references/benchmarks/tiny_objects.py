r"""The diagnostics on a set built to fail: 3 imbalanced classes (20 : 5 : 1) and tiny objects.

    python references/benchmarks/tiny_objects.py [--out runs/tiny_objects] [--epochs 6]

Writes its own COCO-format set (filled ellipses, crosses and rings on noisy backgrounds; not the
shapes demo), prints the data and anchor report, trains maskrcnn_tiny with the default anchors,
then with the anchors the report advises (its YAML, unchanged), and prints both runs' per-class
tables: the numbers in the README's results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # references/

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

CLASSES = ("ellipse", "cross", "ring")
FREQ = (20, 5, 1)


def _draw(draw: ImageDraw.ImageDraw, cls: int, box, color) -> None:
    x1, y1, x2, y2 = box
    if cls == 0:
        draw.ellipse(box, fill=color)
    elif cls == 1:
        cx, cy, t = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 5, 1)
        draw.rectangle((x1, cy - t, x2, cy + t), fill=color)
        draw.rectangle((cx - t, y1, cx + t, y2), fill=color)
    else:
        draw.ellipse(box, outline=color, width=max(int((x2 - x1) / 5), 1))


def square_box(rng: np.random.Generator, cls: int, size: int) -> tuple:
    """A square box (x1, y1, x2, y2) in the image, 60% of them tiny (4-10 px), the rest 16-40 px."""
    s = rng.uniform(4, 10) if rng.random() < 0.6 else rng.uniform(16, 40)
    x, y = rng.uniform(0, size - s - 1, size=2)
    return (x, y, x + s, y + s)


def write_split(
    root: str,
    name: str,
    n: int,
    size: int,
    rng: np.random.Generator,
    classes=CLASSES,
    freq=FREQ,
    draw_fn=_draw,
    box_fn=square_box,
    empty_fraction: float = 0.0,
) -> str:
    """n noisy images with 1-4 objects each as COCO JSON + PNG; returns the JSON's path.

    The defaults write this benchmark's set; ``classes`` / ``freq`` / ``draw_fn(draw, cls, box, color)``
    / ``box_fn(rng, cls, size)`` let another benchmark write its own classes with the same format;
    ``empty_fraction``: the chance of an image without objects (0: no draw, the sets above unchanged).
    """
    os.makedirs(os.path.join(root, name), exist_ok=True)
    images, anns = [], []
    p = np.asarray(freq, dtype=float) / sum(freq)
    for i in range(n):
        bg = (rng.normal(110, 35, size=(size, size, 3))).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(bg)
        draw = ImageDraw.Draw(im)
        empty = empty_fraction > 0 and rng.random() < empty_fraction
        for _ in range(0 if empty else rng.integers(1, 5)):
            cls = int(rng.choice(len(classes), p=p))
            box = box_fn(rng, cls, size)
            mask = Image.new("L", (size, size))
            draw_fn(ImageDraw.Draw(mask), cls, box, 255)
            color = tuple(int(c) for c in rng.integers(160, 256, size=3))
            draw_fn(draw, cls, box, color)
            ys, xs = np.nonzero(np.asarray(mask))
            if len(xs) == 0:
                continue
            bx, by = float(xs.min()), float(ys.min())
            bw, bh = float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)

            rle = mask_utils.encode(np.asfortranarray((np.asarray(mask) > 0).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [bx, by, bw, bh],
                    "area": float(len(xs)),
                    "iscrowd": 0,
                    "segmentation": rle,
                }
            )
        fname = f"{i:05d}.png"
        im.save(os.path.join(root, name, fname))
        images.append({"id": i + 1, "file_name": fname, "width": size, "height": size})
    path = os.path.join(root, f"{name}.json")
    cats = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return path


def per_class_lines(log: str) -> list:
    """The per-class tables and epoch lines of a training log."""
    keep, inside = [], False
    for line in log.splitlines():
        if line.startswith("per class"):
            inside = True
        elif line.startswith("epoch ") and ": bbox AP" in line:
            keep.append(line)
            inside = False
            continue
        if inside or line.startswith("WARNING") or line.startswith("  likely cause"):
            keep.append(line)
    return keep


def run(out: str, data: str, name: str, epochs: int, anchors=None) -> dict:
    import contextlib
    import io

    import train

    model = {"name": "maskrcnn_tiny", "kwargs": {"min_size": 160, "max_size": 160}, **(anchors or {})}
    cfg = {
        "model": model,
        "data": {
            "dataset": "coco_json",
            "train_ann": os.path.join(data, "train.json"),
            "train_images": os.path.join(data, "train"),
            "val_ann": os.path.join(data, "val.json"),
            "val_images": os.path.join(data, "val"),
            "workers": 0,
            "aspect_ratio_group_factor": -1,
        },
        "training": {
            "device": "cpu",
            "batch_size": 4,
            "epochs": epochs,
            "lr": 0.02,
            "lr_steps": [epochs - 1],
            "warmup_iters": 50,
            "print_freq": 1000,
            "output_dir": os.path.join(out, name),
            "overwrite": True,  # the benchmark's own folder: a rerun replaces the run before it
            "gradient_clip": {"enabled": True, "max_norm": 10.0},
            "gallery_images": 6,
        },
    }
    path = os.path.join(out, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = train.main(["--config", path])
    text = buf.getvalue()
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(text)
    return {"code": code, "log": text, "tables": per_class_lines(text)}


def anchor_advice(run_dir: str):
    """The anchor YAML keys the run's data report advised (its last data_report record), or None."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        reports = [r for r in map(json.loads, f) if r.get("type") == "data_report"]
    advice = reports[-1]["advice"] if reports else None
    return {k: advice[k] for k in ("anchor_sizes", "aspect_ratios")} if advice else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/tiny_objects")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args(argv)
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "val.json")):
        rng = np.random.default_rng(0)
        write_split(data, "train", 300, 160, rng)
        write_split(data, "val", 60, 160, rng)
    base = run(args.out, data, "default_anchors", args.epochs)
    report = base["log"][base["log"].index("data report:") : base["log"].index("training ")]
    print(report)
    advice = anchor_advice(os.path.join(args.out, "default_anchors"))
    print("== default anchors: per class, each evaluation\n" + "\n".join(base["tables"]))
    if advice:
        tuned = run(args.out, data, "advised_anchors", args.epochs, advice)
        after = tuned["log"][tuned["log"].index("data report:") : tuned["log"].index("training ")]
        print("== with the advised anchors\n" + after)
        print("== advised anchors: per class, each evaluation\n" + "\n".join(tuned["tables"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
