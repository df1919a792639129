"""Tiled (sliced) training and inference, for objects too small at any input size the whole image allows.

Training (``data.tile_size`` T, ``data.tile_overlap`` O): every training image is cut into square
tiles of T native pixels whose starts are ``T - O`` apart, the last one on each axis flush with the
image's edge (an image side under T is one tile of that side). A tile is an image to the model: it
is resized by the model's own transform like any image, so a tile of T px with min_size M magnifies
its objects M / T times. Each object's box is clipped to the tile and its mask cropped; a piece
that keeps under MIN_VISIBLE of its box area is dropped (the log counts them): an object cut in
half at a tile edge is mostly not the object, and with an overlap at least the largest object's
side every object is whole in some tile (SAHI's ``slice_coco`` keeps pieces from 10% of their
area; a tenth of a 6 px object is a pixel or two labelled as the whole class). Tiles without
objects are kept as negatives, as whole empty images are (SAHI's default too).

Inference (evaluation with the same keys, and references/predict.py): the model runs on every tile
(and, with ``data.tile_whole_image``, on the whole image as it always would, which keeps the large
objects a tile cuts), the detections are shifted into image coordinates, masks pasted into the
image, and the detections of different tiles merged (:func:`merge_detections`): the highest-scoring
detection absorbs every detection of the same class from *another* tile or pass whose intersection
over the smaller box is at least MERGE_IOS, taking the union of their boxes and masks. Within one
tile the model's own NMS has already run. Intersection over the smaller box, not IoU, because the
piece of an object a tile cuts is small against the whole one, so its IoU is low while it lies
entirely inside. SAHI's default (greedy non-maximum merging on intersection over smaller) has the
same idea (its defaults: intersection over smaller at 0.5, class by class, the whole-image pass
on when there is more than one slice, slices overlapping by 20%); this is written from its
description, and merges across sources only, where SAHI also merges within one slice.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

MIN_VISIBLE = 0.5  # a clipped object is kept when at least this fraction of its box area is in the tile
OVERLAP_FRACTION = 0.2  # data.tile_overlap's default, a fraction of data.tile_size (SAHI's default ratio)
MERGE_IOS = 0.5  # detections of different tiles are one object from this intersection over the smaller box
MIN_TILE = 32  # one stride-32 cell: a smaller tile has no feature map to speak of


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Starts of the tiles along one axis: ``tile - overlap`` apart, the last flush with the edge."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def tile_windows(h: int, w: int, tile: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """(x0, y0, width, height) of every tile of an h x w image, row by row."""
    return [
        (x, y, min(tile, w), min(tile, h)) for y in tile_starts(h, tile, overlap) for x in tile_starts(w, tile, overlap)
    ]


def clip_boxes(boxes: torch.Tensor, window: Tuple[int, int, int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """xyxy ``boxes`` in the window's coordinates, clipped to it, and the visible fraction of each box's area."""
    x0, y0, w, h = window
    shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    clipped = torch.stack(
        [shifted[:, 0].clamp(0, w), shifted[:, 1].clamp(0, h), shifted[:, 2].clamp(0, w), shifted[:, 3].clamp(0, h)],
        dim=1,
    )
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    return clipped, torch.where(area > 0, kept / area.clamp(min=1e-12), torch.zeros_like(area))


def crop_target(
    target: Dict[str, torch.Tensor], window: Tuple[int, int, int, int], min_visible: float = MIN_VISIBLE
) -> Tuple[Dict[str, torch.Tensor], int]:
    """A training target cut to ``window``: boxes clipped, masks cropped, pieces under ``min_visible``
    of their box dropped. Returns (target, pieces dropped) (objects wholly outside are not counted)."""
    x0, y0, w, h = window
    boxes, visible = clip_boxes(target["boxes"], window)
    keep = (visible >= min_visible) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    dropped = int(((visible > 0) & ~keep).sum())
    out = dict(target)
    out["boxes"] = boxes[keep]
    for key in ("labels", "iscrowd"):
        if key in target:
            out[key] = target[key][keep]
    if "area" in target:
        out["area"] = (target["area"] * visible)[keep]
    if "masks" in target:
        out["masks"] = target["masks"][:, y0 : y0 + h, x0 : x0 + w][keep]
    return out, dropped


class TiledDataset(torch.utils.data.Dataset):
    """A CocoDetection's images as tiles (see the module's docstring): one item per tile.

    ``coco`` and ``ids`` stay the images' (the class counts, the data report); ``item_classes`` gives
    each tile's classes (repeat-factor sampling), ``aspect_ratios`` each tile's (batch grouping).
    """

    def __init__(self, base, tile: int, overlap: int, transforms=None, min_visible: float = MIN_VISIBLE):
        from checks import DataError

        self.base, self.coco, self.ids = base, base.coco, base.ids
        self.transforms, self.min_visible = transforms, min_visible
        self.tile, self.overlap = tile, overlap
        self.items: List[Tuple[int, Tuple[int, int, int, int]]] = []
        self._classes: List[Set[int]] = []
        self.pieces_dropped = self.objects = self.larger_than_overlap = 0
        for image_id in base.ids:
            info = base.coco.imgs[image_id]
            anns = [a for a in base.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
            for a in anns:
                if max(a["bbox"][2], a["bbox"][3]) > tile:
                    raise DataError(
                        f"data.tile_size {tile} is smaller than annotation {a.get('id')} (image {image_id}, "
                        f"{a['bbox'][2]:g} x {a['bbox'][3]:g} px): no tile holds it whole; raise data.tile_size"
                    )
                self.larger_than_overlap += max(a["bbox"][2], a["bbox"][3]) > overlap
            self.objects += len(anns)
            boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]
            cats = [a["category_id"] for a in anns]
            for window in tile_windows(info["height"], info["width"], tile, overlap):
                _, visible = clip_boxes(boxes, window)
                kept = visible >= min_visible
                self.pieces_dropped += int(((visible > 0) & ~kept).sum())
                self.items.append((image_id, window))
                self._classes.append({c for c, k in zip(cats, kept.tolist()) if k})

    def __len__(self) -> int:
        return len(self.items)

    def aspect_ratios(self) -> List[float]:
        return [w / max(h, 1) for _, (_, _, w, h) in self.items]

    def item_classes(self) -> List[Set[int]]:
        return self._classes

    def summary(self) -> str:
        empty = sum(1 for c in self._classes if not c)
        line = (
            f"tiles: {len(self.ids)} training images -> {len(self.items)} tiles of {self.tile} px, overlap "
            f"{self.overlap} ({empty} without objects, kept as negatives); {self.pieces_dropped} object pieces under "
            f"{self.min_visible:.0%} of their box at a tile edge dropped ({self.objects} objects)"
        )
        if self.larger_than_overlap:
            line += (
                f"; {self.larger_than_overlap} objects are larger than the overlap: some may be cut in every tile "
                f"(raise data.tile_overlap)"
            )
        return line

    def __getitem__(self, idx: int):
        from data import eval_transform

        image_id, window = self.items[idx]
        x0, y0, w, h = window
        image = self.base.load_image(image_id)[:, y0 : y0 + h, x0 : x0 + w]
        target, _ = crop_target(self.base.target_for(image_id), window, self.min_visible)
        return (self.transforms or eval_transform)(image.contiguous(), target)


# -- inference ------------------------------------------------------------------------------------------
def _ios(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over the smaller box, [N, 4] x [M, 4] xyxy."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-12)


def merge_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor, ios: float = MERGE_IOS
) -> List[List[int]]:
    """Groups of detection indices that are one object, the highest score first in each and the groups
    by it: greedily, each detection not yet taken absorbs the untaken detections of its class from
    other sources (tiles, the whole-image pass) whose intersection over the smaller box is >= ``ios``."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    overlap = _ios(boxes, boxes) >= ios
    same = (labels[:, None] == labels[None, :]) & (sources[:, None] != sources[None, :])
    joins = (overlap & same).tolist()
    taken = [False] * len(order)
    groups = []
    for i in order:
        if taken[i]:
            continue
        taken[i] = True
        group = [i]
        for j in order:
            if not taken[j] and joins[i][j]:
                taken[j] = True
                group.append(j)
        groups.append(group)
    return groups


class SlicedDetector(torch.nn.Module):
    """A detector in eval mode that predicts an image from its tiles (and, ``whole_image``, the whole
    image), merged by :func:`merge_detections`; the same outputs as the detector's, in image coordinates.
    ``roi_heads`` is the detector's (evaluation lowers its score threshold through it)."""

    def __init__(self, detector: torch.nn.Module, tile: int, overlap: int, whole_image: bool = True, batch: int = 8):
        super().__init__()
        self.detector, self.tile, self.overlap, self.whole_image, self.batch = (
            detector,
            tile,
            overlap,
            whole_image,
            batch,
        )

    @property
    def roi_heads(self):
        return self.detector.roi_heads

    def forward(self, images: Sequence[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        if self.training:
            raise RuntimeError("SlicedDetector predicts only: train on tiles with data.tile_size (TiledDataset)")
        return [self._predict(image) for image in images]

    def _predict(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        windows = tile_windows(int(h), int(w), self.tile, self.overlap)
        if len(windows) == 1:
            return self.detector([image])[0]
        crops = [image[:, y0 : y0 + th, x0 : x0 + tw] for x0, y0, tw, th in windows]
        if self.whole_image:
            crops.append(image)
            windows = windows + [(0, 0, int(w), int(h))]
        outs: List[Dict[str, torch.Tensor]] = []
        for k in range(0, len(crops), self.batch):
            outs += self.detector(crops[k : k + self.batch])
        return merge_outputs(outs, windows, int(h), int(w), self.detector.roi_heads.detections_per_img)


def merge_outputs(
    outs: List[Dict[str, torch.Tensor]], windows: Sequence[Tuple[int, int, int, int]], h: int, w: int, limit: int
) -> Dict[str, torch.Tensor]:
    """Per-window detector outputs -> one image's: shifted, pasted, merged, the best ``limit`` kept."""
    shifted = [
        o["boxes"] + torch.tensor([x0, y0, x0, y0], dtype=o["boxes"].dtype, device=o["boxes"].device)
        for o, (x0, y0, _, _) in zip(outs, windows)
    ]
    boxes = torch.cat(shifted)
    scores = torch.cat([o["scores"] for o in outs])
    labels = torch.cat([o["labels"] for o in outs])
    sources = torch.cat([torch.full((len(o["scores"]),), k, dtype=torch.int64) for k, o in enumerate(outs)])
    groups = merge_detections(boxes.cpu(), scores.cpu(), labels.cpu(), sources)[:limit]
    lead = torch.tensor([g[0] for g in groups], dtype=torch.int64, device=boxes.device)
    merged = torch.stack([_union(boxes[g]) for g in groups]) if groups else boxes.new_zeros((0, 4))
    result = {"boxes": merged, "scores": scores[lead], "labels": labels[lead]}
    if outs and "masks" in outs[0]:
        result["masks"] = _merged_masks(outs, windows, groups, h, w)
    return result


def _union(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[:, :2].min(dim=0).values, b[:, 2:].max(dim=0).values])


def _merged_masks(outs, windows, groups, h: int, w: int) -> torch.Tensor:
    """Each group's masks pasted into the image at their windows, the pixelwise maximum."""
    where = [(k, i) for k, o in enumerate(outs) for i in range(len(o["scores"]))]  # flat index -> (window, row)
    ref = outs[0]["masks"]
    masks = ref.new_zeros((len(groups), 1, h, w))
    for n, group in enumerate(groups):
        for flat in group:
            k, i = where[flat]
            x0, y0, tw, th = windows[k]
            region = masks[n, :, y0 : y0 + th, x0 : x0 + tw]
            region.copy_(torch.maximum(region, outs[k]["masks"][i]))
    return masks


def sliced(model: torch.nn.Module, tile: Optional[int], overlap: Optional[int], whole_image: bool = True):
    """``model`` for evaluation: wrapped in a SlicedDetector when tiles are set (DDP's module unwrapped)."""
    if not tile:
        return model
    return SlicedDetector(getattr(model, "module", model), tile, int(overlap or 0), whole_image)
