"""COCO-format detection data: dataset, transforms, copy-paste, and the class counts behind repeat-factor
sampling (the samplers themselves are in samplers.py)."""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any, Collection, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from checks import DataError, pixel_format


class CocoDetection(Dataset):
    """Images + targets from a COCO JSON (CVAT, Label Studio and Roboflow export this format).

    Targets follow torchvision's detection convention: ``boxes`` [N, 4] xyxy float, ``labels``
    int64 (0 is background), ``masks`` [N, H, W] uint8, plus ``image_id``, ``area``, ``iscrowd``.
    Crowd annotations are left out of training targets (as in torchvision's references).
    Images without annotations are kept: they are negatives.

    Args:
        coco: a ``pycocotools.coco.COCO`` (already checked, see ``checks.py``).
        image_dir: folder the ``file_name`` entries are relative to.
        label_map: category id -> contiguous label (1..K); identity for COCO's 91-class ids.
        transforms: callable (uint8 image, target) -> (float image, target); default: convert to [0, 1].
        backend: "pil" (decode with Pillow) or "tensor" / "tv_tensor" (torchvision.io), as --backend.
        with_masks: decode segmentations into masks.
        with_keypoints: add ``keypoints`` [N, K, 3] (x, y, visibility) from COCO keypoint annotations.
    """

    def __init__(
        self,
        coco,
        image_dir: str,
        label_map: Dict[int, int],
        transforms=None,
        backend: str = "pil",
        with_masks: bool = True,
        with_keypoints: bool = False,
    ):
        self.coco = coco
        self.image_dir = image_dir
        self.ids = sorted(coco.imgs)
        self.label_map = label_map
        self.transforms = transforms
        self.backend = backend
        self.with_masks = with_masks
        self.with_keypoints = with_keypoints

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> List[float]:
        return [self.coco.imgs[i]["width"] / max(self.coco.imgs[i]["height"], 1) for i in self.ids]

    def _load_image(self, path: str) -> torch.Tensor:
        """uint8 [3, H, W]: the transforms work on uint8 (as torchvision's presets) and end in [0, 1] floats.

        16-bit images become 8-bit as value >> 8 with both backends (Pillow's convert("RGB") would clip
        16-bit grey at 255: a blank image). Neither backend applies EXIF orientation, as torchvision.
        """
        if self.backend in ("tensor", "tv_tensor"):
            from torchvision.io import ImageReadMode, decode_image, read_file

            try:  # read_file: torchvision < 0.20 decodes bytes only, not a path
                image = decode_image(read_file(path), mode=ImageReadMode.RGB)  # 16-bit PNGs come as uint16
            except RuntimeError as e:
                if "8-bit" not in str(e):
                    raise
                return self._load_with_pillow(path)  # torchvision < 0.20 refuses 16-bit PNGs: same pixels
            return (image.to(torch.int32) >> 8).to(torch.uint8) if image.dtype == torch.uint16 else image
        return self._load_with_pillow(path)

    @staticmethod
    def _load_with_pillow(path: str) -> torch.Tensor:
        with Image.open(path) as im:
            kind = pixel_format(im.mode, im.format)
            if kind == "unknown":
                raise ValueError(f"Pillow mode {im.mode} pixels (32-bit integer or float) have no known range")
            if kind == "16bit":
                grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                arr = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def load_image(self, image_id: int) -> torch.Tensor:
        """The image as uint8 [3, H, W]; a file that does not decode is a DataError naming it."""
        path = os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])
        try:
            return self._load_image(path)
        except Exception as e:  # Pillow / torchvision.io raise OSError, SyntaxError, RuntimeError, ...
            reason = (str(e).strip().splitlines() or [""])[-1]
            raise DataError(f"image {image_id}: cannot decode {path}: {type(e).__name__}: {reason}") from None

    def target_for(self, image_id: int) -> Dict[str, torch.Tensor]:
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # COCO xywh -> xyxy
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_map[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(image_id),
            "area": torch.tensor([a.get("area", 0.0) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.with_masks:
            masks = [decode_segmentation(a["segmentation"], h, w) for a in anns]
            target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        if self.with_keypoints:
            kps = torch.tensor([a.get("keypoints", []) for a in anns], dtype=torch.float32)
            target["keypoints"] = kps.reshape(len(anns), -1, 3) if anns else torch.zeros(0, 17, 3)
        return target

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        image = self.load_image(image_id)
        target = self.target_for(image_id)
        return (self.transforms or eval_transform)(image, target)


def decode_segmentation(seg: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or uncompressed RLE) as an [h, w] uint8 0/1 mask."""
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


# -- transforms: torchvision's detection presets, on transforms.v2 ---------------------------------
# COCO person keypoints swap left and right under a horizontal flip.
COCO_KEYPOINT_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
MEAN = (123.0, 117.0, 104.0)  # torchvision's fill for padded / zoomed-out pixels (uint8 scale)
MULTISCALE_SIZES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
# Policies that set the input size themselves: the model must not resize again (_skip_resize).
SIZE_SETTING_POLICIES = ("lsj", "multiscale")


class KeypointHorizontalFlip:
    """Horizontal flip that also mirrors keypoints (transforms.v2 leaves plain keypoint tensors alone)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(1) >= self.p:
            return image, target
        image = image.flip(-1)
        w = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        kps = target["keypoints"].clone()
        kps[..., 0] = w - kps[..., 0]
        if kps.shape[1] == len(COCO_KEYPOINT_FLIP):
            kps = kps[:, COCO_KEYPOINT_FLIP]
        kps[..., 0][kps[..., 2] == 0] = 0  # invisible points stay at 0
        target["keypoints"] = kps
        return image, target


class FixedSizeCrop:
    """torchvision's lsj crop: a random crop to at most ``size``, then bottom/right padding to exactly it."""

    def __init__(self, size: int, fill=MEAN):
        self.size, self.fill = size, fill

    def __call__(self, image, target):
        from torchvision.transforms.v2 import functional as F

        h, w = image.shape[-2:]
        nh, nw = min(h, self.size), min(w, self.size)
        r = float(torch.rand(1))  # one draw for both offsets, as torchvision
        top, left = int(max(h - self.size, 0) * r), int(max(w - self.size, 0) * r)
        pad = [0, 0, self.size - nw, self.size - nh]
        image = F.pad(F.crop(image, top, left, nh, nw), pad, fill=list(self.fill))
        target = dict(target)
        target["boxes"] = F.pad(F.crop(target["boxes"], top, left, nh, nw), pad)
        if "masks" in target:
            target["masks"] = F.pad(F.crop(target["masks"], top, left, nh, nw), pad, fill=0)
        return image, target


def _wrap(image, target):
    from torchvision import tv_tensors

    target = dict(target)
    target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=tuple(image.shape[-2:]))
    if "masks" in target:
        target["masks"] = tv_tensors.Mask(target["masks"])
    return tv_tensors.Image(image), target


def _unwrap_and_sanitize(image, target):
    """Plain tensors again; drop boxes a crop left degenerate (with their labels, masks...), as
    torchvision's SanitizeBoundingBoxes does, and recompute area from what is left."""
    plain = lambda t: t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t  # noqa: E731
    image = plain(image)
    target = {k: plain(v) for k, v in target.items()}
    boxes = target["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    if not bool(keep.all()):
        for k in ("boxes", "labels", "masks", "keypoints", "area", "iscrowd"):
            if k in target:
                target[k] = target[k][keep]
    if "masks" in target and target["masks"].numel():
        target["area"] = target["masks"].flatten(1).sum(1).float()
    elif "area" in target:
        target["area"] = (target["boxes"][:, 2:] - target["boxes"][:, :2]).prod(1)
    return image, target


def _to_float(image, target):
    # uint8 -> [0, 1], as x / 255 (v2.ToDtype multiplies by 1/255, one ulp off from the division).
    return image.float().div_(255), target


class DetectionPresetTrain:
    """torchvision's ``DetectionPresetTrain`` policies on transforms.v2 (images in uint8 until the end).

    ``hflip``; ``lsj`` (ScaleJitter to ``lsj_size`` with a fixed-size crop); ``multiscale``
    (RandomShortestSize 480..800, max 1333); ``ssd`` (photometric distort, zoom out, IoU crop);
    ``ssdlite`` (IoU crop); each with a horizontal flip at p=0.5. ``none`` (ours) only converts.
    Keypoint targets support ``hflip`` and ``none`` only (v2 does not move plain keypoint tensors).
    """

    def __init__(self, policy: str, lsj_size: int = 1024, with_keypoints: bool = False):
        from torchvision import tv_tensors
        from torchvision.transforms import v2 as T

        if with_keypoints and policy not in ("hflip", "none"):
            raise ValueError(
                f"--data-augmentation {policy} would move images and boxes but not keypoints: "
                f"keypoint models train with hflip (torchvision's keypoint recipe) or none"
            )
        flip = [KeypointHorizontalFlip(0.5)] if with_keypoints else [T.RandomHorizontalFlip(0.5)]
        steps: Dict[str, list] = {
            "hflip": flip,
            "lsj": [T.ScaleJitter(target_size=(lsj_size, lsj_size), antialias=True), FixedSizeCrop(lsj_size), *flip],
            "multiscale": [T.RandomShortestSize(min_size=MULTISCALE_SIZES, max_size=1333, antialias=True), *flip],
            "ssd": [
                T.RandomPhotometricDistort(),
                T.RandomZoomOut(fill={tv_tensors.Image: MEAN, tv_tensors.Mask: 0}),
                T.RandomIoUCrop(),
                *flip,
            ],
            "ssdlite": [T.RandomIoUCrop(), *flip],
            "none": [],
        }
        if policy not in steps:
            raise ValueError(f"data.augmentation must be one of {', '.join(steps)}, got {policy!r}")
        self.policy = policy
        self.steps = ([] if with_keypoints else [_wrap]) + steps[policy]

    def __call__(self, image, target):
        for step in self.steps:
            image, target = step(image, target)
        return _to_float(*_unwrap_and_sanitize(image, target))


def eval_transform(image, target):
    return _to_float(image, target)


def collate(batch):
    return tuple(zip(*batch))


# -- simple copy-paste (Ghiasi et al. 2021), torchvision's SimpleCopyPaste semantics -----------------
def _paste(image, target, src_image, src):
    """Paste a random subset of ``src``'s instances onto ``image``, blended, resized to ``image``."""
    from torchvision.ops import masks_to_boxes
    from torchvision.transforms.v2 import functional as F

    n = len(src["labels"])
    if n == 0 or "masks" not in src:
        return image, target
    pick = torch.unique(torch.randint(0, n, (n,)))  # a random subset, as torchvision draws it
    masks, boxes, labels = src["masks"][pick], src["boxes"][pick], src["labels"][pick]
    size = tuple(image.shape[-2:])
    if tuple(src_image.shape[-2:]) != size:
        sy, sx = size[0] / src_image.shape[-2], size[1] / src_image.shape[-1]
        src_image = F.resize(src_image, list(size), antialias=True)
        masks = F.resize(masks, list(size), interpolation=F.InterpolationMode.NEAREST)
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
    alpha = (masks.sum(0) > 0).float()[None]
    alpha_blur = F.gaussian_blur(alpha, kernel_size=[5, 5], sigma=[2.0, 2.0])  # blending=True
    image = image * (1 - alpha_blur) + src_image * alpha_blur
    kept_masks = target["masks"] * (1 - alpha.to(target["masks"].dtype))
    keep = kept_masks.flatten(1).sum(1) > 0
    kept_masks = kept_masks[keep]
    out = dict(target)
    out["masks"] = torch.cat([kept_masks, masks.to(kept_masks.dtype)])
    out["boxes"] = torch.cat([masks_to_boxes(kept_masks) if len(kept_masks) else boxes.new_zeros(0, 4), boxes])
    out["labels"] = torch.cat([target["labels"][keep], labels])
    out["area"] = out["masks"].flatten(1).sum(1).float()
    out["iscrowd"] = torch.zeros(len(out["labels"]), dtype=torch.int64)
    valid = (out["boxes"][:, 2:] > out["boxes"][:, :2]).all(1)
    for k in ("masks", "boxes", "labels", "area", "iscrowd"):
        out[k] = out[k][valid]
    return image, out


def copy_paste_collate(batch):
    """Each image gets instances of the previous one in the batch (torchvision's batch roll)."""
    images, targets = [list(x) for x in zip(*batch)]
    pairs = zip(images, targets, images[-1:] + images[:-1], targets[-1:] + targets[:-1])
    out = [_paste(i, t, si, st) for i, t, si, st in pairs] if len(images) > 1 else list(zip(images, targets))
    return tuple(o[0] for o in out), tuple(o[1] for o in out)


# -- repeat-factor sampling (Gupta et al., LVIS 2019; Detectron2's RepeatFactorTrainingSampler) ----------
def image_classes(annotations: Iterable[Dict[str, Any]], image_ids: Sequence[int]) -> List[Set[int]]:
    """The set of category ids of each image in ``image_ids`` (non-crowd annotations, as training uses)."""
    by_image: Dict[int, Set[int]] = {i: set() for i in image_ids}
    for a in annotations:
        if not a.get("iscrowd", 0) and a["image_id"] in by_image:
            by_image[a["image_id"]].add(a["category_id"])
    return [by_image[i] for i in image_ids]


def class_image_fractions(classes: Sequence[Collection[int]]) -> Dict[int, float]:
    """f(c): the fraction of the images (empty ones included: they are trained on too) holding class c."""
    counts: Counter = Counter(c for cs in classes for c in set(cs))
    n = max(len(classes), 1)
    return {c: counts[c] / n for c in sorted(counts)}


def repeat_factors(
    classes: Sequence[Collection[int]], threshold: float, sqrt: bool = True
) -> Tuple[List[float], Dict[int, float]]:
    """Per-image and per-class repeat factors for the threshold t.

    r(c) = max(1, sqrt(t / f(c))) (t / f(c) when ``sqrt`` is false), f(c) as class_image_fractions;
    an image's factor is the largest r(c) of its classes, 1 for an image without objects.
    """
    if not threshold > 0:
        raise ValueError(f"the repeat-factor threshold must be > 0, got {threshold}")
    per_class = {}
    for c, f in class_image_fractions(classes).items():
        ratio = threshold / f
        per_class[c] = max(1.0, math.sqrt(ratio) if sqrt else ratio)
    return [max((per_class[c] for c in cs), default=1.0) for cs in classes], per_class


# A class needs repeating when it is in fewer than half as many images as the median class.
BALANCED_RATIO = 2.0


def suggest_repeat_threshold(classes: Sequence[Collection[int]]) -> Optional[float]:
    """A threshold that repeats only the classes rarer than the median class; None if none needs it.

    t = the median class's image fraction (rounded down to 3 significant digits, so that the median
    class itself keeps factor 1): each rarer class c gets sqrt(median / f(c)). LVIS's fixed 0.001 only
    suits datasets with 1000+ classes; the median adapts to any number of classes and images. None
    when there are fewer than two classes or the rarest class is in at least 1 / BALANCED_RATIO as
    many images as the median one (its factor would stay under sqrt(2): little would change).
    """
    fractions = sorted(class_image_fractions(classes).values())
    if len(fractions) < 2:
        return None
    median = float(np.median(fractions))
    if median < BALANCED_RATIO * fractions[0]:
        return None
    digits = 2 - math.floor(math.log10(median))  # 3 significant digits, rounded down
    return math.floor(median * 10**digits * (1 + 1e-12)) / 10**digits
