r"""Detections for images from a checkpoint the training script wrote: image(s) in, JSON out.

    python references/predict.py --weights runs/a/checkpoint.pth photo1.png photo2.jpg --out dets.json
    python references/predict.py --weights runs/a/model_9.pth big.tif --tile-size 512 --tile-overlap 96

The model is rebuilt as it trained (the checkpoint's model name, classes, anchors and input sizes).
A model trained on tiles (``data.tile_size`` in the checkpoint's config) predicts sliced with the same
tiles unless told otherwise; ``--tile-size 0`` turns slicing off. Sliced inference runs the model on
every tile (and the whole image, unless --no-tile-whole-image) and merges the detections in image
coordinates (references/tiles.py). Each image gives its file, size and detections: ``bbox`` as COCO's
[x, y, width, height] in image pixels, ``label`` (the model's class index), ``category`` (the class
name the checkpoint recorded), ``score``, and ``segmentation`` (COCO RLE) for a mask model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="references/predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--weights", required=True, metavar="CHECKPOINT", help="a checkpoint written by train.py")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the JSON here (default: print it)")
    p.add_argument(
        "--score-thresh", type=float, default=None, help="keep detections from this score (default: the model's)"
    )
    p.add_argument("--tile-size", type=int, default=None, help="slice into tiles of N px (default: the checkpoint's)")
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="pixels tiles share (default: the checkpoint's; with --tile-size, 20%% of it)",
    )
    p.add_argument("--no-tile-whole-image", dest="whole_image", action="store_false", default=None, help="tiles only")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    return p


def load_model(path: str, device: torch.device):
    """(model in eval mode, class names, the checkpoint's data config) from a train.py checkpoint."""
    from tv_lossfix.checkpoint import model_state_dict

    from models import build_model
    from training_checkpoint import checkpoint_model_name, load_training_checkpoint

    ckpt = load_training_checkpoint(path, "--weights")
    name = checkpoint_model_name(ckpt)
    if not name:
        from training_checkpoint import CheckpointError

        raise CheckpointError(f"--weights {path}: the checkpoint records no model name (not written by train.py)")
    state = model_state_dict(ckpt, path, "--weights")
    num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    model, report = build_model(name=name, num_classes=num_classes, weights=path)
    names = list(report.checkpoint_settings.get("class_names") or [])
    data_cfg = (ckpt.get("config") or {}).get("data") or {}
    return model.to(device).eval(), names, data_cfg


def tile_settings(args, data_cfg: Dict[str, Any]):
    """(tile, overlap, whole image) from the flags over the checkpoint's config; checked as train.py checks them."""
    from train_config import check_tile_keys

    tile = args.tile_size if args.tile_size is not None else data_cfg.get("tile_size")
    tile = tile or None  # --tile-size 0: off
    overlap = args.tile_overlap
    if overlap is None and args.tile_size is None and tile:
        overlap = data_cfg.get("tile_overlap")
    whole = args.whole_image if args.whole_image is not None else data_cfg.get("tile_whole_image", True)
    return tile, check_tile_keys(tile, overlap, whole, "predict.py"), whole


def read_image(path: str) -> torch.Tensor:
    from checks import DataError
    from data import CocoDetection

    if not os.path.isfile(path):
        raise DataError(f"{path}: image not found")
    try:
        return CocoDetection._load_with_pillow(path).float().div_(255)
    except Exception as e:  # Pillow raises many kinds
        raise DataError(f"{path}: cannot decode it: {type(e).__name__}: {e}") from None


@torch.no_grad()
def predict(model, paths: List[str], names: List[str], thresh: Optional[float], device) -> List[Dict[str, Any]]:
    from evaluation import _encode_masks

    out = []
    if thresh is not None:  # the model drops boxes under its own threshold first: a lower floor must reach it
        if not 0 <= thresh <= 1:
            from train_config import ConfigError

            raise ConfigError(f"predict.py: --score-thresh must be in [0, 1], got {thresh:g}")
        model.roi_heads.score_thresh = thresh
    floor = float(model.roi_heads.score_thresh)
    for path in paths:
        image = read_image(path)
        det = model([image.to(device)])[0]
        keep = det["scores"] >= floor
        boxes = det["boxes"][keep].cpu()
        labels = det["labels"][keep].cpu().tolist()
        scores = det["scores"][keep].cpu().tolist()
        rles = _encode_masks(det["masks"][keep]) if "masks" in det and keep.any() else None
        rows = []
        for k, (b, lab, s) in enumerate(zip(boxes.tolist(), labels, scores)):
            row = {
                "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                "label": lab,
                "category": names[lab - 1] if 0 < lab <= len(names) else str(lab),
                "score": s,
            }
            if rles is not None:
                row["segmentation"] = rles[k]
            rows.append(row)
        out.append({"image": path, "height": int(image.shape[1]), "width": int(image.shape[2]), "detections": rows})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from tiles import sliced

    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        from checks import DataError

        raise DataError(
            f"{missing[0]}: image not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    model, names, data_cfg = load_model(args.weights, device)
    tile, overlap, whole = tile_settings(args, data_cfg)
    net = sliced(model, tile, overlap, whole).eval()
    result = predict(net, args.images, names, args.score_thresh, device)
    text = json.dumps(result)
    if args.out:
        from training_checkpoint import atomic_write_text

        atomic_write_text(text + "\n", args.out)
        n = sum(len(r["detections"]) for r in result)
        how = (
            f"tiles of {tile} px, overlap {overlap}" + (" + the whole image" if whole else "")
            if tile
            else "whole images"
        )
        print(f"wrote {args.out}: {n} detections in {len(result)} image(s) ({how})")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    from errors import run_cli

    sys.exit(run_cli(main))
