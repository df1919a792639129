"""The training recipe on bad inputs: each fails in one line naming the file / image / annotation at
fault, or is handled and said. Every bad file is made here, on a 6-image COCO set."""

import copy
import errno
import json
import multiprocessing
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tv_lossfix import LossConfig, LossConfigError

import errors
import helpers
import train_config
import training_checkpoint
import writers
from checks import DataError, check_samples, load_coco_checked
from data import CocoDetection
from helpers import assert_names, cli, make_set, one_line_error_naming, raises_naming, write_json
from shapes import ShapesSpec, ensure_shapes

SPEC = ShapesSpec(num_train=6, num_val=3, image_size=64, min_size=12, max_size=30, empty_fraction=0.3, seed=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes(str(tmp_path_factory.mktemp("edges_data")), SPEC)


def argv(ann, images, out, *extra, val_ann=None):
    return helpers.coco_json_argv(ann, images, out, "--check-samples", "2", *extra, val_ann=val_ann)


def file_of(data, image_id):
    return next(i["file_name"] for i in data["images"] if i["id"] == image_id)


# -- 1. duplicate annotation ids --------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["stop", "drop"])
def test_duplicate_annotation_id_is_refused_under_both_policies(shapes, tmp_path, policy):
    data, images = make_set(shapes, tmp_path)
    good = write_json(tmp_path, data, "good.json")
    data["annotations"][3]["id"] = data["annotations"][0]["id"]  # annotation 4 (image 2) takes id 1 (image 1)
    ann = write_json(tmp_path, data)
    with raises_naming(DataError, "annotation id 1", "images 1 and 2", "pycocotools", "drop", one_line=False):
        load_coco_checked(ann, images, "val", policy=policy)
    # Through the command line, as the val file (read first): one line, nothing but the start written.
    out = tmp_path / "out"
    rc, _, err = cli(argv(good, images, out, "--bad-annotations", policy, val_ann=ann))
    one_line_error_naming(rc, err, f"error: val: {ann}", "annotation id 1", "images 1 and 2")
    assert not (out / "checkpoint.pth").exists() and not (out / "model_0.pth").exists()


# -- 2. 16-bit PNGs -----------------------------------------------------------------------------------
def _png16_rgb(path, rgb16):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _uint8(coco, images, label_map, backend, idx):
    return CocoDetection(coco, images, label_map, lambda i, t: (i, t), backend)[idx][0]


def test_16bit_grey_png_is_scaled_by_its_bit_depth_and_said(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    path = os.path.join(images, file_of(data, 2))
    grey8 = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)  # 0..255 -> 0..65535
    assert Image.open(path).mode == "I;16"
    coco, label_map, _, report = load_coco_checked(write_json(tmp_path, data), images, "train")
    assert_names(
        next(x for x in report.summary().splitlines() if "image 2: " in x), "train: ", "16-bit", "65535 -> 255"
    )
    expected = torch.from_numpy(grey8.copy())[None].expand(3, -1, -1)  # (v * 257) >> 8 == v
    idx = sorted(coco.imgs).index(2)
    for backend in ("pil", "tensor"):
        image = _uint8(coco, images, label_map, backend, idx)
        assert image.dtype == torch.uint8 and torch.equal(image, expected), backend
    assert expected.float().std() > 10  # a real picture, where convert("RGB") clipped nearly all of it to 255


def test_16bit_rgb_png_gives_the_same_pixels_with_both_backends(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    path = os.path.join(images, file_of(data, 1))
    rgb16 = np.random.default_rng(0).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    _png16_rgb(path, rgb16)
    coco, label_map, _, _ = load_coco_checked(write_json(tmp_path, data), images, "train")
    idx = sorted(coco.imgs).index(1)
    high_byte = torch.from_numpy((rgb16 >> 8).astype(np.uint8)).permute(2, 0, 1)
    for backend in ("pil", "tensor"):
        assert torch.equal(_uint8(coco, images, label_map, backend, idx), high_byte), backend


def test_32bit_float_image_is_refused_naming_it(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    data["images"][0]["file_name"] = "float.tif"
    Image.fromarray(np.full((64, 64), 0.5, np.float32)).save(os.path.join(images, "float.tif"))
    with raises_naming(DataError, "image 1: ", "float.tif", "mode F", one_line=False):
        load_coco_checked(write_json(tmp_path, data), images, "train")


# -- 3. --clip-grad-norm ----------------------------------------------------------------------------
def test_negative_clip_grad_norm_is_an_error_and_zero_is_off(tmp_path, data_root):
    cfg = helpers.tiny_config(tmp_path, data_root)
    with raises_naming(train_config.ConfigError, "training.clip_grad_norm", "--clip-grad-norm", ">= 0", "-5"):
        train_config.resolve(["--config", cfg, "--clip-grad-norm", "-5"])
    with raises_naming(train_config.ConfigError, "training.clip_grad_norm", ">= 0", "-5"):
        train_config.resolve(["--config", helpers.tiny_config(tmp_path, data_root, clip_grad_norm=-5)])
    off, _, _ = train_config.resolve(["--config", cfg, "--clip-grad-norm", "0"])
    assert off.training.gradient_clip.enabled is False
    on, _, _ = train_config.resolve(["--config", cfg, "--clip-grad-norm", "7"])
    assert on.training.gradient_clip == train_config.GradientClipConfig(enabled=True, max_norm=7.0, norm_type=2.0)


# -- 4., 8. metrics.jsonl is strict JSON with run markers; stale temp files are removed ---------------
def _strict(line):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_run(shapes, tmp_path_factory):
    """One normal run (data report on), with an interrupted run's temp files in its output folder."""
    root = tmp_path_factory.mktemp("tiny_run")
    data, images = make_set(shapes, root)
    ann = write_json(root, data)
    out = root / "out"
    out.mkdir()
    stale = ["checkpoint.pth.tmp4999999", "model_3.pth.tmp4999998", "config.yaml.tmp4999997"]
    kept = ["notes.tmp123", "model_1.pth.tmpx", f"checkpoint.pth.tmp{os.getppid()}"]  # not ours / a live writer
    for name in stale + kept:
        (out / name).write_bytes(b"half")
    rc, stdout, err = cli(argv(ann, images, out))
    assert rc == 0, err
    return {"out": out, "stdout": stdout, "ann": ann, "images": images, "stale": stale, "kept": kept}


@pytest.mark.slow
def test_metrics_jsonl_is_strict_json_with_a_run_id(tiny_run):
    lines = (tiny_run["out"] / "metrics.jsonl").read_text().splitlines()
    recs = [_strict(line) for line in lines]
    assert recs[0] == {**recs[0], "type": "run", "resumed_from": None, "epoch": None, "iter": 0}
    assert len({r["run"] for r in recs}) == 1 and all(r["run"] for r in recs)
    assert {"data", "data_report", "train", "eval"} <= {r["type"] for r in recs}


def test_non_finite_values_are_written_as_null(tmp_path):
    log = writers.EventWriter(str(tmp_path), True)
    log.record(
        {
            "type": "x",
            "nan": float("nan"),
            "nested": {"inf": [1.0, float("inf"), -float("inf")], "t": torch.tensor(float("nan"))},
            "np": np.float32("nan"),
            "ok": np.float64(0.5),
            "n": np.int64(3),
        }
    )
    rec = _strict((tmp_path / "metrics.jsonl").read_text())
    assert rec["nan"] is None and rec["nested"] == {"inf": [1.0, None, None], "t": None}
    assert rec["np"] is None and rec["ok"] == 0.5 and rec["n"] == 3 and rec["run"] == log.run_id


@pytest.mark.slow
def test_a_resumed_run_marks_where_it_continues(tiny_run):
    out = tiny_run["out"]
    ckpt = str(out / "checkpoint.pth")
    before = len((out / "metrics.jsonl").read_text().splitlines())
    rc, _, err = cli(argv(tiny_run["ann"], tiny_run["images"], out, "--epochs", "2", "--resume", ckpt))
    assert rc == 0, err
    recs = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, new = recs[0], recs[before:]
    start = new[0]
    assert start["type"] == "run" and start["resumed_from"] == ckpt and start["epoch"] == 0 and start["iter"] == 2
    assert start["run"] != first["run"] and {r["run"] for r in new} == {start["run"]}
    assert any(r["type"] == "eval" and r["epoch"] == 1 for r in new)


@pytest.mark.slow
def test_stale_temp_files_are_removed_at_start_and_said(tiny_run):
    out = tiny_run["out"]
    for name in tiny_run["stale"]:
        assert not (out / name).exists(), name
    for name in tiny_run["kept"]:
        assert (out / name).exists(), name
    assert_names(tiny_run["stdout"], "removed 3 temp file(s)", f"{out}: ")
    assert not [p for p in os.listdir(out) if ".tmp" in p and p not in tiny_run["kept"]]


# -- 5. file names outside the image folder -------------------------------------------------------------
@pytest.mark.parametrize("name", ["../secret/1.png", "/etc/secret.png", "sub/../../x.png"])
def test_file_name_outside_the_image_folder_is_refused(shapes, tmp_path, name):
    data, images = make_set(shapes, tmp_path)
    data["images"][2]["file_name"] = name
    for policy in ("stop", "drop"):
        with raises_naming(DataError, "train: ", f"image 3: file_name '{name}'", "outside", one_line=False):
            load_coco_checked(write_json(tmp_path, data), images, "train", policy=policy)


def test_subfolders_inside_the_image_folder_are_fine(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    os.makedirs(os.path.join(images, "sub"))
    shutil.move(os.path.join(images, file_of(data, 3)), os.path.join(images, "sub", "three.png"))
    data["images"][2]["file_name"] = "sub/three.png"
    data["images"][3]["file_name"] = "sub/../" + data["images"][3]["file_name"]
    _, _, _, report = load_coco_checked(write_json(tmp_path, data), images, "train")
    assert report.images == 6 and not report.problems


# -- 6. truncated images ---------------------------------------------------------------------------------
def _truncate(images, data, image_id):
    path = os.path.join(images, file_of(data, image_id))
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])  # header intact: the size check passes
    return path


@pytest.mark.slow
def test_truncated_png_is_one_line_naming_the_image(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    path = _truncate(images, data, 5)
    ann = write_json(tmp_path, data)
    coco, label_map, _, _ = load_coco_checked(ann, images, "train")  # the header reads fine
    idx = sorted(coco.imgs).index(5)
    for backend, reason in (("pil", "OSError: "), ("tensor", "RuntimeError: ")):  # the decoder's own reason
        ds = CocoDetection(coco, images, label_map, backend=backend)
        with raises_naming(DataError, path, reason) as info:
            ds[idx]
        assert str(info.value).startswith("image 5: ")
    # The sample check (which decodes) reports it among the first --check-samples images.
    problems = check_samples(CocoDetection(coco, images, label_map), num_classes=5, count=6)
    assert len(problems) == 1 and problems[0].startswith("image 5: ")
    assert_names(problems[0], path, "OSError: ", one_line=True)
    # Past the sample check, in a DataLoader worker: re-raised in the main process, printed as one line.
    out = tmp_path / "out"
    before = set(multiprocessing.active_children())
    rc, _, err = cli(argv(ann, images, out, "--check-samples", "0", "-j", "1", "--iters-per-epoch", "3"))
    one_line_error_naming(rc, err, "error: image 5: ", path, "OSError: ")
    assert not (out / "checkpoint.pth").exists()
    # The loader's worker is shut down with the error: it ignores the stop signals, so a worker kept
    # alive by the reported error's traceback would hold the interpreter at exit.
    assert [p for p in multiprocessing.active_children() if p not in before] == []


# -- 7. a disk that fills during a save ----------------------------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder):
    return [p for p in os.listdir(folder) if ".tmp" in p]


def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    training_checkpoint.atomic_save({"epoch": 0, "w": torch.arange(3)}, path)
    monkeypatch.setattr(torch, "save", _no_space)
    with raises_naming(training_checkpoint.CheckpointError, f"{path}: {os.strerror(errno.ENOSPC)}"):
        training_checkpoint.atomic_save({"epoch": 1}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3)) and not _leftovers(tmp_path)
    text = str(tmp_path / "config.yaml")
    training_checkpoint.atomic_write_text("a: 1\n", text)
    monkeypatch.setattr(os, "fsync", _no_space)
    with raises_naming(training_checkpoint.CheckpointError, f"{text}: {os.strerror(errno.ENOSPC)}"):
        training_checkpoint.atomic_write_text("a: 2\n", text)
    monkeypatch.undo()
    assert open(text).read() == "a: 1\n" and not _leftovers(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_real_enospc_inside_torch_save_is_one_line(tmp_path, monkeypatch):
    # torch.save on a full disk: RuntimeError("unexpected pos ...") chained to the OSError.
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, open("/dev/full", "wb")))
    path = str(tmp_path / "model_0.pth")
    with pytest.raises(training_checkpoint.CheckpointError) as info:
        training_checkpoint.atomic_save({"w": torch.zeros(1000)}, path)
    # the file and the OS reason, not torch's "unexpected pos"
    assert_names(info.value, f"{path}: ", os.strerror(errno.ENOSPC), one_line=True)
    assert not _leftovers(tmp_path) and not os.path.exists(path)


@pytest.mark.slow
def test_full_disk_during_training_ends_in_one_line(shapes, tmp_path, monkeypatch):
    data, images = make_set(shapes, tmp_path)
    out = tmp_path / "out"
    monkeypatch.setattr(torch, "save", _no_space)
    rc, _, err = cli(argv(write_json(tmp_path, data), images, out, "--iters-per-epoch", "1", "--no-data-report"))
    one_line_error_naming(rc, err, f"{out}/", ".pth", os.strerror(errno.ENOSPC))
    assert not _leftovers(out) and not [p for p in os.listdir(out) if p.endswith(".pth")]
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").exists()


# -- 9. output folder, config encoding, class_weight --------------------------------------------------
def test_output_dir_under_a_file_is_one_line(tmp_path, data_root):
    (tmp_path / "a").write_text("a file")
    rc, _, err = cli(["--config", helpers.tiny_config(tmp_path, data_root), "--output-dir", str(tmp_path / "a" / "b")])
    one_line_error_naming(rc, err, f"--output-dir '{tmp_path}/a/b': {tmp_path}/a ", "file")
    assert (tmp_path / "a").read_text() == "a file"


def test_non_utf8_yaml_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("training:\n  lr: 0.01  # caf\u00e9\n".encode("latin-1"))
    rc, _, err = cli(["--config", str(bad)])
    one_line_error_naming(rc, err, f"error: --config {bad}: ", "UTF-8", "0xe9", "line 2")
    with raises_naming(LossConfigError, "UTF-8", "0xe9", "line 2") as info:
        LossConfig.from_yaml(bad)
    assert str(info.value).startswith(f"{bad}: ")


@pytest.mark.slow
def test_class_weight_of_the_wrong_length_is_one_line(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    cfg = tmp_path / "cw.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"roi_head": {"class_weight": [1.0, 2.0, 3.0]}}}))
    out = tmp_path / "out"
    rc, _, err = cli(argv(write_json(tmp_path, data), images, out, "--config", str(cfg), "--no-data-report"))
    one_line_error_naming(rc, err, "model.roi_head.class_weight", "3 entries", "5 classes")  # 4 shapes + background
    assert not (out / "checkpoint.pth").exists()
    assert issubclass(LossConfigError, errors.USER_ERRORS)


# -- 10. no objects, string sizes, EXIF orientation ---------------------------------------------------
def test_training_set_without_objects_is_a_warning(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    empty = dict(copy.deepcopy(data), annotations=[])
    _, _, _, report = load_coco_checked(write_json(tmp_path, empty), images, "train")
    line = next(x for x in report.summary().splitlines() if x.startswith("WARNING: "))
    assert_names(line, "train: ", "no objects", "6 images", "background")
    crowd = copy.deepcopy(data)
    for a in crowd["annotations"]:
        a["iscrowd"] = 1
    _, _, _, report = load_coco_checked(write_json(tmp_path, crowd), images, "val")
    assert len(report.notes) == 1 and report.notes[0].startswith("WARNING: val: ")
    assert_names(report.notes[0], "no objects", "6 images", "9 crowd", "AP", "(-1)", one_line=True)


def test_dropping_every_object_is_an_error(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    for a in data["annotations"]:
        a["category_id"] = 42
    with raises_naming(DataError, "train: ", "--bad-annotations drop", "no object", "9 annotations", "0 images"):
        load_coco_checked(write_json(tmp_path, data), images, "train", policy="drop")
    for img in data["images"]:
        img["file_name"] = "gone.png"
    with raises_naming(DataError, "train: ", "no images", "6 dropped", "--bad-annotations drop"):
        load_coco_checked(write_json(tmp_path, data), images, "train", policy="drop")


def test_width_given_as_a_string_says_so(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    data["images"][1]["width"] = "64"
    with raises_naming(DataError, "image 2 (train_00002.png): ", "width '64'", "str", one_line=False):
        load_coco_checked(write_json(tmp_path, data), images, "train", policy="drop")


def test_exif_rotated_jpeg_size_mismatch_names_the_tag(shapes, tmp_path):
    data, images = make_set(shapes, tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("RGB", (48, 64), (90, 20, 20)).save(os.path.join(images, "phone.jpg"), exif=exif)  # stored 48 wide
    data["images"][3].update(file_name="phone.jpg", width=64, height=48)  # the JSON has the displayed size
    with pytest.raises(DataError) as info:
        load_coco_checked(write_json(tmp_path, data), images, "train")
    msg = str(info.value)
    line = next(x for x in msg.splitlines() if "image 4: " in x)  # the stored size, the JSON's, the tag's value
    assert_names(line, "phone.jpg", "48x64", "64x48", "EXIF orientation", "6", "90 degrees", "torchvision")
    # Which is true of both backends: the stored 48-wide pixels, unrotated.
    from torchvision.io import ImageReadMode, decode_image, read_file

    assert decode_image(read_file(os.path.join(images, "phone.jpg")), mode=ImageReadMode.RGB).shape == (3, 64, 48)
    data["images"][3].update(width=48, height=64)
    coco, label_map, _, _ = load_coco_checked(write_json(tmp_path, data), images, "train")
    idx = sorted(coco.imgs).index(4)
    for backend in ("pil", "tensor"):
        assert _uint8(coco, images, label_map, backend, idx).shape == (3, 64, 48), backend
