"""Round 2 of "nothing silently wrong": resumes from torchvision's checkpoints, evaluation keys, reused
output folders, RLE masks, sampler settings. Each test makes the bad input and asserts the line that
names it and what the output folder holds. (The numeric ranges and modes: test_config_rules.py; the
Lightning CLI's keys: test_lightning.py.)"""

import argparse
import contextlib
import io
import json
import os
import re

import pytest
import torch

import helpers
import train
from helpers import assert_names, cli, make_set, one_line_error, one_line_error_naming, raises_naming, write_json
from shapes import ShapesSpec, ensure_shapes

SPEC = ShapesSpec(num_train=6, num_val=3, image_size=64, min_size=12, max_size=30, empty_fraction=0.3, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes(str(tmp_path_factory.mktemp("silent_data")), SPEC)


def argv(ann, images, out, *extra):
    return helpers.coco_json_argv(ann, images, out, "--check-samples", "2", "--no-data-report", *extra)


def files(out):
    return sorted(os.listdir(out)) if os.path.isdir(out) else []


@pytest.fixture(scope="module")
def first_run(shapes, tmp_path_factory):
    """One finished epoch of maskrcnn_tiny (its checkpoint is resumed below)."""
    root = tmp_path_factory.mktemp("first_run")
    data, images = make_set(shapes, root)
    ann = write_json(root, data)
    out = root / "out"
    rc, _, err = cli(argv(ann, images, out, "--norm-weight-decay", "0"))
    assert rc == 0, err
    return {"root": root, "ann": ann, "images": images, "out": out}


def _torchvision_checkpoint(first_run, lr=0.02):
    """checkpoint.pth as torchvision's references/detection/train.py saves it: model, optimizer,
    lr_scheduler, args, epoch; the optimizer at lr 0.02, as its args say."""
    ck = torch.load(first_run["out"] / "checkpoint.pth", weights_only=True)
    groups = ck["optimizer"]["param_groups"]  # the recipe's [other, norm]; torchvision saves [norm, other], no empty
    tv = [g for g in (groups[1], groups[0]) if g["params"]]
    relabel = {old: new for new, old in enumerate(i for g in tv for i in g["params"])}
    opt = {
        "state": {relabel[k]: v for k, v in ck["optimizer"]["state"].items()},
        "param_groups": [dict(g, params=[relabel[i] for i in g["params"]]) for g in tv],
    }
    for g in opt["param_groups"]:
        g["lr"] = g["initial_lr"] = lr
    sched = dict(ck["lr_scheduler"], base_lrs=[lr] * len(opt["param_groups"]))
    args = argparse.Namespace(
        model="maskrcnn_tiny", lr=lr, momentum=0.9, weight_decay=1e-4, norm_weight_decay=0.0, epochs=26,
        lr_steps=[16, 22], lr_gamma=0.1, opt="sgd", lr_scheduler="multisteplr", batch_size=2, dataset="coco",
    )  # fmt: skip
    path = first_run["root"] / "torchvision_checkpoint.pth"
    torch.save({"model": ck["model"], "optimizer": opt, "lr_scheduler": sched, "args": args, "epoch": 0}, path)
    return str(path)


# -- 1. --resume of torchvision's own checkpoint ---------------------------------------------------------
@pytest.mark.slow
def test_resume_of_a_torchvision_checkpoint_applies_the_lr_and_skips_warmup(first_run, tmp_path):
    path = _torchvision_checkpoint(first_run)
    out = tmp_path / "resumed"
    extra = ("--lr", "0.005", "--epochs", "2", "--resume", path, "--norm-weight-decay", "0", "--iters-per-epoch", "3")
    rc, stdout, err = cli(argv(first_run["ann"], first_run["images"], out, *extra))
    assert rc == 0, err
    assert re.search(r"resume: training\.lr: 0\.02 -> 0\.005 applied", stdout), stdout
    assert re.search(r"resume: training\.epochs: 26 -> 2 applied", stdout)
    assert_names(stdout, "torchvision", "1 epoch(s)", "3 iterations")
    lrs = [r["lr"] for r in helpers.records(out, "train")]
    assert lrs == pytest.approx([0.005] * 3)  # no warmup over the restored lr (it gave 6.68, 13.34, 20.0)
    assert {"checkpoint.pth", "model_1.pth", "config.resume-epoch1.yaml"} <= set(files(out))
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["epoch"] == 1 and ck["config"]["training"]["lr"] == 0.005
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == 0.005


@pytest.mark.slow
def test_resume_of_a_torchvision_checkpoint_refuses_what_cannot_take_effect(first_run, tmp_path):
    path = _torchvision_checkpoint(first_run)
    out = tmp_path / "refused"
    extra = ("--epochs", "2", "--resume", path, "--opt", "adamw")
    rc, _, err = cli(argv(first_run["ann"], first_run["images"], out, *extra))
    assert rc == 1 and "Traceback" not in err and f"--resume {path}" in err  # a line per refused key
    assert "training.opt: 'sgd' -> 'adamw' refused" in err
    assert not any(f.endswith(".pth") for f in files(out))


@pytest.mark.parametrize("with_norm", [True, False])
def test_a_torchvision_optimizer_state_lands_on_the_same_parameters(with_norm):
    """torchvision's script: groups [normalization, other] under --norm-weight-decay, an empty one dropped
    (written out here as its train.py builds them); the recipe's run_model.param_groups: [other, norm]."""
    from torchvision.ops._utils import split_normalization_params

    import run_model
    from training_checkpoint import torchvision_optimizer_state

    def net():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)]
        return torch.nn.Sequential(*(layers if with_norm else layers[::2]))

    tv_model = net()
    tv_groups = [
        {"params": p, "weight_decay": w} for p, w in zip(split_normalization_params(tv_model), [0.0, 1e-4]) if p
    ]
    tv_opt = torch.optim.SGD(tv_groups, lr=0.02, momentum=0.9, weight_decay=1e-4)
    tv_model(torch.randn(5, 3)).sum().backward()
    tv_opt.step()
    ours_model = net()
    ours = torch.optim.SGD(run_model.param_groups(ours_model, 1e-4, 0.0), lr=0.02, momentum=0.9)
    ours.load_state_dict(torchvision_optimizer_state(tv_opt.state_dict(), ours.param_groups))
    assert [g["weight_decay"] for g in ours.param_groups] == [1e-4, 0.0]
    for (name, p), q in zip(tv_model.named_parameters(), ours_model.parameters()):
        assert torch.equal(ours.state[q]["momentum_buffer"], tv_opt.state[p]["momentum_buffer"]), name


# -- 5. --wd on resume under --norm-weight-decay ---------------------------------------------------------
@pytest.mark.slow
def test_resume_with_a_new_wd_leaves_the_normalization_group_alone(first_run, tmp_path):
    out = tmp_path / "wd"
    ckpt = str(first_run["out"] / "checkpoint.pth")
    extra = ("--epochs", "2", "--resume", ckpt, "--wd", "0.001", "--norm-weight-decay", "0")
    rc, stdout, err = cli(argv(first_run["ann"], first_run["images"], out, *extra))
    assert rc == 0, err
    assert "training.weight_decay: 0.0001 -> 0.001 applied" in stdout
    groups = torch.load(out / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.001, 0.0]
    out2 = tmp_path / "nwd"
    extra = ("--epochs", "2", "--resume", ckpt, "--norm-weight-decay", "0.01")
    rc, stdout, err = cli(argv(first_run["ann"], first_run["images"], out2, *extra))
    assert rc == 0, err
    assert "training.norm_weight_decay: 0.0 -> 0.01 applied" in stdout
    groups = torch.load(out2 / "checkpoint.pth", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0001, 0.01]
    rc, _, err = cli(argv(first_run["ann"], first_run["images"], tmp_path / "x", "--epochs", "2", "--resume", ckpt))
    assert rc == 1 and "Traceback" not in err and "training.norm_weight_decay: 0.0 -> None refused" in err


# -- also weak: a resume or start epoch that would train nothing ------------------------------------------
def test_resume_with_no_epoch_left_fails_before_the_data(first_run, tmp_path):
    ckpt = str(first_run["out"] / "checkpoint.pth")
    out = tmp_path / "none_left"
    rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out, "--resume", ckpt, "--norm-weight-decay", "0"))
    one_line_error_naming(rc, err, "--epochs 1", f"--resume {ckpt}", "0..0", "--epochs 2")
    assert files(out) == []


# -- 2. annotations without area / iscrowd; the epoch's checkpoint does not wait for evaluation ----------
def test_missing_area_and_iscrowd_are_filled_as_pycocotools_does(shapes, tmp_path):
    from checks import DataError, load_coco_checked
    from data import decode_segmentation

    data, images = make_set(shapes, tmp_path)
    original = {a["id"]: a["area"] for a in data["annotations"]}
    for a in data["annotations"]:
        del a["area"], a["iscrowd"]
    data["annotations"][0]["segmentation"] = []  # no mask: area from the box
    data["annotations"][0]["area_box"] = data["annotations"][0]["bbox"][2] * data["annotations"][0]["bbox"][3]
    coco, _, _, report = load_coco_checked(write_json(tmp_path, data), images, "val", "stop", need_masks=False)
    anns = coco.dataset["annotations"]
    assert all(a["iscrowd"] == 0 for a in anns)
    first = anns[0]
    assert first["area"] == first["area_box"]
    size = {i["id"]: (i["height"], i["width"]) for i in data["images"]}
    for a in anns[1:]:  # the mask's pixel count (the generator's own area is the polygon's, near it)
        assert a["area"] == decode_segmentation(a["segmentation"], *size[a["image_id"]]).sum()
        assert a["area"] == pytest.approx(original[a["id"]], rel=0.1)
    n = len(anns)
    assert f"{n} annotation(s) without 'area'" in report.summary()
    assert f"{n - 1} from the mask, 1 from the box" in report.summary()
    assert f"{n} annotation(s) without 'iscrowd'" in report.summary()
    data["annotations"][1]["keypoints"] = [10, 10, 2, 0, 0, 0, 20, 20, 1]
    coco, _, _, report = load_coco_checked(write_json(tmp_path, data), images, "val", "stop", need_masks=False)
    assert coco.anns[data["annotations"][1]["id"]]["num_keypoints"] == 2
    assert "1 annotation(s) without 'num_keypoints'" in report.summary()
    data["annotations"][1]["area"] = "big"
    with raises_naming(DataError, f"annotation {data['annotations'][1]['id']} ", "area", "'big'"):
        load_coco_checked(write_json(tmp_path, data), images, "val", "stop", need_masks=False)


@pytest.mark.slow
def test_a_set_without_area_trains_evaluates_and_saves(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    for a in data["annotations"]:
        del a["area"], a["iscrowd"]
    out = tmp_path / "out"
    rc, stdout, err = cli(argv(write_json(tmp_path, data), images, out))
    assert rc == 0, err
    assert "without 'area'" in stdout and "without 'iscrowd'" in stdout
    assert [r["epoch"] for r in helpers.records(out, "eval") if "bbox_AP" in r] == [0]
    assert {"checkpoint.pth", "model_0.pth"} <= set(files(out))


@pytest.mark.slow
def test_the_epoch_checkpoint_is_written_when_evaluation_fails(shapes, tmp_path, monkeypatch):
    import hooks

    def broken(*a, **k):
        raise KeyError("area")

    monkeypatch.setattr(hooks, "evaluate", broken)
    data, images = make_set(shapes, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyError):
        cli(argv(write_json(tmp_path, data), images, out))
    assert {"checkpoint.pth", "model_0.pth"} <= set(files(out))
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0


# -- 4. an output folder of another run; two runs in one folder -------------------------------------------
def test_a_folder_with_another_runs_checkpoint_is_refused_before_the_data(first_run, tmp_path):
    out = first_run["out"]
    before = {n: os.path.getmtime(out / n) for n in files(out)}
    rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out))
    one_line_error_naming(rc, err, f"--output-dir {out}", "checkpoint.pth", "--resume", "--overwrite")
    assert {n: os.path.getmtime(out / n) for n in files(out)} == before  # nothing written, nothing removed


def test_a_resume_of_another_folders_run_into_a_used_folder_is_refused(tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"run A")
    resume = str(other / "checkpoint.pth")  # run B: continuing it here would mix its files with run A's
    rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out, "--resume", resume))
    one_line_error_naming(rc, err, f"--resume {resume}", f"--output-dir {out}", "checkpoint")
    in_place = str(out / "checkpoint.pth")  # --overwrite would delete the run --resume continues
    rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out, "--resume", in_place, "--overwrite"))
    one_line_error_naming(rc, err, "--overwrite", f"--resume {in_place}")
    assert files(out) == ["checkpoint.pth"] and (out / "checkpoint.pth").read_bytes() == b"run A"


@pytest.mark.slow
def test_overwrite_removes_the_previous_runs_files_and_says_so(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    ann = write_json(tmp_path, data)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model_7.pth", "checkpoint.pth", "config.resume-epoch8.yaml", "notes.txt"):
        (out / name).write_bytes(b"old run")
    rc, stdout, err = cli(argv(ann, images, out, "--overwrite"))
    assert rc == 0, err
    removed = "checkpoint.pth, config.resume-epoch8.yaml, model_7.pth"
    assert_names(next(x for x in stdout.splitlines() if x.startswith("--overwrite: ")), "removed", removed)
    assert "model_7.pth" not in files(out) and "notes.txt" in files(out)  # not a file of ours: kept
    assert {"model_0.pth", "checkpoint.pth", "config.yaml"} <= set(files(out))
    assert ".tv_lossfix.lock" not in files(out)  # released at the end


def test_a_second_run_in_a_locked_folder_fails_in_one_line(tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": holder.pid, "host": socket.gethostname()}
        (out / ".tv_lossfix.lock").write_text(json.dumps(owner))
        rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out))
        one_line_error_naming(rc, err, f"--output-dir {out}", f"process {holder.pid}", ".tv_lossfix.lock")
        assert files(out) == [".tv_lossfix.lock"]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, removed and said; then the run fails on the missing data.
    rc, stdout, err = cli(argv("/nonexistent.json", "/nonexistent", out))
    assert_names(next(x for x in stdout.splitlines() if f"process {holder.pid}" in x), "removed", "lock")
    one_line_error_naming(rc, err, "/nonexistent.json", "not found")
    assert ".tv_lossfix.lock" not in files(out)  # released on the error too


def test_the_lock_is_released_when_setup_fails_after_taking_it(tmp_path, monkeypatch):
    import train_config

    def fail(run):
        raise train_config.ConfigError("failed after the lock")

    monkeypatch.setattr(train, "_record_what_runs", fail)
    out = tmp_path / "out"
    rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out))
    one_line_error(rc, err, "failed after the lock")
    assert ".tv_lossfix.lock" not in files(out)


def test_under_ddp_rank_0_alone_locks_and_every_rank_learns_its_refusal(tmp_path, monkeypatch):
    import distributed
    import train_config

    t = train_config.defaults().replace({"training.output_dir": str(tmp_path / "out")}).training
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # rank 1 of 2
    monkeypatch.setattr(distributed, "all_gather", lambda obj: [None, obj])
    assert train._take_output_dir(t.output_dir, t, None) == (None, [])
    assert files(tmp_path / "out") == []  # rank 1 neither creates nor locks the folder: not refused by itself
    busy = f"--output-dir {t.output_dir} is in use by process 7"
    monkeypatch.setattr(distributed, "all_gather", lambda obj: [busy, obj])
    with pytest.raises(train.CheckpointError, match=rf"^rank 0: {re.escape(busy)}$"):
        train._take_output_dir(t.output_dir, t, None)  # ends, instead of waiting for rank 0 at a barrier


# -- 3, 10 and every RLE form: checked against the image before any decode ---------------------------------
def _rle_of_box(x, y, bw, bh, h, w):
    """An uncompressed COCO RLE (column-major run lengths, background first) of a filled box."""
    import numpy as np

    m = np.zeros((h, w), dtype=np.uint8)
    m[y : y + bh, x : x + bw] = 1
    flat = m.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [h, w], "counts": counts}


def _compressed(rle):
    from pycocotools import mask as mask_utils

    out = mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": rle["size"], "counts": out["counts"].decode("ascii")}


def _one_annotation_set(shapes, tmp_path, seg, bbox=None):
    data, images = make_set(shapes, tmp_path)
    img = data["images"][0]
    a = next(a for a in data["annotations"] if a["image_id"] == img["id"])
    a["segmentation"] = seg(img["height"], img["width"]) if callable(seg) else seg
    if bbox is not None:
        a["bbox"] = bbox
    return write_json(tmp_path, data), images, a["id"], img["id"]


HW = SPEC.image_size**2  # the set's images are square


def _counts(*counts):
    return lambda h, w: {"size": [h, w], "counts": list(counts)}


def _cut_string(h, w):
    text = _compressed({"size": [h, w], "counts": [10, 20, h * w - 30]})["counts"]
    return {"size": [h, w], "counts": text[:-1]}


# what each message names: the field and the value that is wrong (the sum, the run, the type)
RLE_CASES = {
    "counts_sum_short": (_counts(10, 20, HW - 40), ("counts", f"{HW - 10} pixels")),
    "counts_sum_long": (_counts(10, 20, HW), ("counts", f"{HW + 30} pixels")),
    "negative_run": (_counts(10, -5, HW - 5), ("counts", "(-5)")),
    "fractional_counts": (_counts(10.5, 20, HW - 30.5), ("counts", "10.5")),
    "counts_dict": (lambda h, w: {"size": [h, w], "counts": {"a": 1}}, ("counts", "dict")),
    "compressed_short": (_cut_string, ("counts", "compressed")),
    "compressed_bad_char": (lambda h, w: {"size": [h, w], "counts": "0\x7f1"}, ("compressed",)),
    "no_counts": (lambda h, w: {"size": [h, w]}, ("'size'", "'counts'")),
    "point_pairs": ([[[10, 10], [30, 10], [30, 30], [10, 30]]], ("[x, y] pairs",)),
    "nested_point_pairs": ([[[10, 10], [30, 10], [30, 30]] * 2], ("[x, y] pairs",)),
}


@pytest.mark.parametrize("case", sorted(RLE_CASES))
def test_a_bad_segmentation_is_refused_naming_the_annotation(shapes, tmp_path, case):
    from checks import DataError, load_coco_checked

    seg, names = RLE_CASES[case]
    ann, images, aid, iid = _one_annotation_set(shapes, tmp_path, seg)
    with raises_naming(DataError, f"annotation {aid} (image {iid}): ", *names, one_line=False):
        load_coco_checked(ann, images, "train", "stop", need_masks=True)
    if case.startswith(("counts", "negative", "fractional", "compressed", "no_counts")):  # an RLE: checked for boxes
        with raises_naming(DataError, f"annotation {aid} ", one_line=False):
            load_coco_checked(ann, images, "train", "stop", need_masks=False)
    _, _, _, report = load_coco_checked(ann, images, "train", "drop", need_masks=True)
    assert sum(report.dropped.values()) == 1


@pytest.mark.parametrize("compressed", [False, True])
def test_good_rles_pass_and_an_xyxy_box_is_caught_by_the_rles_extent(shapes, tmp_path, compressed):
    from checks import DataError, load_coco_checked

    def rle(h, w):
        r = _rle_of_box(20, 24, 10, 12, h, w)
        return _compressed(r) if compressed else r

    ann, images, aid, _ = _one_annotation_set(shapes, tmp_path, rle, bbox=[20, 24, 10, 12])
    coco, _, _, _ = load_coco_checked(ann, images, "train", "stop", need_masks=True)
    assert aid in coco.anns  # kept: a valid RLE whose extent is the box's
    # [x1, y1, x2, y2] = [20, 24, 30, 36] also fits the 64 x 64 image as [x, y, w, h]: only the RLE tells.
    ann, images, aid, iid = _one_annotation_set(shapes, tmp_path / "xyxy", rle, bbox=[20, 24, 30, 36])
    with raises_naming(
        DataError, f"annotation {aid} (image {iid}): ", "[20, 24, 30, 36]", "[x1, y1, x2, y2]", one_line=False
    ):
        load_coco_checked(ann, images, "train", "stop", need_masks=False)


def test_whole_float_counts_are_read_as_pycocotools_reads_them(shapes, tmp_path):
    from pycocotools import mask as mask_utils

    from checks import load_coco_checked

    def rle(h, w):  # a JSON writer that turned the run lengths into floats: 10.0 is 10 for pycocotools
        r = _rle_of_box(20, 24, 10, 12, h, w)
        return {"size": r["size"], "counts": [float(c) for c in r["counts"]]}

    ann, images, aid, _ = _one_annotation_set(shapes, tmp_path, rle, bbox=[20, 24, 10, 12])
    coco, _, _, _ = load_coco_checked(ann, images, "train", "stop", need_masks=True)
    a = coco.anns[aid]
    assert mask_utils.area(mask_utils.frPyObjects(a["segmentation"], 64, 64)) == 120


def test_rle_string_counts_reads_what_pycocotools_writes():
    import numpy as np
    from pycocotools import mask as mask_utils

    from checks import rle_string_counts

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = (rng.random((37, 23)) < rng.random()).astype(np.uint8)
        text = mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii")
        flat = m.flatten(order="F")
        runs = [len(list(g)) for _, g in __import__("itertools").groupby(flat)]
        expected = ([0] + runs) if flat[0] == 1 else runs
        assert rle_string_counts(text) == expected


# -- 7, 8 and the builder keywords: refused before any data is read ----------------------------------------
def _yaml(tmp_path, model):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    return str(path)


# what each refusal names: the key, the values that make it useless (a positive count of int(num x fraction)
# = 0), the misspelt keyword and the one meant
@pytest.mark.parametrize(
    "model, names",
    [
        ({"roi_head": {"pos_fraction": 0.001}},
         ["model.roi_head.pos_fraction", "num 128", "pos_fraction 0.001", "0 positive"]),
        ({"roi_head": {"num": 1}}, ["model.roi_head.num", "num 1", "pos_fraction 0.25", "0 positive"]),
        ({"rpn_head": {"num": 1}}, ["model.rpn_head.num", "num 1", "pos_fraction 0.5", "0 positive"]),
        ({"roi_head": {"neg_pos_ub": 0}}, ["roi_head.neg_pos_ub 0", "negative"]),
        ({"kwargs": {"min_sise": 64}}, ["model.kwargs", "maskrcnn_tiny", "'min_sise'", "'min_size'"]),
        ({"kwargs": {"min_size": "big"}}, ["model.kwargs.min_size", "number", "'big'"]),
        ({"kwargs": {"box_score_thresh": [0.1]}}, ["model.kwargs.box_score_thresh", "number"]),
        ({"kwargs": {"box_score_thresh": 5}}, ["model.kwargs.box_score_thresh", "[0, 1]", "got 5"]),
        ({"kwargs": {"min_size": [64, 0]}}, ["model.kwargs.min_size", ">= 1", "[64, 0]"]),
        ({"kwargs": {"rpn_post_nms_top_n_train": 0}}, ["model.kwargs.rpn_post_nms_top_n_train", ">= 1"]),
        ({"name": "fasterrcnn_resnet50_fpn", "kwargs": {"box_nms_tresh": 0.4}},
         ["model.kwargs", "fasterrcnn_resnet50_fpn", "'box_nms_tresh'", "'box_nms_thresh'"]),
    ],
)  # fmt: skip
def test_model_keys_that_cannot_take_effect_fail_before_the_data(tmp_path, model, names):
    out = tmp_path / "out"
    name = ("--model", model.pop("name")) if "name" in model else ()  # the flag: argv names maskrcnn_tiny
    rc, _, err = cli(argv("/nonexistent.json", "/nonexistent", out, "--config", _yaml(tmp_path, model), *name))
    one_line_error_naming(rc, err, *names)
    assert files(out) == []


def test_over_detection_is_diagnosed_with_the_negative_cap():
    import diagnostics
    from train_config import defaults

    cfg = defaults().replace({"model.roi_head": {"neg_pos_ub": 0.1}})
    history = [{"dets_per_image": 100.0}]
    current = {"dets_per_image": 100.0, "max_score": 0.9, "score_thresh": 0.05, "per_class": {}}
    train = {"roi/pos_per_image": 5.0, "roi/neg_per_image": 0.0}
    w = diagnostics.collapse_warnings(history, current, train, cfg, gt_per_image=1.25)
    assert w[0].startswith("over-detection: ")
    assert_names(w[0], "100.0 detections", "0.05", "1.25 ground-truth")
    assert_names(w[1], "negative", "0.0 negatives", "5.0 positives", "neg_pos_ub 0.1")
    healthy = {"roi/pos_per_image": 5.0, "roi/neg_per_image": 100.0}
    falling = {"dets_per_image": 30.0, "max_score": 0.9, "score_thresh": 0.05, "per_class": {}}
    assert diagnostics.collapse_warnings(history, falling, healthy, cfg, gt_per_image=1.25) == []  # learning


def test_no_positive_roi_is_named_first_among_the_causes():
    import diagnostics
    from train_config import defaults

    history = [{"dets_per_image": 4.0, "max_score": 0.9, "score_thresh": 0.05, "train_loss": 1.0}]
    current = {"dets_per_image": 0.0, "max_score": 0.01, "score_thresh": 0.05, "per_class": {}}
    train = {"loss": 5.0, "roi/pos_per_image": 0.0, "roi/fg_prob": 0.1, "rpn/pos_per_image": 0.5, "world_size": 1}
    w = diagnostics.collapse_warnings(history, current, train, defaults(), gt_per_image=1.25)
    causes = [line for line in w if line.startswith("  likely cause")]
    assert_names(causes[0], "positive RoIs", "0.0 sampled")
    # A sampler the config narrowed is named first too, with its keys, ahead of the lr and the weights.
    cfg = defaults().replace({"model.roi_head": {"pos_fraction": 0.02}, "training.lr": 0.08})
    w = diagnostics.collapse_warnings(history, current, {**train, "roi/pos_per_image": 1.5}, cfg, gt_per_image=1.25)
    causes = [line for line in w if line.startswith("  likely cause")]
    assert_names(causes[0], "positive RoIs", "1.5 sampled", "pos_fraction 0.02")


# -- 6. the Lightning CLI (its every-key test: tests/recipes/test_lightning.py) ----------------------------
def _lightning_cli():
    import importlib.util

    pytest.importorskip("lightning.pytorch")
    spec = importlib.util.spec_from_file_location(
        "lightning_train", os.path.join(helpers.REFS, "lightning", "train.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.mark.slow
def test_lightning_builds_class_agnostic_heads_and_resolves_class_weight_auto(tmp_path, data_root):
    import yaml

    import models

    LT = _lightning_cli()
    cfg_path = helpers.tiny_config(tmp_path, data_root)
    cfg = yaml.safe_load(open(cfg_path))
    cfg["model"].update(class_agnostic_bbox=True, class_agnostic_mask=True, roi_head={"class_weight": "auto"})
    (tmp_path / "agnostic.yaml").write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args, resolved, loss_cfg = LT.parse(["--config", str(tmp_path / "agnostic.yaml"), "--max-epochs", "1"])
        LT.check_supported(resolved)
        run, data = LT.build_data(resolved, loss_cfg)
        module = LT.build_module(run.cfg, run.loss_cfg, data)
    assert "model.roi_head.class_weight: auto ->" in out.getvalue()
    weights = tv_lossfix_loss_cfg(module.model).roi_head.class_weight
    assert weights is not None and len(weights) == data.num_classes
    heads = module.model.roi_heads
    assert heads.box_predictor.bbox_pred.out_features == 4 and heads.mask_predictor.mask_fcn_logits.out_channels == 1
    assert module.hparams["class_agnostic_bbox"] and module.hparams["class_agnostic_mask"]
    # Its own checkpoint loads back as class-agnostic (and is refused, naming the key, without it).
    path = tmp_path / "agnostic.pth"
    torch.save(module.model.state_dict(), path)
    built, _ = models.build_model(name="maskrcnn_tiny", num_classes=data.num_classes, weights=str(path),
                                  class_agnostic_bbox=True, class_agnostic_mask=True)  # fmt: skip
    assert built.roi_heads.box_predictor.bbox_pred.out_features == 4
    with raises_naming(models.ModelError, f"--weights {path}", "model.class_agnostic_bbox"):
        models.build_model(name="maskrcnn_tiny", num_classes=data.num_classes, weights=str(path))


def tv_lossfix_loss_cfg(model):
    import tv_lossfix

    return tv_lossfix.get_loss_cfg(model)


# -- the "also weak" list ---------------------------------------------------------------------------------
def test_a_string_image_id_is_refused_naming_it(shapes, tmp_path):
    from checks import DataError, load_coco_checked

    data, images = make_set(shapes, tmp_path)
    old = data["images"][0]["id"]
    data["images"][0]["id"] = "img-a"
    for a in data["annotations"]:
        a["image_id"] = "img-a" if a["image_id"] == old else a["image_id"]
    with raises_naming(DataError, "image 'img-a'", "str", "integer"):
        load_coco_checked(write_json(tmp_path, data), images, "train", "drop")


def test_analyze_data_names_an_annotation_without_bbox(shapes, tmp_path, capsys):
    import analyze_data

    data, images = make_set(shapes, tmp_path)
    a = data["annotations"][2]
    del a["bbox"]
    ann = write_json(tmp_path, data)
    args = ["--dataset", "coco_json", "--train-ann", ann, "--model", "maskrcnn_tiny", "--device", "cpu"]
    from checks import DataError

    with raises_naming(DataError, f"annotation {a['id']} (image {a['image_id']}): ", "bbox None"):
        analyze_data.main(args)


def test_yaml_merge_keys_are_read():
    from tv_lossfix._yaml import DuplicateKeyError, load_yaml

    text = "base: &b\n  lr: 0.1\n  epochs: 3\ntraining:\n  <<: *b\n  lr: 0.2\n"
    assert load_yaml(text)["training"] == {"lr": 0.2, "epochs": 3}  # the key beside the merge wins, as YAML says
    with raises_naming(DuplicateKeyError, "'lr'", "twice", "lines 3 and 4"):
        load_yaml("training:\n  <<: {epochs: 3}\n  lr: 0.1\n  lr: 0.2\n")


@pytest.mark.parametrize("head", ["rpn_head", "roi_head"])
def test_a_focal_gamma_that_zeroes_the_loss_is_refused(head):
    from tv_lossfix import LossConfig, LossConfigError

    loss = "focal"
    with raises_naming(LossConfigError, f"{head}.focal_gamma 50", "<= 10", "8.9e-16", "p_t = 0.5"):
        LossConfig.from_dict({head: {"cls_loss": loss, "focal_gamma": 50}})
    assert LossConfig.from_dict({head: {"cls_loss": loss, "focal_gamma": 10}})


def test_training_curves_leave_out_what_a_resume_superseded():
    from visualize import current_records

    first = [{"type": "run", "resumed_from": None, "epoch": None, "iter": 0}]
    first += [{"type": "train", "iter": i} for i in (1, 2, 3, 4)] + [{"type": "eval", "epoch": e} for e in (0, 1)]
    resumed = [{"type": "run", "resumed_from": "out/model_0.pth", "epoch": 0, "iter": 2}]
    resumed += [{"type": "train", "iter": i, "new": True} for i in (3, 4)] + [{"type": "eval", "epoch": 1, "new": True}]
    kept = current_records(first + resumed)
    assert [(r["iter"], r.get("new", False)) for r in kept if r["type"] == "train"] == [
        (1, False), (2, False), (3, True), (4, True)
    ]  # fmt: skip
    assert [(r["epoch"], r.get("new", False)) for r in kept if r["type"] == "eval"] == [(0, False), (1, True)]


def test_a_class_without_training_objects_is_told_so_not_prescribed_a_weight():
    import diagnostics
    from train_config import defaults

    cure = diagnostics.rare_class_cure([40, 0, 5], 0.3, defaults(), names=["a", "ghost", "rare"])
    assert cure["untrained"] == ["ghost"]
    rows = {
        "a": {"gt": 10.0, "dets_per_image": 2.0, "recall": 0.9, "bbox_AP50": 0.8},
        "ghost": {"gt": 6.0, "dets_per_image": 0.0, "recall": 0.0, "bbox_AP50": 0.0},
    }
    current = {"dets_per_image": 2.0, "max_score": 0.9, "score_thresh": 0.05, "per_class": rows}
    w = diagnostics.collapse_warnings([], current, {}, defaults(), gt_per_image=2.0, cure=cure)
    assert w[0].startswith("class 'ghost': ")
    assert_names(w[0], "0 detections", "0.05", "6 ground-truth", "no training")
    assert not any("cure for rare classes" in line or "class_weight" in line for line in w)


@pytest.mark.slow
def test_test_only_refuses_weights_whose_predictors_would_be_replaced(first_run, tmp_path):
    import models

    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=7)
    path = tmp_path / "seven_classes.pth"
    torch.save(model.state_dict(), path)
    out = tmp_path / "out"
    args = argv(first_run["ann"], first_run["images"], out, "--test-only", "--weights", str(path))
    rc, _, err = cli(args)
    one_line_error_naming(rc, err, f"--test-only --weights {path}", "box_predictor")


@pytest.mark.slow
def test_a_read_only_metrics_file_mid_run_ends_in_one_line(first_run, tmp_path, monkeypatch):
    import writers

    calls = {"n": 0}
    real = writers.JsonlWriter.record

    def failing(self, rec):
        calls["n"] += 1
        if rec.get("type") == "eval":
            raise_os = OSError(30, "Read-only file system")
            with monkeypatch.context() as m:
                m.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(raise_os))
                return real(self, rec)
        return real(self, rec)

    monkeypatch.setattr(writers.JsonlWriter, "record", failing)
    out = tmp_path / "out"
    rc, _, err = cli(argv(first_run["ann"], first_run["images"], out))
    one_line_error_naming(rc, err, f"{out}/metrics.jsonl", "Read-only file system")
    assert {"checkpoint.pth", "model_0.pth"} <= set(files(out))  # the epoch was saved all the same
    assert ".tv_lossfix.lock" not in files(out)


def test_maskrcnn_tiny_refuses_a_misspelt_keyword_wherever_it_is_built():
    import models

    with raises_naming(models.ModelError, "maskrcnn_tiny", "'min_sise'", "'min_size'"):
        models.build_model(name="maskrcnn_tiny", num_classes=3, kwargs={"min_sise": 48})
    model, _ = models.build_model(name="maskrcnn_tiny", num_classes=3, kwargs={"min_size": 48})
    assert model.transform.min_size == (48,)


def test_runs_started_together_get_the_lock_one_at_a_time(tmp_path):
    import subprocess
    import sys
    import time

    out, sync = tmp_path / "out", tmp_path / "sync"
    out.mkdir()
    sync.mkdir()
    code = (  # import first (slow), then all take the lock at the same moment
        "import os, sys, time, training_checkpoint as t\n"
        f"open(os.path.join({str(sync)!r}, str(os.getpid())), 'w').close()\n"
        f"while not os.path.exists(os.path.join({str(sync)!r}, 'go')): time.sleep(0.005)\n"
        "try:\n"
        f"    t.acquire_lock({str(out)!r}); print('got')\n"
        "    end = time.time() + 120  # hold the lock until the 3 others were refused (no race with a sleep)\n"
        f"    while sum(n.startswith('r') for n in os.listdir({str(sync)!r})) < 3 and time.time() < end:\n"
        "        time.sleep(0.01)\n"
        "except t.CheckpointError as e:\n"
        f"    print('refused', e); open(os.path.join({str(sync)!r}, 'r' + str(os.getpid())), 'w').close()\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=helpers.child_env())
        for _ in range(4)
    ]
    deadline = time.time() + 120
    while len(os.listdir(sync)) < 4 and time.time() < deadline:
        time.sleep(0.05)
    (sync / "go").touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert sum(o.startswith("got") for o in outs) == 1, outs
    assert all(o.startswith("refused") and "is in use by process" in o for o in outs if not o.startswith("got"))


@pytest.mark.slow
def test_a_non_finite_step_names_the_images_of_its_batch(tmp_path, data_root, monkeypatch):
    import run_model

    real, seen = run_model.build_model, []

    def build(*a, **k):
        model, replaced = real(*a, **k)
        forward = model.forward

        def patched(images, targets=None):
            out = forward(images, targets)
            if model.training:
                seen.append([int(t["image_id"]) for t in targets])
                if len(seen) == 2:
                    out["loss_mask"] = out["loss_mask"] * float("nan")
            return out

        model.forward = patched
        return model, replaced

    monkeypatch.setattr(run_model, "build_model", build)
    cfg = helpers.tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg, "--no-data-report"]) == 2
    reason = helpers.records(tmp_path / "out", "stopped")[0]["reason"]
    ids = ", ".join(str(i) for i in seen[1])
    assert_names(reason, "non-finite", "loss_mask, grad_norm", "epoch 0", "iteration 1", f"images {ids} (")


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--dataset", "coco", "--train-ann", "a.json"], ["--train-ann", "--dataset coco_json", "--data-path"]),
        (["--dataset", "shapes", "--val-images", "imgs"], ["--val-images", "--dataset shapes"]),
        (["--weights", "x.pth", "--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1"],
         ["--weights-backbone ResNet50_Weights.IMAGENET1K_V1", "no effect", "--weights x.pth"]),
        (["--trainable-backbone-layers", "2"], ["--trainable-backbone-layers 2", "no effect", "--weights"]),
        (["--trainable-backbone-layers", "6", "--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1"],
         ["--trainable-backbone-layers", "model.trainable_backbone_layers", "0..5", "maskrcnn_resnet50"]),
        (["--model", "maskrcnn_tiny", "--trainable-backbone-layers", "2"],
         ["--trainable-backbone-layers", "maskrcnn_tiny"]),
    ],
)  # fmt: skip
def test_dataset_and_backbone_settings_that_cannot_take_effect_are_refused(tmp_path, flags, names):
    out = tmp_path / "out"
    rc, _, err = cli(["--device", "cpu", "--output-dir", str(out), *flags])
    one_line_error_naming(rc, err, *names)
    assert files(out) == []


def test_shapes_knobs_with_another_dataset_are_refused(tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  shapes:\n    num_train: 4\n")
    rc, _, err = cli(["--config", str(cfg), "--dataset", "coco", "--output-dir", str(out), "--device", "cpu"])
    one_line_error_naming(rc, err, "data.shapes", "no effect", "--dataset coco")


def test_lightning_may_share_a_folder_with_a_train_py_run(tmp_path):
    import train_config

    (tmp_path / "checkpoint.pth").write_bytes(b"a train.py run's")
    cfg = train_config.defaults().replace({"training.output_dir": str(tmp_path), "model.name": "maskrcnn_tiny"})
    with raises_naming(train_config.ConfigError, f"--output-dir {tmp_path}", "checkpoint"):
        train.check_before_data(cfg)
    train.check_before_data(cfg, own_files=False)  # Lightning writes lightning_logs/version_N there
