"""COCO-format detection data: dataset, transforms, aspect-ratio grouped batching."""

from __future__ import annotations

import bisect
import math
import os
from typing import Any, Dict, Iterator, List, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset, Sampler


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
        transforms: callable (image, target) -> (image, target).
        backend: "PIL" (decode with Pillow) or "tensor" (torchvision.io), as torchvision's --backend.
        with_masks: decode segmentations into masks.
        with_keypoints: add ``keypoints`` [N, K, 3] (x, y, visibility) from COCO keypoint annotations.
    """

    def __init__(self, coco, image_dir: str, label_map: Dict[int, int], transforms=None, backend: str = "PIL",
                 with_masks: bool = True, with_keypoints: bool = False):
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
        if self.backend == "tensor":
            from torchvision.io import ImageReadMode, decode_image

            return decode_image(path, mode=ImageReadMode.RGB).float().div_(255)
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)

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
        image = self._load_image(os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"]))
        target = self.target_for(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


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


# -- transforms (on tensors, so they run the same with both image backends) -------------------
class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


# COCO person keypoints swap left and right under a horizontal flip.
COCO_KEYPOINT_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if torch.rand(()) < self.p:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
            if "keypoints" in target:
                kps = target["keypoints"].clone()
                kps[..., 0] = w - kps[..., 0]
                if kps.shape[1] == len(COCO_KEYPOINT_FLIP):
                    kps = kps[:, COCO_KEYPOINT_FLIP]
                kps[..., 0][kps[..., 2] == 0] = 0  # invisible points stay at 0
                target["keypoints"] = kps
        return image, target


class RandomScale:
    """Rescale image, boxes and masks by a random factor (multi-scale / large-scale jitter)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, image, target):
        s = self.low + (self.high - self.low) * torch.rand(()).item()
        h, w = image.shape[-2:]
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        image = torch.nn.functional.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        target = dict(target)
        target["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if "masks" in target and target["masks"].numel():
            target["masks"] = torch.nn.functional.interpolate(target["masks"][:, None].float(), size=(nh, nw), mode="nearest")[:, 0].byte()
        elif "masks" in target:
            target["masks"] = torch.zeros(0, nh, nw, dtype=torch.uint8)
        target["area"] = target["area"] * (nw * nh) / (w * h)
        if "keypoints" in target:
            kps = target["keypoints"].clone()
            kps[..., 0] *= nw / w
            kps[..., 1] *= nh / h
            target["keypoints"] = kps
        return image, target


AUGMENTATIONS = ("hflip", "multiscale", "lsj", "none")


def train_transforms(policy: str):
    """torchvision's --data-augmentation policies that apply to two-stage detectors."""
    if policy == "hflip":
        return Compose([RandomHorizontalFlip(0.5)])
    if policy == "multiscale":
        return Compose([RandomScale(0.8, 1.25), RandomHorizontalFlip(0.5)])
    if policy == "lsj":
        return Compose([RandomScale(0.1, 2.0), RandomHorizontalFlip(0.5)])
    if policy == "none":
        return None
    raise ValueError(f"data.augmentation must be one of {', '.join(AUGMENTATIONS)}, got {policy!r}")


def collate(batch):
    return tuple(zip(*batch))


# -- simple copy-paste (Ghiasi et al. 2021), batch level as in torchvision's references --------
def copy_paste_collate(batch):
    """Paste the instances of each image onto the next one in the batch (needs masks)."""
    images, targets = [list(x) for x in zip(*batch)]
    n = len(images)
    out_images, out_targets = [], []
    for i in range(n):
        img, tgt = images[i], targets[i]
        src_img, src = images[(i + 1) % n], targets[(i + 1) % n]
        if n < 2 or "masks" not in src or src["masks"].numel() == 0 or src_img.shape != img.shape:
            out_images.append(img)
            out_targets.append(tgt)
            continue
        paste = src["masks"].bool().any(0)
        img = torch.where(paste[None], src_img, img)
        # Instances of the target image lose the pixels covered by the pasted ones.
        masks = tgt["masks"] & ~paste[None]
        keep = masks.flatten(1).sum(1) > 0
        masks = masks[keep]
        ys_xs = [torch.where(m) for m in masks]
        boxes = torch.tensor([[x.min(), y.min(), x.max() + 1, y.max() + 1] for y, x in ys_xs], dtype=torch.float32).reshape(-1, 4)
        new = {
            "boxes": torch.cat([boxes, src["boxes"]]),
            "labels": torch.cat([tgt["labels"][keep], src["labels"]]),
            "masks": torch.cat([masks.byte(), src["masks"]]),
            "image_id": tgt["image_id"],
            "area": torch.cat([masks.flatten(1).sum(1).float(), src["area"]]),
            "iscrowd": torch.zeros(int(keep.sum()) + len(src["labels"]), dtype=torch.int64),
        }
        out_images.append(img)
        out_targets.append(new)
    return tuple(out_images), tuple(out_targets)


# -- samplers -----------------------------------------------------------------------------------
def aspect_ratio_groups(ratios: Sequence[float], k: int) -> List[int]:
    """Group index of each image: log2 aspect ratio quantized into 2k bins (torchvision's scheme)."""
    bins = [2 ** x for x in np.linspace(-1, 1, 2 * k + 1)] if k > 0 else [1.0]
    return [bisect.bisect_right(bins, r) for r in ratios]


class GroupedBatchSampler(Sampler):
    """Batches whose images share an aspect-ratio group (less padding), from any base sampler.

    Leftovers of the groups are merged at the end, so there are exactly ceil(N / batch_size)
    batches and every sample of the base sampler appears once.
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[List[int]]:
        buffers: Dict[int, List[int]] = {}
        for idx in self.sampler:
            buf = buffers.setdefault(self.group_ids[idx], [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield list(buf)
                buf.clear()
        rest = [i for buf in buffers.values() for i in buf]
        for k in range(0, len(rest), self.batch_size):
            yield rest[k : k + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class SeededRandomSampler(Sampler):
    """A random permutation per epoch from (seed, epoch): the order is reproducible on resume."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
