"""references/config_rules.py: every value's range and mode (declared on the schema's setting) and the rules
across keys fail in one line naming the key and its flag, before any data is read and with nothing written."""

import os
import re

import pytest

import helpers
from helpers import cli, one_line_error


def files(out):
    return sorted(os.listdir(out)) if os.path.isdir(out) else []


def ranged():
    import train_config

    return {o.path for o in train_config.OPTIONS if o.range is not None}


# -- 9 and every numeric setting's range: one line naming the key and its flag, before any data -----------
BAD_VALUES = {
    "training.batch_size": 0,
    "training.epochs": 0,
    "training.print_freq": 0,
    "training.eval_every": 0,
    "training.lr": -0.01,
    "training.momentum": -0.9,
    "training.weight_decay": -1e-4,
    "training.norm_weight_decay": -1.0,
    "training.lr_step_size": 0,
    "training.lr_gamma": -1.0,
    "training.lr_steps": [0, 3],
    "training.warmup_iters": -1,
    "training.warmup_factor": 0.0,
    "training.max_consecutive_skips": 0,
    "training.iters_per_epoch": 0,
    "training.judge_after_iters": -1,
    "training.gallery_images": -1,
    "training.num_threads": 0,
    "training.start_epoch": -1,
    "training.gradient_clip.max_norm": 0.0,
    "training.gradient_clip.norm_type": 0.0,
    "data.workers": -1,
    "data.aspect_ratio_group_factor": -2,
    "data.check_samples": -1,
    "data.lsj_size": 0,
    "model.rpn_score_thresh": 1.5,
    "model.num_classes": 1,
    "distributed.world_size": 0,
    "training.checkpoint_every_iters": 0,
    "data.repeat_factor_threshold": 0.0,
    "model.class_weight_beta": 1.0,
    "training.clip_grad_norm": -5.0,
}


def test_every_numeric_setting_has_a_range():
    import train_config

    numeric = {o.path for o in train_config.OPTIONS if o.kind in (int, float, list)}
    unchecked = (
        numeric
        - ranged()
        - {
            "training.seed",  # any integer seeds torch and random
            "model.trainable_backbone_layers",  # its own rule (0..5, 0..6 for MobileNetV3), in _check_model_and_data
            "data.tile_size",  # its own rule (>= 32 px), in check_tile_keys
            "data.tile_overlap",  # its own rule (>= 0 and < tile_size), in check_tile_keys
        }
    )
    assert unchecked == set()
    assert set(BAD_VALUES) == ranged()


@pytest.mark.parametrize("path", sorted(BAD_VALUES))
def test_a_numeric_setting_out_of_range_fails_in_one_line(tmp_path, path):
    import yaml

    import train_config

    tree: dict = {}
    node = tree
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = BAD_VALUES[path]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    out = tmp_path / "out"
    rc, _, err = cli(["--config", str(cfg), "--output-dir", str(out), "--device", "cpu", "--data-path", "/nonexistent"])
    flag = train_config.BY_PATH[path].flags
    named = re.escape(path) + (rf" \({re.escape(flag[0])}\)" if flag else "")
    one_line_error(rc, err, rf"{named} must be .*got {re.escape(repr(BAD_VALUES[path]))}")
    assert files(out) == []


# A setting that one mode alone reads, set under another mode: (the value, the flags of another mode, of its own).
ONLY_WITH_CASES = {
    "data.lsj_size": (96, ["--data-augmentation", "hflip"], ["--data-augmentation", "lsj"]),
    "training.lr_steps": ([3, 4], ["--lr-scheduler", "cosineannealinglr"], ["--lr-scheduler", "multisteplr"]),
    "training.lr_gamma": (0.5, ["--lr-scheduler", "cosineannealinglr"], ["--lr-scheduler", "multisteplr"]),
    "training.momentum": (0.5, ["--opt", "adamw"], ["--opt", "sgd"]),
    "training.warmup_factor": (0.1, ["--warmup-iters", "0"], ["--warmup-iters", "10"]),
    "training.gallery_images": (4, ["--no-plots"], ["--plots"]),
    "training.lr_step_size": (5, [], None),  # read by no scheduler (nor by torchvision's detection script)
    # The saving keys under --output-dir '' (given after the test's own --output-dir: the later flag wins).
    "training.checkpoint_every_iters": (5, ["--output-dir", ""], ["--output-dir", "out"]),
    "training.overwrite": (True, ["--output-dir", ""], ["--output-dir", "out"]),
}


@pytest.mark.parametrize("path", sorted(ONLY_WITH_CASES))
def test_a_setting_its_mode_does_not_read_is_refused(tmp_path, path):
    import yaml

    import train_config

    assert set(ONLY_WITH_CASES) == {o.path for o in train_config.OPTIONS if o.only_with is not None}
    value, other_mode, own_mode = ONLY_WITH_CASES[path]
    section, leaf = path.split(".")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({section: {leaf: value}}))
    out = tmp_path / "out"
    base = ["--config", str(cfg), "--output-dir", str(out), "--device", "cpu", "--data-path", "/nonexistent"]
    rc, _, err = cli([*base, *other_mode])
    named = rf"{re.escape(path)}\b.* = {re.escape(repr(value))}"
    one_line_error(rc, err, rf"{named} has no effect: " + (f"only {re.escape(own_mode[0])}" if own_mode else ""))
    assert files(out) == []
    if own_mode:
        loaded, _, _ = train_config.resolve(["--config", str(cfg), *own_mode])  # read there: accepted
        assert loaded.get(path) == value


def test_start_epoch_past_epochs_fails_before_the_data(tmp_path):
    out = tmp_path / "out"
    rc, _, err = cli(
        helpers.coco_json_argv("/nonexistent.json", "/nonexistent", out, "--start-epoch", "3", "--epochs", "2")
    )
    one_line_error(rc, err, r"training.start_epoch \(--start-epoch\) 3 is not below training.epochs \(--epochs\) 2")
    assert files(out) == []
