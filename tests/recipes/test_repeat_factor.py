"""Repeat-factor sampling (references/data.py, train.py, data_report.py): Detectron2's semantics."""

import math
from collections import Counter

import pytest
import torch
import yaml

import run_data
import train
import train_config
from data import class_image_fractions, image_classes, repeat_factors, suggest_repeat_threshold
from data_report import data_report, repeat_factor_advice
from helpers import assert_names, raises_naming, records, tiny_config, tiny_model
from samplers import GroupedBatchSampler, RepeatFactorSampler

# 10 images: class 1 in 6, class 2 in 2, class 3 in 1, three empty images.
CLASSES = [{1}, {1}, {1}, {1}, {1, 2}, {1, 3}, {2}, set(), set(), set()]


def test_factors_follow_the_formula_with_and_without_sqrt():
    assert class_image_fractions(CLASSES) == {1: 0.6, 2: 0.2, 3: 0.1}
    per_image, per_class = repeat_factors(CLASSES, 0.4)
    assert per_class == pytest.approx({1: 1.0, 2: math.sqrt(2.0), 3: 2.0})  # max(1, sqrt(0.4 / f))
    want = [1, 1, 1, 1, math.sqrt(2), 2, math.sqrt(2), 1, 1, 1]  # the max over an image's classes; 1 if empty
    assert per_image == pytest.approx(want)
    per_image, per_class = repeat_factors(CLASSES, 0.4, sqrt=False)
    assert per_class == pytest.approx({1: 1.0, 2: 2.0, 3: 4.0})  # max(1, 0.4 / f)
    assert per_image == pytest.approx([1, 1, 1, 1, 2, 4, 2, 1, 1, 1])
    with raises_naming(ValueError, "threshold", "> 0", "0.0"):
        repeat_factors(CLASSES, 0.0)


def test_image_classes_skip_crowd_and_foreign_images():
    anns = [
        {"image_id": 1, "category_id": 5},
        {"image_id": 1, "category_id": 5},
        {"image_id": 2, "category_id": 7, "iscrowd": 1},
        {"image_id": 9, "category_id": 8},  # not a listed image
    ]
    assert image_classes(anns, [2, 1, 3]) == [set(), {5}, set()]


def test_suggested_threshold_is_the_median_class_fraction():
    # fractions 0.6, 0.2, 0.1: median 0.2 repeats class 3 only (the class at the median keeps 1).
    t = suggest_repeat_threshold(CLASSES)
    assert t == pytest.approx(0.2)
    _, per_class = repeat_factors(CLASSES, t)
    assert per_class[1] == per_class[2] == 1.0 and per_class[3] == pytest.approx(math.sqrt(2))
    # Rounded down to 3 significant digits: 1/3 -> 0.333 (the median class stays at factor 1).
    three = [{1}, {2}, {3}] + [{1, 2}] * 2 + [{1}] * 4 + [set()] * 3  # fractions 7/12, 1/4, 1/12
    assert suggest_repeat_threshold(three) == 0.25
    assert suggest_repeat_threshold([{1}, {2}, {3}, {1}, {2}, {3}, {1, 2, 3}, set(), set()] * 2 + [{1}]) is None
    assert suggest_repeat_threshold([{1}, {1}, set()]) is None  # one class
    assert suggest_repeat_threshold([]) is None
    # Balanced enough: the rarest class is in more than half as many images as the median one.
    assert suggest_repeat_threshold([{1}] * 5 + [{2}] * 4 + [{3}] * 3) is None
    assert suggest_repeat_threshold([{1}] * 5 + [{2}] * 4 + [{3}] * 2) == pytest.approx(4 / 11, abs=1e-3)


def _hand_counts(factors, seed, epoch):
    """The draw, done by hand from the generator RepeatFactorSampler documents."""
    g = torch.Generator().manual_seed(seed + epoch)
    u = torch.rand(len(factors), generator=g, dtype=torch.float64).tolist()
    return [math.floor(r) + (1 if x < r - math.floor(r) else 0) for r, x in zip(factors, u)]


def test_one_epoch_draw_matches_the_hand_computed_rounding():
    factors, _ = repeat_factors(CLASSES, 0.4)
    s = RepeatFactorSampler(factors, seed=7)
    for epoch in (0, 5):
        s.set_epoch(epoch)
        want = _hand_counts(factors, 7, epoch)
        got = Counter(list(s))
        assert [got[i] for i in range(len(factors))] == want
        assert len(s) == s.epoch_total == sum(want)
        # Whole parts are always drawn; fractional parts add one copy or none.
        assert all(math.floor(r) <= c <= math.ceil(r) for r, c in zip(factors, want))


def test_mean_count_per_image_approaches_its_factor():
    factors = [1.0, 1.25, 2.5, 3.0, 1.9, 0.5]
    s = RepeatFactorSampler(factors, seed=0)
    total = Counter()
    epochs = 4000
    for e in range(epochs):
        s.set_epoch(e)
        total.update(s)
    means = [total[i] / epochs for i in range(len(factors))]
    # Binomial std of a mean over 4000 draws is at most 0.5 / sqrt(4000) ~ 0.008: 0.04 is 5 sigma.
    assert means == pytest.approx(factors, abs=0.04)
    assert means[0] == 1.0 and means[3] == 3.0  # integral factors are exact every epoch
    assert s.expected == pytest.approx(sum(factors))


def test_order_is_shuffled_and_seeded():
    factors = [2.0] * 50
    a, b = RepeatFactorSampler(factors, seed=1), RepeatFactorSampler(factors, seed=2)
    assert list(a) != sorted(a) and list(a) != list(b)
    assert sorted(a) == sorted(b) == sorted(list(range(50)) * 2)
    c = RepeatFactorSampler(factors, seed=1)
    c.set_epoch(1)
    assert list(c) != list(a)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shares_are_disjoint_equal_and_cover_the_epoch(world):
    factors, _ = repeat_factors(CLASSES, 0.4)
    full = RepeatFactorSampler(factors, seed=3)
    for epoch in (0, 1, 2):
        full.set_epoch(epoch)
        epoch_list = list(full)
        ranks = [RepeatFactorSampler(factors, seed=3, rank=r, world=world) for r in range(world)]
        for s in ranks:
            s.set_epoch(epoch)
        shares = [list(s) for s in ranks]
        n = math.ceil(len(epoch_list) / world)
        assert [len(x) for x in shares] == [len(s) for s in ranks] == [n] * world
        # Position p of the padded list goes to rank p % world: disjoint positions, all of them covered.
        padded = epoch_list + epoch_list[: n * world - len(epoch_list)]
        for p, idx in enumerate(padded):
            assert shares[p % world][p // world] == idx
        merged = Counter(i for x in shares for i in x)
        assert merged == Counter(padded)


def test_same_epoch_same_draw_after_resume():
    factors, _ = repeat_factors(CLASSES, 0.4, sqrt=False)
    first = RepeatFactorSampler(factors, seed=11)
    for e in range(4):  # the uninterrupted run went through epochs 0..3
        first.set_epoch(e)
    resumed = RepeatFactorSampler(factors, seed=11)  # a fresh process resuming at epoch 3
    resumed.set_epoch(3)
    assert list(first) == list(resumed) and len(first) == len(resumed)
    first.set_epoch(0)
    assert list(first) != list(resumed)


def test_sampler_refuses_bad_input():
    with raises_naming(ValueError, "RepeatFactorSampler", "factors", ">= 0"):
        RepeatFactorSampler([1.0, -1.0])
    with raises_naming(ValueError, "RepeatFactorSampler", "factors", "non-empty"):
        RepeatFactorSampler([])
    with raises_naming(ValueError, "RepeatFactorSampler", "rank 2", "[0, 2)"):
        RepeatFactorSampler([1.0], rank=2, world=2)


def test_grouped_batches_take_the_repeated_list():
    factors = [3.0, 1.0, 1.0, 2.0, 1.0]
    s = RepeatFactorSampler(factors, seed=0)
    batches = GroupedBatchSampler(s, [0, 1, 0, 1, 0], batch_size=2)
    got = [i for b in batches for i in b]
    assert len(batches) == math.ceil(8 / 2) == len(list(batches))
    assert Counter(got) == Counter({0: 3, 1: 1, 2: 1, 3: 2, 4: 1})


def test_report_advice_on_a_coco_dict():
    data = {
        "images": [{"id": i} for i in range(10)],
        "annotations": [{"image_id": i, "category_id": c} for i, cs in enumerate(CLASSES) for c in sorted(cs)],
    }
    adv = repeat_factor_advice(data, {1: "a", 2: "b", 3: "c"})
    assert adv["threshold"] == pytest.approx(0.2)
    assert adv["class_factors"] == pytest.approx({"c": math.sqrt(2)})
    assert adv["images"] == 10 and adv["expected_images_per_epoch"] == pytest.approx(9 + math.sqrt(2))
    # The data report prints it and holds it in to_dict() (metrics.jsonl's data_report record).
    data["images"] = [{"id": i, "width": 64, "height": 64} for i in range(10)]
    for a in data["annotations"]:
        a["bbox"] = [8, 8, 24, 24]
    data["categories"] = [{"id": c, "name": n} for c, n in ((1, "a"), (2, "b"), (3, "c"))]
    report = data_report(None, tiny_model("faster"), dataset=data)
    assert report.to_dict()["repeat_factors"] == adv
    line = "--repeat-factor-threshold 0.2 (the median class's image fraction) repeats c x1.41: 10.4 images per epoch"
    assert line in report.text()
    # Class c's image labelled b instead: b is in 3 images, a in 6; the median (4.5) is under 2 x 3.
    balanced = dict(data, annotations=[dict(a, category_id=min(a["category_id"], 2)) for a in data["annotations"]])
    report = data_report(None, tiny_model("faster"), dataset=balanced)
    assert report.to_dict()["repeat_factors"]["threshold"] is None and "repeat-factor" not in report.text()


# -- the training script --------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_run_with_repeat_factor_sampling(tmp_path, data_root, capsys):
    from checks import load_coco_checked

    cfg = tiny_config(tmp_path, data_root, epochs=2)
    assert train.main(["--config", cfg, "--repeat-factor-threshold", "0.9"]) == 0
    out = tmp_path / "out"
    (rec,) = records(out, "repeat_factors")
    assert records(out, "data_report")[0]["repeat_factors"]["images"] == 8
    assert rec["threshold"] == 0.9 and rec["sqrt"] is True and rec["images"] == 8
    printed = capsys.readouterr().out
    assert_names(printed, "data.repeat_factor_threshold 0.9", "sqrt(t / f)")
    # The same factors, by the formula, from the training annotations.
    files = run_data.dataset_files(train_config.resolve(["--config", str(out / "config.yaml")])[0])
    coco, *_ = load_coco_checked(files["train_ann"], files["train_images"], "train", "stop", True)
    factors, per_class = repeat_factors(image_classes(coco.dataset["annotations"], sorted(coco.imgs)), 0.9)
    names = {c: coco.cats[c]["name"] for c in per_class}
    assert rec["class_factors"] == pytest.approx({names[c]: r for c, r in per_class.items()})
    assert max(per_class.values()) > 1 and rec["expected_images_per_epoch"] == pytest.approx(sum(factors))
    # Each epoch runs the iterations its own draw gives (batch 2, drop_last; print_freq 1 logs every step).
    s = RepeatFactorSampler(factors, seed=0)
    assert rec["epoch0_images"] == rec["epoch0_images_per_rank"] == len(s)
    want = {}
    for e in (0, 1):
        s.set_epoch(e)
        want[e] = len(s) // 2
    assert want[0] != want[1]  # this data's two draws differ in length (9 and 13 images): the loader follows
    assert Counter(r["epoch"] for r in records(out, "train")) == want
    assert f"2 epoch(s) x ~{want[0]} iterations" in printed


@pytest.mark.slow
def test_train_run_with_aspect_ratio_groups(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=3)
    assert train.main(["--config", cfg, "--repeat-factor-threshold", "0.5", "--aspect-ratio-group-factor", "3"]) == 0
    assert len(records(tmp_path / "out", "repeat_factors")) == 1
    assert [r["iter"] for r in records(tmp_path / "out", "train")] == [1, 2, 3]  # --iters-per-epoch 3


def test_print_config_shows_the_keys(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg, "--print-config", "--repeat-factor-threshold", "0.01", "--no-repeat-sqrt"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)["data"]
    assert d["repeat_factor_threshold"] == 0.01 and d["repeat_sqrt"] is False
    assert train.main(["--config", cfg, "--print-config"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)["data"]
    assert d["repeat_factor_threshold"] is None and d["repeat_sqrt"] is True
    assert "--repeat-factor-threshold" in train_config.build_parser().format_help()


@pytest.mark.parametrize(
    "argv,names",
    [
        (["--repeat-factor-threshold", "0"], ["data.repeat_factor_threshold", "--repeat-factor-threshold", "> 0"]),
        (["--repeat-factor-threshold", "-0.1"], ["data.repeat_factor_threshold", "> 0", "-0.1"]),
        (["--no-repeat-sqrt"], ["data.repeat_sqrt false", "--no-repeat-sqrt", "no effect", "repeat_factor_threshold"]),
    ],
)
def test_invalid_settings_are_one_line_errors(tmp_path, data_root, argv, names):
    cfg = tiny_config(tmp_path, data_root)
    with raises_naming(train_config.ConfigError, *names):
        train.main(["--config", cfg, *argv])


def test_yaml_threshold_must_be_a_number(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  repeat_factor_threshold: rare\n")
    with raises_naming(train_config.ConfigError, "data.repeat_factor_threshold", "number", "'rare'"):
        train_config.resolve(["--config", str(p)])
