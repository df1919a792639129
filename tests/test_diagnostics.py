import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "references"))

from diagnostics import collapse_warnings, score_summary  # noqa: E402
from train_config import defaults  # noqa: E402


def _eval(dets, max_score, thresh=0.05):
    return {"dets_per_image": dets, "max_score": max_score, "score_thresh": thresh}


def test_score_summary():
    s = score_summary([0.9, 0.02], [3, 0], [0.9, 0.5, 0.2, 0.02], 0.05)
    assert s["dets_per_image"] == 1.5 and s["images_without_dets"] == 0.5 and s["max_score"] == 0.9
    assert sum(s["score_hist"]) == 4


def test_collapse_to_zero_lists_causes_with_numbers():
    cfg = defaults()
    cfg["training"]["lr"] = 0.08
    cfg["training"]["batch_size"] = 2
    train = {"roi/pos_per_image": 1.5, "roi/fg_prob": 0.12, "rpn/pos_per_image": 0.8, "grad_norm": 2.0,
             "grad_norm_max": 400.0, "skipped_steps": 3, "loss": 5.0, "world_size": 1}
    history = [{**_eval(4.0, 0.9), "train_loss": 1.0}]
    w = collapse_warnings(history, _eval(0.0, 0.031), train, cfg, gt_per_image=2.5)
    text = "\n".join(w)
    assert w[0].startswith("detections collapsed: 0 detections per image")
    for expected in ("highest 0.031", "1.5 sampled", "0.12", "0.8 positive anchors", "max grad_norm 400.0",
                     "--clip-grad-norm 35", "3 steps were skipped", "lr 0.08 is 32.0x", "rose from 1.000 to 5.000"):
        assert expected in text, expected


def test_learning_model_is_not_flagged():
    cfg = defaults()
    # Early over-detection falling towards the ground-truth count is learning.
    assert collapse_warnings([_eval(95.0, 0.17)], _eval(30.0, 0.42), {}, cfg, gt_per_image=2.4) == []
    assert collapse_warnings([_eval(95.0, 0.17), _eval(3.0, 0.8)], _eval(2.5, 0.9), {}, cfg, gt_per_image=2.4) == []
    w = collapse_warnings([_eval(95.0, 0.17), _eval(3.0, 0.8)], _eval(0.5, 0.9), {}, cfg, gt_per_image=2.4)
    assert w and "dropped sharply" in w[0]
