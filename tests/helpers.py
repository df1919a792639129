"""Test helpers: synthetic targets, the stock models, tiny models. Imported as ``helpers``."""

import contextlib
import copy
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from torchvision.models import detection as tvdet
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

import tv_lossfix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFS = os.path.join(ROOT, "references")  # on sys.path through pytest's pythonpath (pyproject.toml)

SMALL = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=200)


def make_targets(kind: str, sizes, num_classes: int = 3, empty=(), seed: int = 0, num_keypoints: int = 5):
    """Random but valid targets for images of `sizes` [(h, w)]; indices in `empty` get no boxes."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i, (h, w) in enumerate(sizes):
        images.append(torch.rand(3, h, w, generator=g))
        n = 0 if i in empty else 1 + i % 3
        x1 = torch.rand(n, generator=g) * (w * 0.5)
        y1 = torch.rand(n, generator=g) * (h * 0.5)
        bw = 8 + torch.rand(n, generator=g) * (w * 0.45)
        bh = 8 + torch.rand(n, generator=g) * (h * 0.45)
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1).reshape(n, 4)
        t = {"boxes": boxes, "labels": torch.randint(1, num_classes, (n,), generator=g)}
        if kind == "mask":
            masks = torch.zeros(n, h, w, dtype=torch.uint8)
            for j, b in enumerate(boxes.round().long().tolist()):
                masks[j, b[1] : b[3], b[0] : b[2]] = 1
            t["masks"] = masks
        if kind == "keypoint":
            kx = boxes[:, None, 0] + torch.rand(n, num_keypoints, generator=g) * (boxes[:, None, 2] - boxes[:, None, 0])
            ky = boxes[:, None, 1] + torch.rand(n, num_keypoints, generator=g) * (boxes[:, None, 3] - boxes[:, None, 1])
            t["keypoints"] = torch.stack([kx, ky, torch.ones_like(kx)], dim=2)
        targets.append(t)
    return images, targets


STOCK = {
    "faster": lambda **kw: tvdet.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, **SMALL, **kw
    ),
    "mask": lambda **kw: tvdet.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **SMALL, **kw),
    "keypoint": lambda **kw: tvdet.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, num_keypoints=5, **SMALL, **kw
    ),
}


def patched_copy(model, loss_cfg=None):
    return tv_lossfix.patch_model(copy.deepcopy(model), loss_cfg)


def run_losses(model, images, targets, seed: int = 123):
    model.train()
    torch.manual_seed(seed)
    return model(images, targets)


def assert_scripted_matches_eager(model, scripted, images, targets):
    """The scripted model's losses (training) and detections (eval) equal the eager model's."""
    eager = run_losses(model, images, targets)
    got = run_losses(scripted, images, targets)[0]
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-6, msg=k)
    model.eval()
    scripted.eval()
    with torch.no_grad():
        for da, db in zip(model(images), scripted(images)[1]):
            for k in da:
                torch.testing.assert_close(db[k], da[k], msg=k)


def tiny_model(kind: str = "mask", num_classes: int = 3, loss_cfg=None, seed: int = 0):
    """A Faster/Mask R-CNN with a 2-layer backbone: real heads and losses, milliseconds per step."""
    from torch import nn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    )
    backbone.out_channels = 16
    common = dict(
        num_classes=num_classes,
        min_size=64,
        max_size=96,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
    )
    if kind == "mask":
        model = tvdet.MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2), **common)
    else:
        model = tvdet.FasterRCNN(backbone, **common)
    return tv_lossfix.patch_model(model, loss_cfg) if loss_cfg is not None else model


def sampling_settings(model):
    """(matcher high, low, low-quality, sampler num, fraction, neg_pos_ub) of both heads."""
    out = {}
    for name, head in (("rpn_head", model.rpn), ("roi_head", model.roi_heads)):
        m, s = head.proposal_matcher, head.fg_bg_sampler
        assert type(m) is Matcher and type(s) is BalancedPositiveNegativeSampler  # stock objects: TorchScript
        out[name] = {
            "pos_iou_thr": m.high_threshold,
            "neg_iou_thr": m.low_threshold,
            "low_quality": m.allow_low_quality_matches,
            "num": s.batch_size_per_image,
            "pos_fraction": s.positive_fraction,
            "neg_pos_ub": getattr(head, "neg_pos_ub", -1.0),
        }
    return out


# -- references/train.py runs on tiny data --------------------------------------------------------
TINY_SHAPES = {"num_train": 8, "num_val": 4, "image_size": 64, "min_size": 12, "max_size": 30, "empty_fraction": 0.25}


def tiny_config(tmp_path, data_root, data=None, **training):
    """A 1-epoch maskrcnn_tiny run on the 64 px shapes set; ``data``: extra data: keys (lsj_size: 64 with lsj)."""
    cfg = {
        "model": {"name": "maskrcnn_tiny", "kwargs": {"min_size": 64, "max_size": 64}},
        "data": {
            "dataset": "shapes",
            "data_path": data_root,
            "shapes": TINY_SHAPES,
            "workers": 0,
            "aspect_ratio_group_factor": -1,
            "check_samples": 4,
            **(data or {}),
        },
        "training": {
            "device": "cpu",
            "batch_size": 2,
            "epochs": 1,
            "lr": 0.01,
            "warmup_iters": 2,
            "print_freq": 1,
            "output_dir": str(tmp_path / "out"),
            "plots": False,
            "gallery_images": 0,
            **training,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def train_loads(monkeypatch):
    """The dataset indices training loads, in order (the training set is the one with augmentation transforms)."""
    import data

    loaded = []
    real = data.CocoDetection.__getitem__

    def getitem(self, idx):
        if self.transforms is not None:
            loaded.append(idx)
        return real(self, idx)

    monkeypatch.setattr(data.CocoDetection, "__getitem__", getitem)
    return loaded


def coco_json_argv(ann, images, out, *extra, val_ann=None):
    """train.py's command line for a 1-epoch, 2-iteration maskrcnn_tiny run on a COCO-format set."""
    return [
        *("--dataset", "coco_json", "--train-ann", ann, "--train-images", images),
        *("--val-ann", val_ann or ann, "--val-images", images, "--model", "maskrcnn_tiny", "--device", "cpu"),
        *("-b", "2", "--epochs", "1", "-j", "0", "--aspect-ratio-group-factor", "-1", "--iters-per-epoch", "2"),
        *("--no-plots", "--gallery-images", "0", "--output-dir", str(out), "--print-freq", "1"),
        *extra,
    ]


def child_env(**extra) -> dict:
    """os.environ for a child Python that imports the recipe's modules by name: pytest's pythonpath
    reaches this process's sys.path only, so references/ goes on the child's PYTHONPATH."""
    path = os.pathsep.join(p for p in (REFS, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def records(out_dir, kind=None):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if kind is None or r["type"] == kind]


# -- torch.distributed with real ranks ----------------------------------------------------------------
def _gloo_entry(rank, world, port, fn, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.update({(rank, k): v for k, v in fn(rank).items()})
    finally:
        dist.destroy_process_group()


def on_gloo_ranks(fn, world: int = 2) -> dict:
    """Run ``fn(rank) -> dict`` in ``world`` processes joined by a gloo group; {(rank, key): value}.

    ``fn`` must be a module-level function (the processes are spawned)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gloo_entry, args=(world, port, fn, out), nprocs=world, join=True)
    return dict(out)


# -- recipe runs on a private COCO-format copy of a shapes set, as the command line runs them ---------------
def make_set(shapes, root):
    """A private copy of a shapes set's training split (images may be rewritten): (annotation dict, image folder)."""
    images = os.path.join(str(root), "images")
    shutil.copytree(shapes["train_images"], images)
    with open(shapes["train_ann"]) as f:
        return json.load(f), images


def write_json(root, data, name="ann.json"):
    path = os.path.join(str(root), name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def cli(args):
    """train.cli as the command line runs it: (exit code, stdout, stderr)."""
    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train.cli(args)
    return rc, out.getvalue(), err.getvalue()


def assert_names(text, *names, one_line=False):
    """``text`` names each of ``names`` (``str(name)`` appears verbatim, no regex); with ``one_line``, ``text``
    is a single line. Message tests assert what a message must name (key, flag, file, id, value), not its
    wording."""
    text = str(text)
    if one_line:
        assert len(text.strip().splitlines()) == 1, text
    for name in names:
        assert str(name) in text, f"{name!r} not named in: {text}"


@contextlib.contextmanager
def raises_naming(exc, *names, one_line=True):
    """``pytest.raises(exc)`` whose message names each of ``names`` (see ``assert_names``); one line unless
    ``one_line=False`` (a data check's error lists every problem found, a line each)."""
    with pytest.raises(exc) as info:
        yield info
    assert_names(info.value, *names, one_line=one_line)


def one_line_error(rc, err, pattern):
    """Exit code 1 and one ``error:`` line matching ``pattern``, no traceback."""
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err


def one_line_error_naming(rc, err, *names):
    """Exit code 1 and one ``error:`` line, no traceback, naming each of ``names`` (see ``assert_names``)."""
    one_line_error(rc, err, "")
    assert_names(err, *names)


def coco_boxes(sizes, image_hw=(96, 128), n_images=6, seed=0):
    """A COCO dict of ``n_images`` images of one size, each with one box of about each side in ``sizes``
    (width and height x0.7..1.3, random position), classes a, b, c in turn. No image file."""
    rng = np.random.default_rng(seed)
    h, w = image_hw
    images = [{"id": i + 1, "width": w, "height": h, "file_name": f"{i}.png"} for i in range(n_images)]
    anns, k = [], 0
    for img in images:
        for s in sizes:
            k += 1
            bw, bh = s * rng.uniform(0.7, 1.3), s * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append(
                {
                    "id": k,
                    "image_id": img["id"],
                    "category_id": 1 + k % 3,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    return {"images": images, "annotations": anns, "categories": cats}


def another_value(o):
    """A value of a schema setting (config_schema.Opt) other than its default, of its own kind."""
    if o.kind is bool:
        return not o.default
    if o.kind in (int, float):
        return (o.default or 0) + 1
    if o.kind is str:
        return next((c for c in o.choices if c != o.default), None) if o.choices else "x"
    if o.kind is dict:
        return {"x": 1}
    return [[1.0]] if o.default is None else None
