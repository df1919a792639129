"""Small objects: the input-scale rule (fires below, silent above, the suggested size by hand), tiles
(boxes and masks clipped exactly, detections merged back once), the advice as one config that
``--write-config`` writes and ``train.py --config`` reads back, and no bare class_weight list where
weights alone would hurt."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from tv_lossfix import class_weights_from_counts

import analyze_data as A
import anchor_coverage as AC
import data_report as R
import diagnostics as D
import models
import scale as S
import tiles as T
import train
import train_config
from helpers import REFS, assert_names, raises_naming

REQUIRED_12 = math.sqrt(0.7) * 12  # 10.04: the side that reaches IoU 0.7 centred on a 12 px anchor


# -- the scale rule --------------------------------------------------------------------------------------
def test_scale_rule_is_silent_when_objects_reach_the_smallest_anchor():
    f = S.scale_rule(np.full(50, 11.0), np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4))
    assert not f.fires and f.required == pytest.approx(REQUIRED_12) and f.config() == {}
    # p50 just above, p10 at half the required side: still silent (the rule is p50 < r or p10 < r / 2).
    sides = np.concatenate([np.full(10, 5.03), np.full(90, 10.1)])
    assert not S.scale_rule(sides, np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4)).fires


def test_scale_rule_fires_below_and_gives_the_size_computed_by_hand():
    # Every object 5 px after the resize of 160 px images to 128: the objects need 10.04 / 5 = 2.008x,
    # so min_size = max_size = ceil(128 * 2.008 / 32) * 32 = ceil(8.03) * 32 = 288.
    f = S.scale_rule(np.full(100, 5.0), np.array([[160, 160]] * 3), S.Yardsticks(128, 128, 12, 4))
    assert f.fires and f.factor == pytest.approx(REQUIRED_12 / 5)
    assert (f.new_min_size, f.new_max_size, f.tile_size) == (288, 288, None)
    assert f.pixel_ratio == pytest.approx((288 / 128) ** 2)  # 128^2 -> 288^2 input pixels per image
    assert f.config({"box_score_thresh": 0.1}) == {
        "model": {"kwargs": {"box_score_thresh": 0.1, "min_size": 288, "max_size": 288}}
    }
    assert "min_size 288, max_size 288" in f.text() and "pixels x5.1" in f.text()
    # The 10th percentile alone: 12% of the objects at 2 px (under half of 10.04) -> 5.02 / 2 = 2.51x.
    sides = np.concatenate([np.full(12, 2.0), np.full(88, 20.0)])
    f = S.scale_rule(sides, np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4))
    assert f.fires and f.factor == pytest.approx(0.5 * REQUIRED_12 / 2.0) and f.new_min_size == 352  # 321.3 -> 352


def test_scale_rule_takes_the_stride_when_it_binds():
    # Anchor 4 px (0.84 x 4 = 3.3) but a finest stride of 16: an object needs 2 x 16 = 32 px.
    f = S.scale_rule(np.full(20, 20.0), np.array([[400, 600]]), S.Yardsticks(400, 600, 4, 16))
    assert f.required == 32 and f.fires and f.factor == pytest.approx(1.6)
    assert (f.new_min_size, f.new_max_size) == (640, 960)  # 400 x 1.6, 600 x 1.6, both multiples of 32


def test_scale_rule_gives_tiles_past_the_cap():
    # 2000 x 2000 images at min_size 800 / max_size 1333: scale 0.4, a 10 px object is 4 px. They need
    # 10.04 / 4 = 2.51x: 2016 px a side, past 1333, so tiles of floor(800 / (2.51 * 0.4)) = 796 px
    # with the default overlap ceil(0.2 * 796) = 160 (larger than the 10 px objects).
    f = S.scale_rule(
        np.full(30, 4.0), np.array([[2000, 2000]]), S.Yardsticks(800, 1333, 12, 4), native_extent=np.full(30, 10.0)
    )
    assert f.fires and f.new_min_size is None
    assert f.tile_size == math.floor(800 / (REQUIRED_12 / 4 * 0.4)) == 796 and f.tile_overlap == 160
    assert f.config() == {"data": {"tile_size": 796, "tile_overlap": 160}}


def test_scale_finding_reads_the_models_resize_anchors_and_strides():
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=3, stock=True)  # 128 px, anchors from 12
    assert S.model_yardsticks(model, AC.AnchorGeometry(model), 0.7) == S.Yardsticks(128, 128, 12.0, 4.0, 32, 0.7)
    data = _coco([(8.0, 8.0)] * 20, hw=(160, 160))  # 8 px at 160 -> 6.4 px at 128
    f = R.scale_finding(model, data)
    assert f.p50 == pytest.approx(6.4) and f.fires and (f.new_min_size, f.new_max_size) == (224, 224)


# -- the advice as one config --------------------------------------------------------------------------
def _coco(boxes, hw=(160, 160), n_images=1, cats=None):
    images = [{"id": i + 1, "width": hw[1], "height": hw[0], "file_name": f"{i}.png"} for i in range(n_images)]
    anns = []
    for i, (w, h) in enumerate(boxes):
        anns.append(
            {
                "id": i + 1,
                "image_id": 1 + i % n_images,
                "category_id": (cats[i] if cats else 1),
                "bbox": [10.0 + (i % 7) * 20, 10.0 + (i % 5) * 25, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )
    categories = [{"id": c, "name": f"c{c}"} for c in sorted(set(cats or [1]))]
    return {"images": images, "annotations": anns, "categories": categories}


def _issue_like_set():
    """The issue's set in small: 4-10 px objects in 160 px images, 255 : 29 : 39, a quarter empty."""
    rng = np.random.default_rng(0)
    counts = {1: 255, 2: 29, 3: 39}
    cats = [c for c, n in counts.items() for _ in range(n)]
    sides = rng.uniform(4, 10, size=len(cats))
    data = _coco([(s, s) for s in sides], n_images=120, cats=cats)
    data["images"] += [{"id": 1000 + i, "width": 160, "height": 160, "file_name": f"e{i}.png"} for i in range(40)]
    return data


def test_where_class_weights_alone_would_hurt_the_advice_prints_no_list():
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True)
    report = R.data_report(None, model, dataset=_issue_like_set())
    text = report.text()
    assert report.scale["fires"] and "class_weight" not in yaml.safe_dump(report.config)
    assert "class_weight:" not in text
    assert_names(next(x for x in text.splitlines() if "no class_weight list" in x), "too small")
    assert report.config["model"]["kwargs"] == {"min_size": 224, "max_size": 224}
    # The bare list the old advice printed cut the common class to 0.203; tempered, no class falls under 1/2.
    bare = class_weights_from_counts([255, 29, 39])
    cure = D.rare_class_cure([255, 29, 39], None)
    assert round(bare[1], 3) == 0.203 and min(cure["class_weight"][1:]) == pytest.approx(0.5)
    fg = np.asarray(bare[1:]) ** cure["tempered_power"]
    np.testing.assert_allclose(cure["class_weight"][1:], fg / fg.mean())  # w ** tau over its mean, order kept
    assert D.rare_class_cure([255, 29, 39], None, scale_fires=True)["class_weight"] is None


def test_tempering_leaves_a_mild_list_alone():
    w = class_weights_from_counts([30, 20, 15])  # every weight within 2x: nothing to temper
    tempered, tau = D.tempered_class_weights(w)
    assert tau == 1.0 and tempered == pytest.approx(w)


def test_the_printed_block_is_the_config_write_config_writes(tmp_path, capsys):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(_issue_like_set()))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "maskrcnn_tiny", "kwargs": {"box_score_thresh": 0.01}},
                "data": {
                    "dataset": "coco_json",
                    "train_ann": str(ann),
                    "train_images": str(tmp_path),
                    "val_ann": str(ann),
                    "val_images": str(tmp_path),
                },
                "training": {"device": "cpu", "lr": 0.005, "batch_size": 4},
            }
        )
    )
    out = tmp_path / "advised.yaml"
    assert A.main(["--config", str(cfg), "--write-config", str(out)]) == 0
    printed = capsys.readouterr().out
    block = printed[printed.index("  advice, as one config") :].splitlines()[1:]
    block = [line[4:] for line in block if line.startswith("    ")]
    advice = yaml.safe_load("\n".join(block))
    assert advice == {"model": {"kwargs": {"box_score_thresh": 0.01, "min_size": 224, "max_size": 224}}}
    written = yaml.safe_load(out.read_text())
    assert written["model"]["kwargs"] == advice["model"]["kwargs"] and written["training"]["lr"] == 0.005
    # train.py reads it back to the same config: --print-config prints the file (its header aside).
    assert train.main(["--config", str(out), "--print-config"]) == 0
    again = capsys.readouterr().out
    assert again == out.read_text().split("\n", 1)[1]
    # ... and the model it builds has the advised input size (the train annotations are all it needs here).
    resolved, _, _ = train_config.resolve(["--config", str(out)], reads=("train_ann",))
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, kwargs=resolved.model.kwargs)
    assert model.transform.min_size == (224,) and model.transform.max_size == 224


# -- the keys --------------------------------------------------------------------------------------------
def _resolve(text, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return train_config.resolve(["--config", str(p), "--print-config"])[0]


@pytest.mark.parametrize(
    "text, names",
    [
        ("data: {tile_size: 96, tile_overlap: 96}\n", ["data.tile_overlap (96)", "data.tile_size (96)"]),
        ("data: {tile_overlap: 10}\n", ["data.tile_overlap", "--tile-overlap", "no effect", "data.tile_size"]),
        ("data: {tile_whole_image: false}\n", ["data.tile_whole_image false", "no effect", "data.tile_size"]),
        ("data: {tile_size: 16}\n", ["data.tile_size", "--tile-size", ">= 32"]),
        ("data: {tile_size: 96, tile_overlap: -1}\n", ["data.tile_overlap", "--tile-overlap", ">= 0"]),
        ("model: {name: keypointrcnn_resnet50_fpn}\ndata: {dataset: coco_kp, tile_size: 96}\n",
         ["data.tile_size", "keypoints"]),
    ],
)  # fmt: skip
def test_bad_tile_and_size_values_are_one_line_naming_the_key(tmp_path, text, names):
    with raises_naming(train_config.ConfigError, *names):
        _resolve(text, tmp_path)


def test_tile_overlap_defaults_to_a_fifth_of_the_tile(tmp_path):
    assert _resolve("data: {tile_size: 96}\n", tmp_path).data.tile_overlap == 19  # round(0.2 * 96)


# -- tiles: clipping and merging ----------------------------------------------------------------------------
def test_tile_windows_cover_the_image_with_the_last_flush_at_the_edge():
    assert T.tile_starts(160, 96, 32) == [0, 64]
    assert T.tile_starts(300, 100, 20) == [0, 80, 160, 200]
    assert T.tile_starts(90, 96, 32) == [0]
    assert T.tile_windows(90, 160, 96, 32) == [(0, 0, 96, 90), (64, 0, 96, 90)]


def test_crop_target_clips_boxes_and_masks_exactly_and_drops_slivers():
    h = w = 160
    boxes = torch.tensor([[50.0, 10.0, 80.0, 30.0], [90.0, 40.0, 100.0, 50.0], [10.0, 100.0, 30.0, 120.0]])
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2, 3]),
        "masks": masks,
        "area": torch.tensor([600.0, 100.0, 400.0]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
    }
    window = (64, 0, 96, 96)  # x 64..160, y 0..96
    out, dropped = T.crop_target(target, window)
    # Box 0 keeps 16 of 30 px in x (53% >= 50%), box 1 is whole, box 2 is outside (not a piece).
    assert out["boxes"].tolist() == [[0.0, 10.0, 16.0, 30.0], [26.0, 40.0, 36.0, 50.0]]
    assert out["labels"].tolist() == [1, 2] and dropped == 0
    assert torch.equal(out["masks"], masks[:2, 0:96, 64:160])
    assert out["area"].tolist() == pytest.approx([600.0 * 16 / 30, 100.0])
    # Cut at x 70 instead: box 0 keeps 10 / 30 < 50%: dropped, and counted.
    out, dropped = T.crop_target(target, (70, 0, 90, 96))
    assert out["labels"].tolist() == [2] and dropped == 1


class _BrightSpots(torch.nn.Module):
    """A stand-in detector: one detection (label 1, score 0.9, its mask) per crop, the box of its bright pixels."""

    def __init__(self):
        super().__init__()
        self.roi_heads = SimpleNamespace(detections_per_img=100, score_thresh=0.05)
        self.calls = []

    def forward(self, crops):
        self.calls.append([tuple(c.shape[-2:]) for c in crops])
        outs = []
        for c in crops:
            on = c[0] > 0.5
            ys, xs = torch.nonzero(on, as_tuple=True)
            if len(xs) == 0:
                outs.append(
                    {
                        "boxes": torch.zeros(0, 4),
                        "scores": torch.zeros(0),
                        "labels": torch.zeros(0, dtype=torch.int64),
                        "masks": torch.zeros(0, 1, *c.shape[-2:]),
                    }
                )
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            score = torch.tensor([0.9 if box[0, 2] - box[0, 0] > 12 else 0.95])  # the cut piece scores higher
            outs.append({"boxes": box, "scores": score, "labels": torch.tensor([1]), "masks": on[None, None].float()})
        return outs


@pytest.mark.parametrize("whole_image", [True, False])
def test_a_detection_on_a_tile_border_is_found_once_in_image_coordinates(whole_image):
    image = torch.zeros(3, 160, 160)
    image[:, 20:36, 56:72] = 1.0  # x 56..72 crosses the second tile's left edge (64)
    det = _BrightSpots()
    net = T.SlicedDetector(det, 96, 32, whole_image=whole_image).eval()
    out = net([image])[0]
    assert det.calls == [[(96, 96), (96, 96), (96, 96), (96, 96)] + ([(160, 160)] if whole_image else [])]
    assert out["boxes"].tolist() == [[56.0, 20.0, 72.0, 36.0]]  # one detection: the whole object
    assert out["scores"].tolist() == pytest.approx([0.95]) and out["labels"].tolist() == [1]
    expected = torch.zeros(160, 160)
    expected[20:36, 56:72] = 1
    assert torch.equal(out["masks"][0, 0], expected)


def test_merge_keeps_two_objects_of_one_tile_and_other_classes_apart():
    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 2, 8, 8], [0, 0, 10, 10], [20, 20, 30, 30], [1, 1, 9, 9]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 1, 2, 1, 1])
    sources = torch.tensor([0, 0, 1, 1, 1])
    # 0 absorbs 4 (other tile, same class, inside it); 1 is in 0's own tile (the model's NMS kept both);
    # 2 is another class; 3 lies elsewhere.
    assert T.merge_detections(boxes, scores, labels, sources) == [[0, 4], [1], [2], [3]]


def test_tiled_dataset_items_are_the_crops_with_their_targets(tmp_path):
    from pycocotools.coco import COCO

    sys.path.insert(0, os.path.join(REFS, "benchmarks"))
    import tiny_objects

    from data import CocoDetection

    path = tiny_objects.write_split(str(tmp_path), "train", 3, 160, np.random.default_rng(0))
    coco = COCO(path)
    base = CocoDetection(coco, str(tmp_path / "train"), {1: 1, 2: 2, 3: 3})
    tiled = T.TiledDataset(base, 96, 32)
    assert len(tiled) == 3 * 4 and tiled.aspect_ratios() == [1.0] * 12
    image, target = tiled[5]  # image 2, the second tile (x 64, y 0)
    full, full_target = base[1]
    assert torch.equal(image, full[:, 0:96, 64:160])
    expected, _ = T.crop_target(full_target, (64, 0, 96, 96))
    assert torch.equal(target["boxes"], expected["boxes"]) and torch.equal(target["masks"], expected["masks"])
    assert "12 tiles of 96 px, overlap 32" in tiled.summary()
    with raises_naming(Exception, "data.tile_size 3", "annotation 1 (image 1, "):
        T.TiledDataset(base, 3, 1)


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiled_training_sliced_evaluation_and_predict(tmp_path):
    sys.path.insert(0, os.path.join(REFS, "benchmarks"))
    import tiny_objects

    root = tmp_path / "data"
    for split, n, seed in (("train", 8, 0), ("val", 4, 1)):
        tiny_objects.write_split(str(root), split, n, 160, np.random.default_rng(seed))
    out = tmp_path / "run"
    argv = [
        "--dataset", "coco_json", "--model", "maskrcnn_tiny", "--device", "cpu",
        "--train-ann", str(root / "train.json"), "--train-images", str(root / "train"),
        "--val-ann", str(root / "val.json"), "--val-images", str(root / "val"),
        "--tile-size", "96", "--tile-overlap", "40", "-b", "2", "--epochs", "1", "--iters-per-epoch", "3",
        "--workers", "0", "--output-dir", str(out), "--no-plots", "--lr", "0.005",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.join(REFS, "train.py"), *argv], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiles: 8 training images -> 72 tiles of 96 px, overlap 40" in proc.stdout  # 3 x 3 tiles (0, 56, 64)
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"type": "eval"' in line]
    assert evals and evals[-1]["images"] == 4  # COCO evaluation on the 4 whole images
    dets = tmp_path / "dets.json"
    image = root / "val" / "00000.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(REFS, "predict.py"), "--weights", str(out / "checkpoint.pth"), str(image),
         "--out", str(dets), "--score-thresh", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiles of 96 px, overlap 40 + the whole image" in proc.stdout
    result = json.loads(dets.read_text())
    assert result[0]["image"] == str(image) and (result[0]["height"], result[0]["width"]) == (160, 160)
    for d in result[0]["detections"]:
        x, y, w, h = d["bbox"]
        assert (
            0 <= x and 0 <= y and x + w <= 160.01 and y + h <= 160.01 and d["category"] in ("ellipse", "cross", "ring")
        )
    bad = subprocess.run(
        [sys.executable, os.path.join(REFS, "predict.py"), "--weights", str(out / "checkpoint.pth"), str(image),
         "--tile-size", "96", "--tile-overlap", "96"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("error: predict.py: ")
    assert_names(bad.stderr, "data.tile_overlap (96)", "data.tile_size (96)", one_line=True)


def test_the_collapse_diagnostics_name_the_scale_first_with_its_cure():
    finding = S.scale_rule(np.full(100, 5.0), np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4))
    current = {"dets_per_image": 0.0, "max_score": 0.02, "score_thresh": 0.05, "per_class": {}}
    cfg = train_config.defaults()
    lines = D.collapse_warnings([], current, {}, cfg, 2.0, scale=finding)
    assert lines[0].startswith("detections collapsed")
    assert lines[1].startswith("  likely cause: ")  # the scale first, with the keys to paste
    assert_names(lines[1], "too small", "model.kwargs: {'min_size': 288, 'max_size': 288}")
    silent = S.scale_rule(np.full(100, 20.0), np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4))
    assert not any("too small" in line for line in D.collapse_warnings([], current, {}, cfg, 2.0, scale=silent))


def test_past_the_cap_the_report_advises_tiles_and_is_silent_with_them():
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=2, stock=True)  # 128 px
    data = _coco([(12.0, 12.0)] * 40, hw=(2000, 2000), n_images=4)
    for k, a in enumerate(data["annotations"]):  # spread over the image, not only its corner
        a["bbox"][:2] = [100.0 + 45 * k, 200.0 + 40 * k]
    report = R.data_report(None, model, dataset=data)
    s = report.scale
    # 12 px at 2000 -> 128 is 0.77 px: x13.1 would be 1677 px a side, past 1333: tiles of
    # floor(128 / (10.04 / 0.768 * 0.064)) = 152 px, overlap ceil(0.2 * 152) = 31.
    assert s["fires"] and s["new_min_size"] is None and (s["tile_size"], s["tile_overlap"]) == (152, 31)
    assert report.config["data"] == {"tile_size": 152, "tile_overlap": 31}  # anchors searched on the tiles too
    cfg = train_config.defaults().replace({"data.tile_size": 152, "data.tile_overlap": 31})
    tiled = R.data_report(None, model, dataset=data, cfg=cfg)
    assert not tiled.scale["fires"] and tiled.scale["p50"] == pytest.approx(12 * 128 / 152, rel=1e-6)


def test_a_rare_class_too_small_fires_where_the_pooled_quantiles_do_not():
    sides = np.concatenate([np.full(85, 20.0), np.full(15, 6.0)])
    classes = np.array([1] * 85 + [2] * 15)
    hw = np.array([[160, 160]])
    assert not S.scale_rule(sides, hw, S.Yardsticks(128, 128, 12, 4)).fires  # pooled: p10 6.0 >= 5.02, p50 20
    f = S.scale_rule(sides, hw, S.Yardsticks(128, 128, 12, 4), classes=classes)
    # Class 2's median 6 px: x10.04 / 6 = 1.673, 128 x 1.673 = 214.2 -> 224.
    assert f.fires and f.p50 == 6.0 and f.new_min_size == 224
    # Under MIN_CLASS_BOXES boxes a class is not judged on its own.
    few = S.scale_rule(sides[:94], hw, S.Yardsticks(128, 128, 12, 4), classes=classes[:94])
    assert not few.fires


@pytest.mark.parametrize("augmentation", ["lsj", "multiscale"])
def test_a_policy_that_sets_the_input_size_withholds_the_scale_cure(augmentation):
    # The model does not resize while training under lsj / multiscale: a min_size would reach evaluation only.
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=4, stock=True)
    data = _issue_like_set()
    cfg = train_config.defaults().replace({"data.augmentation": augmentation})
    report = R.data_report(None, model, dataset=data, cfg=cfg)
    assert report.scale["fires"] and f"data.augmentation {augmentation}" in report.scale["withheld"]
    assert "kwargs" not in report.config.get("model", {}) and "tile_size" not in report.config.get("data", {})
    assert report.scale["new_min_size"] == 224  # measured all the same, at the evaluation resize
    f = R.scale_finding(model, data, augmentation=augmentation)
    assert f.withheld and f.config() == {} and "In the YAML" not in S.scale_cause(f)
    assert not R.scale_finding(model, data, augmentation="hflip").withheld  # the model resizes: the cure stands
    assert R.data_report(None, model, dataset=data, cfg=train_config.defaults()).config["model"]["kwargs"]


def test_the_collapse_warnings_cure_gives_no_class_weight_list_while_the_scale_fires():
    import run_data

    data = _issue_like_set()

    def fresh():
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = data
        coco.createIndex()
        return SimpleNamespace(
            rare_cure=None,
            train_counts=None,
            train_set=SimpleNamespace(coco=coco, ids=[im["id"] for im in data["images"]]),
            label_to_cat={1: 1, 2: 2, 3: 3},
            num_classes=4,
            names=["c1", "c2", "c3"],
        )

    run = SimpleNamespace(cfg=train_config.defaults())
    assert run_data.rare_cure(run, fresh())["class_weight"] is not None  # the list, tempered, without the scale
    cure = run_data.rare_cure(run, fresh(), scale_fires=True)
    assert cure["class_weight"] is None and "class_weight" not in cure["text"] and cure["withheld"]


def test_tiles_train_py_would_refuse_are_not_advised():
    hw = np.array([[2000, 2000]])
    # A 900 px object: the overlap must hold it, but the 796 px tile cannot (train.py refuses such a set).
    extent = np.concatenate([np.full(29, 10.0), [900.0]])
    f = S.scale_rule(np.full(30, 4.0), hw, S.Yardsticks(800, 1333, 12, 4), native_extent=extent)
    assert f.fires and f.tile_size == 796 and f.withheld and "900" in f.withheld and f.config() == {}
    with pytest.raises(train_config.ConfigError, match="data.tile_overlap"):
        train_config.check_tile_keys(f.tile_size, f.tile_overlap, True, "advice")  # what the cure would have hit
    # x100 would need tiles of floor(800 / (100.4 * 0.4)) = 19 px, under MIN_TILE.
    f = S.scale_rule(np.full(30, 0.1), hw, S.Yardsticks(800, 1333, 12, 4), native_extent=np.full(30, 1.0))
    assert f.tile_size == 19 and f.withheld and str(T.MIN_TILE) in f.withheld and f.config() == {}


def test_a_min_size_list_is_magnified_entry_by_entry_not_dropped():
    # torchvision draws a training size from the list and evaluates at the last (128): 5 px objects need
    # x2.008, so [96, 112, 128] -> [ceil(192.8 / 32), ceil(224.9 / 32), ceil(257.0 / 32)] x 32.
    f = S.scale_rule(np.full(100, 5.0), np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4))
    cure = f.config({"min_size": [96, 112, 128]})["model"]["kwargs"]
    assert cure == {"min_size": [224, 256, 288], "max_size": 288} and cure["min_size"][-1] == f.new_min_size
    assert f.config({"min_size": [128]})["model"]["kwargs"]["min_size"] == 288


def test_tile_view_moves_boxes_only_on_an_axis_longer_than_the_tile():
    data = {
        "images": [{"id": 1, "height": 96, "width": 200}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [150.0, 80.0, 10.0, 10.0]}],
        "categories": [{"id": 1}],
    }
    view = S.tile_view(data, 96, 19)  # step 77: x 150 -> 150 % 77 = 73; y stays (the image is one tile high)
    assert view["images"][0]["height"] == 96 and view["images"][0]["width"] == 96
    assert view["annotations"][0]["bbox"] == [73.0, 80.0, 10.0, 10.0]


class _FaintSpot(torch.nn.Module):
    """A stand-in detector whose one box (score 0.03) passes only its own roi_heads.score_thresh, as torchvision's."""

    def __init__(self):
        super().__init__()
        self.roi_heads = SimpleNamespace(detections_per_img=100, score_thresh=0.05)

    def forward(self, images):
        keep = 0.03 >= self.roi_heads.score_thresh
        n = int(keep)
        return [
            {
                "boxes": torch.tensor([[2.0, 3.0, 12.0, 13.0]])[:n],
                "scores": torch.tensor([0.03])[:n],
                "labels": torch.tensor([1])[:n],
            }
            for _ in images
        ]


def test_predict_score_thresh_below_the_models_reaches_the_model(tmp_path):
    from PIL import Image

    import predict

    path = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((32, 40, 3), dtype=np.uint8)).save(path)
    model = _FaintSpot()
    assert predict.predict(model, [path], ["c1"], None, "cpu")[0]["detections"] == []
    rows = predict.predict(model, [path], ["c1"], 0.01, "cpu")[0]["detections"]
    assert [(r["bbox"], r["category"]) for r in rows] == [([2.0, 3.0, 10.0, 10.0], "c1")]
    with pytest.raises(train_config.ConfigError, match="--score-thresh"):
        predict.predict(model, [path], ["c1"], 1.5, "cpu")


def test_a_withheld_class_weight_list_is_said_not_called_balance():
    # 255 : 29 : 39 with the scale rule firing and no repeat threshold: the list is held back, not "balanced".
    cure = D.rare_class_cure([255, 29, 39], None, scale_fires=True)
    current = {"dets_per_image": 1.0, "score_thresh": 0.05, "per_class": {"c2": {"gt": 5, "dets_per_image": 0.0}}}
    lines = D._class_warnings([], current, cure)
    assert_names(lines[-1], "cure", "no class_weight list")
    assert "balanced" not in lines[-1]
    with_repeat = D._cure_line(D.rare_class_cure([255, 29, 39], 0.3, scale_fires=True))
    assert "data.repeat_factor_threshold" in with_repeat and "no class_weight list" in with_repeat


def test_zero_size_boxes_are_not_judged():
    sides = np.concatenate([np.zeros(20), np.full(80, 20.0)])  # a fifth degenerate: p10 would be 0
    f = S.scale_rule(
        sides, np.array([[160, 160]]), S.Yardsticks(128, 128, 12, 4), classes=np.array([1] * 20 + [2] * 80)
    )
    assert not f.fires and f.p10 == 20.0
