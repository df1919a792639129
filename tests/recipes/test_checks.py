"""Every data check with a broken file: the message names the image / annotation at fault."""

import copy
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import helpers
import train
from checks import DataError, check_samples, load_coco_checked
from data import CocoDetection
from helpers import assert_names, raises_naming
from shapes import ShapesSpec, ensure_shapes

SPEC = ShapesSpec(num_train=6, num_val=3, image_size=64, min_size=12, max_size=30, empty_fraction=0.3, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes(str(tmp_path_factory.mktemp("data")), SPEC)


@pytest.fixture
def coco(shapes):
    with open(shapes["train_ann"]) as f:
        return json.load(f)


def write(tmp_path, data):
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return str(p)


def first_ann(data):
    return data["annotations"][0]


def to_xyxy(data):
    # The classic export bug, on a box that fits the image either way: only the polygon tells.
    a = first_ann(data)
    a["segmentation"] = [[5, 5, 20, 5, 20, 25, 5, 25]]
    a["bbox"] = [5, 5, 20, 25]  # [x1, y1, x2, y2]; as [x, y, w, h] it would reach (25, 30)


def test_shapes_is_deterministic_real_coco(shapes, tmp_path):
    again = ensure_shapes(str(tmp_path), SPEC)
    with open(shapes["train_ann"]) as a, open(again["train_ann"]) as b:
        assert json.load(a) == json.load(b)
    coco, label_map, names, report = load_coco_checked(shapes["train_ann"], shapes["train_images"], "train")
    assert names == ["square", "circle", "triangle", "star"] and label_map == {1: 1, 2: 2, 3: 3, 4: 4}
    assert report.images == 6 and report.negatives >= 1  # empty images are kept as negatives
    ds = CocoDetection(coco, shapes["train_images"], label_map)
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.max() <= 1 and image.shape == (3, 64, 64)
    assert target["masks"].shape[1:] == (64, 64) and set(target["masks"].unique().tolist()) <= {0, 1}
    if len(target["boxes"]):
        b = target["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


# each problem line names the annotation (or image), the value that is wrong and the image size it is checked against
@pytest.mark.parametrize(
    "corrupt,names",
    [
        (lambda d: first_ann(d).update(bbox=[10, 10, 0, 5]), ("annotation 1 (image ", "degenerate", "[10, 10, 0, 5]")),
        (lambda d: first_ann(d).update(bbox=[50, 50, 40, 40]), ("annotation 1 (image ", "[50, 50, 40, 40]", "64x64")),
        (lambda d: first_ann(d).update(bbox=[30, 30, 60, 62]),
         ("annotation 1 ", "[30, 30, 60, 62]", "[x1, y1, x2, y2]")),
        (to_xyxy, ("annotation 1 ", "segmentation", "[x1, y1, x2, y2]")),
        (lambda d: first_ann(d).update(bbox=[1, 2, 3]), ("annotation 1 ", "bbox [1, 2, 3]")),
        (lambda d: first_ann(d).update(category_id=42), ("annotation 1 ", "category_id 42", "'categories'")),
        (lambda d: first_ann(d).update(image_id=999), ("annotation 1 (image 999)", "image_id 999", "'images'")),
        (lambda d: first_ann(d).update(segmentation=[[1, 2, 3, 4]]), ("annotation 1 ", "polygon", ">= 3")),
        (
            lambda d: first_ann(d).update(segmentation={"size": [32, 32], "counts": "abc"}),
            ("annotation 1 ", "RLE size [32, 32]", "[64, 64]"),
        ),
        (lambda d: first_ann(d).update(segmentation=[]), ("annotation 1 ", "segmentation")),
        (lambda d: d["images"][0].update(file_name="missing.png"), ("image 1: ", "not found", "missing.png")),
        (lambda d: d["images"][0].update(width=100), ("image 1: ", "64x64", "100x64")),
    ],
)  # fmt: skip
def test_each_check_stops_with_a_named_problem(coco, shapes, tmp_path, corrupt, names):
    data = copy.deepcopy(coco)
    corrupt(data)
    with pytest.raises(DataError) as info:
        load_coco_checked(write(tmp_path, data), shapes["train_images"], "train", policy="stop")
    problem = [line for line in str(info.value).splitlines() if line.strip().startswith(names[0])]
    assert len(problem) == 1, str(info.value)  # the one problem, on its own line
    assert_names(problem[0], *names[1:])
    assert "--bad-annotations drop" in str(info.value)


def test_drop_policy_drops_and_counts(coco, shapes, tmp_path):
    data = copy.deepcopy(coco)
    data["annotations"][0]["bbox"] = [10, 10, 0, 5]
    data["annotations"][1]["category_id"] = 42
    data["images"][-1]["file_name"] = "gone.png"
    n_last = sum(1 for a in data["annotations"] if a["image_id"] == data["images"][-1]["id"])
    cc, _, _, report = load_coco_checked(write(tmp_path, data), shapes["train_images"], "train", policy="drop")
    assert report.dropped == {"degenerate": 1, "unknown_category": 1} and report.dropped_images == 1
    assert len(cc.dataset["annotations"]) == len(coco["annotations"]) - 2 - n_last
    assert "dropped 2 annotations" in report.summary()


def test_whole_file_problems(shapes, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with raises_naming(DataError, "train: ", str(bad), "JSON"):
        load_coco_checked(str(bad), shapes["train_images"], "train")
    with raises_naming(DataError, "train: ", str(tmp_path / "none.json"), "not found"):
        load_coco_checked(str(tmp_path / "none.json"), shapes["train_images"], "train")
    nocats = tmp_path / "nocats.json"
    nocats.write_text(json.dumps({"images": [], "annotations": []}))
    with raises_naming(DataError, str(nocats), "'categories'", one_line=False):
        load_coco_checked(str(nocats), shapes["train_images"], "train")


def test_category_zero_with_coco_ids_is_background(coco, shapes, tmp_path):
    data = copy.deepcopy(coco)
    data["categories"].append({"id": 0, "name": "thing"})
    with raises_naming(DataError, "category id 0 ('thing')", "label 0", "background"):
        load_coco_checked(write(tmp_path, data), shapes["train_images"], "train", label_mode="category_id")
    # Contiguous labels map id 0 to label 1: fine.
    _, label_map, _, _ = load_coco_checked(write(tmp_path, data), shapes["train_images"], "train")
    assert label_map[0] == 1


class _Broken(torch.utils.data.Dataset):
    def __init__(self, base, mode):
        self.base, self.mode = base, mode

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, t = self.base[i]
        t = dict(t)
        if self.mode == "mask255" and len(t["masks"]):
            t["masks"] = t["masks"] * 255
        if self.mode == "image255":
            image = image * 255
        if self.mode == "label0" and len(t["labels"]):
            t["labels"] = torch.zeros_like(t["labels"])
        return image, t


@pytest.mark.parametrize(
    "mode,names",
    [
        ("mask255", ("masks", "[0, 255]", "0/1")),
        ("image255", ("image values", "0-255", "[0, 1]")),
        ("label0", ("labels [0", "1..4")),
    ],
)
def test_sample_checks(shapes, mode, names):
    coco, label_map, _, _ = load_coco_checked(shapes["train_ann"], shapes["train_images"], "train")
    problems = check_samples(_Broken(CocoDetection(coco, shapes["train_images"], label_map), mode), num_classes=5)
    assert problems and all(p.startswith("image ") for p in problems), problems  # each names its image id
    assert_names(problems[0], *names)
    assert check_samples(CocoDetection(coco, shapes["train_images"], label_map), num_classes=5) == []


@pytest.mark.slow
def test_coco_json_dataset_with_rle_and_crowd(coco, shapes, tmp_path):
    # What annotation tools export: RLE masks, crowd regions, an unannotated image, other category ids.
    data = copy.deepcopy(coco)
    for a in data["annotations"][::2]:
        img = next(i for i in data["images"] if i["id"] == a["image_id"])
        m = np.asfortranarray(
            mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], img["height"], img["width"])))
        )
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode()
        a["segmentation"] = rle
    crowd = copy.deepcopy(data["annotations"][0])
    crowd.update(id=9999, iscrowd=1)
    data["annotations"].append(crowd)
    for c in data["categories"]:
        c["id"] += 10
    for a in data["annotations"]:
        a["category_id"] += 10
    ann = write(tmp_path, data)
    out = tmp_path / "out"
    rc = train.main(helpers.coco_json_argv(ann, shapes["train_images"], out))
    assert rc == 0
    with open(out / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    data_rec = [r for r in recs if r["type"] == "data"][0]
    assert data_rec["crowd"] == 1
    assert any(r["type"] == "eval" and "segm_AP" in r for r in recs)


def _consistent(t, tol=3.0):
    # Masks are resized nearest-neighbour, boxes exactly: they agree to about the scale factor.
    assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"]) == len(t["area"]) == len(t["iscrowd"])
    assert set(t["masks"].unique().tolist()) <= {0, 1}
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = torch.where(m > 0)
        assert (
            xs.min() >= box[0] - tol
            and xs.max() <= box[2] + tol
            and ys.min() >= box[1] - tol
            and ys.max() <= box[3] + tol
        )


def _raw_samples(shapes, n=4):
    from data import DetectionPresetTrain

    coco, label_map, _, _ = load_coco_checked(shapes["train_ann"], shapes["train_images"], "train")
    ds = CocoDetection(coco, shapes["train_images"], label_map, transforms=lambda i, t: (i, t))  # uint8, untouched
    return [ds[i] for i in range(len(ds)) if len(ds[i][1]["boxes"])][:n], DetectionPresetTrain


def test_presets_follow_torchvision_policies(shapes):
    from data import MULTISCALE_SIZES

    samples, Preset = _raw_samples(shapes)
    image, target = samples[0]
    torch.manual_seed(0)
    out, t = Preset("lsj", lsj_size=80)(image, target)
    assert out.dtype == torch.float32 and out.shape[-2:] == (80, 80) and t["masks"].shape[-2:] == (80, 80)
    _consistent(t, tol=6)
    torch.manual_seed(0)
    out, t = Preset("multiscale")(image, target)
    assert min(out.shape[-2:]) in MULTISCALE_SIZES
    _consistent(t, tol=2 + out.shape[-1] / 64)
    for policy in ("ssd", "ssdlite"):
        torch.manual_seed(1)
        out, t = Preset(policy)(image, target)
        _consistent(t)
    flip = Preset("hflip")
    flip.steps[1].p = 1.0
    out, t = flip(image, target)
    torch.testing.assert_close(t["boxes"][:, 0], 64 - target["boxes"][:, 2])
    assert torch.equal(t["masks"], target["masks"].flip(-1))
    assert torch.equal(out, image.flip(-1).float().div(255))  # x / 255, exactly


def test_copy_paste_pastes_a_subset_blended_and_resized(shapes):
    from data import copy_paste_collate

    samples, Preset = _raw_samples(shapes)
    lsj = Preset("lsj", lsj_size=96)
    torch.manual_seed(0)
    batch = [lsj(*s) for s in samples]
    changed = 0
    for _ in range(5):
        images, targets = copy_paste_collate(batch)
        for (img0, t0), img, t, (_, src) in zip(batch, images, targets, batch[-1:] + batch[:-1]):
            _consistent(t)
            changed += int(not torch.equal(img0, img))
            assert set(t["labels"].tolist()) <= set(t0["labels"].tolist()) | set(src["labels"].tolist())
    assert changed >= 15  # every image of every draw got pasted onto (20 pairs)
    # Different sizes: the source is resized to the target image.
    a, b = lsj(*samples[0]), Preset("none")(*samples[1])
    images, targets = copy_paste_collate([a, b])
    assert images[1].shape == b[0].shape
    _consistent(targets[1])
