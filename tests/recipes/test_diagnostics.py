import math

import numpy as np
import pytest
import yaml

import diagnostics as D
import train
from helpers import assert_names, records, tiny_config
from train_config import defaults


def _eval(dets, max_score, thresh=0.05, per_class=None):
    return {"dets_per_image": dets, "max_score": max_score, "score_thresh": thresh, "per_class": per_class or {}}


def _cfg(clip=False, max_norm=35.0, cls_pos_weight=1.0, class_weight=None, lr=0.02, batch=2):
    return defaults().replace(
        {
            "training.gradient_clip.enabled": clip,
            "training.gradient_clip.max_norm": max_norm,
            "training.lr": lr,
            "training.batch_size": batch,
            "model.roi_head": {"cls_pos_weight": cls_pos_weight, "class_weight": class_weight},
        }
    )


SICK = {
    "loss": 5.0,
    "roi/pos_per_image": 1.5,
    "roi/fg_prob": 0.12,
    "rpn/pos_per_image": 0.8,
    "grad_norm": 2.0,
    "grad_norm_max": 400.0,
    "skipped_steps": 3,
    "world_size": 1,
}


def test_score_summary():
    s = D.score_summary([0.9, 0.01], [3, 0], [0.9, 0.5, 0.2, 0.01], 0.05)
    assert s["dets_per_image"] == 1.5 and s["images_without_dets"] == 0.5 and s["max_score"] == 0.9
    assert sum(s["score_hist"]) == 4


def test_nothing_is_judged_before_the_model_has_trained():
    history = [{**_eval(4.0, 0.9), "train_loss": 1.0}]
    assert D.collapse_warnings(history, _eval(0.0, 0.03), SICK, _cfg(), 2.5, iteration=6, judge_after=200) == []
    assert D.collapse_warnings(history, _eval(0.0, 0.03), SICK, _cfg(), 2.5, iteration=200, judge_after=200)


def test_collapse_names_at_most_three_causes_with_numbers():
    history = [{**_eval(4.0, 0.9), "train_loss": 1.0}]
    w = D.collapse_warnings(history, _eval(0.0, 0.031), SICK, _cfg(lr=0.08, batch=1), gt_per_image=2.5)
    assert w[0].startswith("detections collapsed: ") and "0 detections" in w[0]
    causes = [line for line in w if line.startswith("  likely cause")]
    assert len(causes) == 3
    text = "\n".join(w)
    # The strongest first: divergence (the loss rose 5x), an lr 32x the rule, skipped steps.
    for expected in ("rose from 1.000 to 5.000", "lr 0.08 is 64.0x", "use --lr 0.00125", "3 steps were skipped"):
        assert expected in text, expected


@pytest.mark.parametrize(
    "cfg, never, lever",
    [
        (_cfg(clip=False), "lower it to 10", "enable --clip-grad-norm 35"),
        (_cfg(clip=True, max_norm=35.0), "--clip-grad-norm 35", "clipping is on at 35: lower it to 10"),
        (_cfg(clip=True, max_norm=10.0), "--clip-grad-norm", "clipping is on at 10: lower --lr"),
    ],
)
def test_gradient_advice_names_the_next_lever(cfg, never, lever):
    cause = D._cause_gradients({}, {"grad_norm": 1.0, "grad_norm_max": 50.0}, cfg)
    assert lever in cause and never not in cause


@pytest.mark.parametrize(
    "cfg, lever",
    [
        (_cfg(cls_pos_weight=1.0), "raise model.roi_head.cls_pos_weight to 2"),
        (_cfg(cls_pos_weight=2.0), "cls_pos_weight is already 2: set model.roi_head.class_weight"),
        (_cfg(cls_pos_weight=3.0, class_weight=[1, 1, 4]), "train longer"),
    ],
)
def test_underconfidence_advice_never_repeats_what_is_set(cfg, lever):
    cause = D._cause_underconfident(_eval(0.0, 0.03), {}, cfg)
    assert lever in cause
    assert D._cause_underconfident(_eval(1.0, 0.9), {}, cfg) is None


def test_each_cause_fires_only_on_its_signal():
    cfg = _cfg()
    healthy = {
        "roi/pos_per_image": 20,
        "roi/fg_prob": 0.8,
        "rpn/pos_per_image": 30,
        "grad_norm": 2.0,
        "grad_norm_max": 5.0,
        "skipped_steps": 0,
        "world_size": 8,
    }
    for f in D.CAUSES:
        assert f(_eval(2.0, 0.9), healthy, cfg) is None, f.__name__
    assert "few positive RoIs" in D._cause_few_positives(None, {"roi/pos_per_image": 2.0}, cfg)
    assert "0.12" in D._cause_fg_prob(None, {"roi/fg_prob": 0.12}, cfg)
    assert "model.anchor_sizes" in D._cause_rpn(None, {"rpn/pos_per_image": 0.5}, cfg)


def test_learning_model_is_not_flagged():
    history = [{**_eval(95.0, 0.3), "train_loss": 2.0}]
    train = {
        "loss": 1.5,
        "roi/pos_per_image": 20,
        "roi/fg_prob": 0.6,
        "rpn/pos_per_image": 30,
        "grad_norm": 3.0,
        "grad_norm_max": 9.0,
        "world_size": 8,
    }
    assert D.collapse_warnings(history, _eval(3.0, 0.95), train, _cfg(), gt_per_image=2.5) == []


def test_per_class_collapse_names_the_class_and_its_past_ap50():
    def rows(dets, ap50):
        return {
            "rare": {"gt": 12.0, "dets_per_image": dets, "recall": 0.0, "bbox_AP50": ap50},
            "common": {"gt": 80.0, "dets_per_image": 3.0, "recall": 0.9, "bbox_AP50": 0.8},
        }

    history = [_eval(3.0, 0.9, per_class=rows(0.5, 0.31)), _eval(3.0, 0.9, per_class=rows(0.2, 0.0))]
    w = D.collapse_warnings(history, _eval(3.0, 0.9, per_class=rows(0.0, 0.0)), {}, _cfg(), gt_per_image=2.5)
    assert w[0].startswith("class 'rare': ")  # the class, its threshold, objects and past AP50 with when
    assert_names(w[0], "0 detections", "0.05", "12 ground-truth", "AP50", "0.31", "2 evaluations", one_line=True)
    assert not any("common" in line for line in w)


def test_collapse_cause_lr_is_sgds_rule_only():
    cfg = _cfg(lr=0.08, batch=1)
    assert_names(D._cause_lr(None, {}, cfg), "lr 0.08", "64.0x", "linear-scaling")
    assert D._cause_lr(None, {}, cfg.replace({"training.opt": "adamw"})) is None


def test_lr_warning_before_step_one():
    assert D.lr_warning(0.02, 16, 0) is None  # exactly the rule
    assert D.lr_warning(0.02, 4, 1000) is None  # 4x the rule, but warmed up
    w = D.lr_warning(0.02, 4, 0)
    assert_names(w, "lr 0.02", "4.0x", "linear-scaling", "4 images", "0.005")
    assert D.lr_warning(0.011, 4, 0) is not None and D.lr_warning(0.0099, 4, 0) is None  # > 2x triggers
    assert D.lr_warning(0.02, 4, 0, "sgd_nesterov") is not None
    assert D.lr_warning(0.02, 4, 0, "adamw") is None  # SGD's rule says nothing of an AdamW lr
    assert D.linear_scaling_lr(4, "sgd_nesterov") == 0.005 and D.linear_scaling_lr(4, "adamw") is None


def test_matched_gt_is_greedy_by_score_one_each():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    dets = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], dtype=float)
    assert D.matched_gt(gt, dets, np.array([0.9, 0.8, 0.7])).tolist() == [True, False]
    assert D.matched_gt(gt, dets[:0], np.zeros(0)).tolist() == [False, False]


def test_per_class_summary_by_hand():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 20, 30, 30], "area": 900, "iscrowd": 0},
        ],
    }
    coco.createIndex()
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [70, 70, 10, 10], "score": 0.8},
    ]
    out = D.per_class_summary(coco, [1, 2], dets, {}, {1: 1, 2: 2, 3: 3})
    assert out["cat"] == {"gt": 2.0, "dets_per_image": 0.5, "recall": 0.5}
    assert out["dog"] == {"gt": 1.0, "dets_per_image": 0.5, "recall": 0.0}
    # A class with no ground truth has no recall (NaN, not 0), and the table shows "-" for it.
    assert out["bird"]["gt"] == 0.0 and out["bird"]["dets_per_image"] == 0.0 and math.isnan(out["bird"]["recall"])
    rows = [line.split() for line in D.per_class_table(out, 0.05).splitlines()]
    assert rows == [
        ["class", "gt", "dets/img", "recall@0.05"],
        ["cat", "2", "0.50", "0.500"],
        ["dog", "1", "0.50", "0.000"],
        ["bird", "0", "0.00", "-"],
    ]


# -- the lr check before step 1, end to end (references/train.py) ------------------------------------
@pytest.mark.slow
def test_lr_check_before_step_one_and_auto_scale(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, lr=0.02, warmup_iters=0)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    out = capsys.readouterr().out
    warning = next(x for x in out.splitlines() if x.startswith("WARNING: lr 0.02"))
    assert_names(warning, "8.0x", "linear-scaling", "2 images per step", "0.0025")
    assert out.index(warning) < out.index("epoch 0 [")  # before step one
    assert records(tmp_path / "out", "lr_check")[0]["linear_scaling_lr"] == 0.0025
    assert train.main(["--config", cfg, "--no-data-report", "--auto-scale-lr", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert_names(out, "lr 0.02", "16 images per step", "2 per step", "-> lr 0.0025")
    assert "WARNING: lr" not in out
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["training"]["lr"] == 0.0025
