"""references/train.py against torchvision's references/detection: same command lines, same meaning,
nothing silently ignored (one test group per numbered item of the parity work)."""

import argparse
import os
import shlex
import urllib.error

import pytest
import torch
import yaml

from tv_lossfix.checkpoint import CheckpointNotFoundError

import distributed
import models
import run_context
import run_data
import run_model
import train
import train_config
import training_checkpoint
import writers
from helpers import TINY_SHAPES, assert_names, raises_naming, records, tiny_config

# torchvision's README commands for its two-stage models, and the v2 weights' recipes and checks.
TORCHVISION_COMMANDS = [
    "--dataset coco --model fasterrcnn_resnet50_fpn --epochs 26 --lr-steps 16 22 --aspect-ratio-group-factor 3 "
    "--weights-backbone ResNet50_Weights.IMAGENET1K_V1",
    "--dataset coco --model fasterrcnn_mobilenet_v3_large_fpn --epochs 26 --lr-steps 16 22 "
    "--aspect-ratio-group-factor 3 --weights-backbone MobileNet_V3_Large_Weights.IMAGENET1K_V1",
    "--dataset coco --model fasterrcnn_mobilenet_v3_large_320_fpn --epochs 26 --lr-steps 16 22 "
    "--aspect-ratio-group-factor 3 --weights-backbone MobileNet_V3_Large_Weights.IMAGENET1K_V1",
    "--dataset coco --model maskrcnn_resnet50_fpn --epochs 26 --lr-steps 16 22 --aspect-ratio-group-factor 3 "
    "--weights-backbone ResNet50_Weights.IMAGENET1K_V1",
    "--dataset coco_kp --model keypointrcnn_resnet50_fpn --epochs 46 --lr-steps 36 43 --aspect-ratio-group-factor 3 "
    "--weights-backbone ResNet50_Weights.IMAGENET1K_V1",
    "--dataset coco --model fasterrcnn_resnet50_fpn_v2 --epochs 400 --lr-steps 352 384 --lr 0.1 --batch-size 2 "
    "--weight-decay 0.00004 --sync-bn --data-augmentation lsj",
    "--dataset coco --model maskrcnn_resnet50_fpn_v2 --epochs 400 --lr-steps 352 384 --lr 0.1 --batch-size 2 "
    "--weight-decay 0.00004 --sync-bn --data-augmentation lsj --use-copypaste",
    "--test-only --weights MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1 --model maskrcnn_resnet50_fpn_v2 -b 1",
    "--data-path /data/coco --model maskrcnn_resnet50_fpn --opt SGD --lr-scheduler MultiStepLR --backend PIL "
    "--start_epoch 0 --use-v2 --amp --world-size 1 --dist-url env:// --print-freq 20 --output-dir out -j 8",
]


@pytest.mark.parametrize("command", TORCHVISION_COMMANDS)
def test_every_torchvision_command_resolves_under_print_config(command, capsys, tmp_path):
    argv = shlex.split(command)
    assert train.main(argv + ["--print-config"]) == 0  # no data is read: /datasets01 does not exist here
    printed = yaml.safe_load(capsys.readouterr().out)
    parsed = argparse.ArgumentParser()
    for flag in ("--model", "--dataset", "--epochs", "--lr", "--batch-size", "--weight-decay", "--data-augmentation"):
        parsed.add_argument(flag)
    parsed.add_argument("--lr-steps", nargs="+", type=int)
    known, _ = parsed.parse_known_args(argv)
    if known.model:
        assert printed["model"]["name"] == known.model
    if known.dataset:
        assert printed["data"]["dataset"] == known.dataset
    if known.epochs:
        assert printed["training"]["epochs"] == int(known.epochs)
    if known.lr:
        assert printed["training"]["lr"] == float(known.lr)
    if known.weight_decay:
        assert printed["training"]["weight_decay"] == float(known.weight_decay)
    if known.lr_steps:
        assert printed["training"]["lr_steps"] == known.lr_steps
    if known.data_augmentation:
        assert printed["data"]["augmentation"] == known.data_augmentation
    if not os.path.exists(printed["data"]["data_path"]):
        assert printed["data"]["data_path"] in (train_config.TORCHVISION_COCO_PATH, "/data/coco")


def test_torchvision_spellings_and_casing():
    cfg, _, _ = train_config.resolve(
        shlex.split("--opt SGD_Nesterov --lr-scheduler CosineAnnealingLR --backend TV_Tensor --use-v2 --start_epoch 3")
    )
    t = cfg.training
    assert (t.opt, t.lr_scheduler, t.start_epoch) == ("sgd_nesterov", "cosineannealinglr", 3)
    assert cfg.data.backend == "tv_tensor" and cfg.data.use_v2
    cfg, _, _ = train_config.resolve(["--start-epoch", "2", "--backend", "pil"])  # our kebab-case alias
    assert cfg.training.start_epoch == 2
    with raises_naming(train_config.ConfigError, "--backend tv_tensor", "--use-v2"):
        train_config.resolve(["--backend", "tv_tensor"])
    with raises_naming(train_config.ConfigError, "--use-copypaste", "--data-augmentation lsj"):
        train_config.resolve(["--use-copypaste"])


def test_help_shows_real_defaults_once(capsys):
    with pytest.raises(SystemExit):
        train_config.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "/datasets01/COCO/022719/" in text and "__" not in text
    assert "(default: 26)" in text and "(default: 26) (default" not in text
    assert "default: --wd) (default" not in text


def test_sgd_nesterov_is_built(tmp_path):
    cfg, loss, _ = train_config.resolve(["--opt", "sgd_nesterov", "--lr", "0.01"])
    run = run_context.Run(cfg, loss, torch.device("cpu"), 0, writers.EventWriter("", False), "")
    opt, _, _, _ = run_model.build_optimization(run, torch.nn.Linear(2, 2), 10)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]


def test_slurm_and_world_size(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed.detect(1) == distributed.DistInfo(5, 16, 1, "slurm")
    assert distributed.detect(8).world_size == 8  # --world-size wins, as torchvision reads it
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.detect(1) == distributed.DistInfo(2, 4, 2, "torchrun")  # torchrun first, as torchvision


def test_slurm_without_rendezvous_says_what_to_set(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with raises_naming(RuntimeError, "SLURM", "--dist-url env://", "MASTER_ADDR and MASTER_PORT", "--dist-url tcp://"):
        distributed.init(distributed.DistInfo(0, 2, 0, "slurm"), "cpu", None, "env://")


# -- 4. torchvision's rules --------------------------------------------------------------------------
def test_coco_with_keypoint_model_names_coco_kp():
    with raises_naming(train_config.ConfigError, "--model keypointrcnn_", "--dataset coco_kp"):
        train_config.resolve(["--model", "keypointrcnn_resnet50_fpn"])


def test_num_classes_defaults_as_torchvision():
    for dataset, model, n in (("coco", "maskrcnn_resnet50_fpn", 91), ("coco_kp", "keypointrcnn_resnet50_fpn", 2)):
        cfg = train_config.resolve(["--dataset", dataset, "--model", model])[0]
        assert run_data._num_classes(cfg, {1: 1}) == n
    cfg = train_config.resolve(["--dataset", "shapes"])[0]
    assert run_data._num_classes(cfg, {7: 1, 9: 2, 11: 3}) == 4
    cfg = train_config.resolve(["--dataset", "coco", "--num-classes", "5"])[0]
    with raises_naming(train_config.ConfigError, "model.num_classes=5", "90", "use 91"):
        run_data._num_classes(cfg, {90: 90})


def _tiny_checkpoint(path, num_classes=5):
    torch.manual_seed(0)
    model = models.maskrcnn_tiny(num_classes)
    torch.save({"model": model.state_dict()}, path)
    return model


def test_weights_checkpoint_for_maskrcnn_tiny_with_other_num_classes(tmp_path):
    src = _tiny_checkpoint(tmp_path / "tiny5.pth", 5)
    model, report = models.build_model(name="maskrcnn_tiny", num_classes=3, weights=str(tmp_path / "tiny5.pth"))
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert report.replaced == (
        "roi_heads.box_predictor (5 -> 3 classes)",
        "roi_heads.mask_predictor.mask_fcn_logits (5 -> 3 classes; mask_predictor.conv5_mask kept)",
    )
    torch.testing.assert_close(model.backbone.body.stem[0].weight, src.backbone.body.stem[0].weight)
    torch.testing.assert_close(
        model.roi_heads.mask_predictor.conv5_mask.weight, src.roi_heads.mask_predictor.conv5_mask.weight
    )


@pytest.mark.slow
def test_fine_tune_run_says_which_layers_were_replaced(tmp_path, capsys, data_root):
    _tiny_checkpoint(tmp_path / "tiny5.pth", 7)
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1)
    assert train.main(["--config", cfg, "--weights", str(tmp_path / "tiny5.pth")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"--weights {tmp_path / 'tiny5.pth'}"))
    assert_names(line, "num_classes 5", "roi_heads.box_predictor (7 -> 5")


# -- 5. resume never ignores a flag --------------------------------------------------------------------
@pytest.mark.slow
def test_resume_applies_lr_refuses_model_and_keeps_config(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, epochs=2, iters_per_epoch=2)
    assert train.main(["--config", cfg, "--epochs", "1"]) == 0
    out = tmp_path / "out"
    original = (out / "config.yaml").read_text()
    ckpt = str(out / "checkpoint.pth")
    capsys.readouterr()
    assert train.main(["--config", cfg, "--resume", ckpt, "--lr", "0.001"]) == 0
    said = capsys.readouterr().out
    assert_names(next(x for x in said.splitlines() if "training.lr: 0.01 -> 0.001" in x), "applied")
    assert (out / "config.yaml").read_text() == original  # never overwritten
    resumed = yaml.safe_load((out / "config.resume-epoch1.yaml").read_text())
    assert resumed["training"]["lr"] == 0.001
    lrs = [r["lr"] for r in records(out, "train") if r["epoch"] == 1]
    assert lrs and all(abs(lr - 0.001) < 1e-12 for lr in lrs)  # warmup was over: the new lr is what ran
    # a resume's refusals: a line naming the checkpoint, then one per key
    with raises_naming(
        training_checkpoint.CheckpointError, f"--resume {ckpt}", "training.seed: 0 -> 3 refused", one_line=False
    ):
        train.main(["--config", cfg, "--resume", ckpt, "--seed", "3", "--epochs", "3"])  # epochs 0, 1 done
    with raises_naming(
        training_checkpoint.CheckpointError, f"--resume {ckpt}", "maskrcnn_tiny", "--model fasterrcnn_resnet50_fpn"
    ):
        train.main(["--config", cfg, "--resume", ckpt, "--model", "fasterrcnn_resnet50_fpn", "--test-only"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "gpu",
    [False, pytest.param(True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
    ids=["without-cuda", "with-cuda"],
)
def test_saved_config_records_what_ran(tmp_path, data_root, monkeypatch, capsys, gpu):
    """--device cuda --amp asked: the saved config says what ran (the CPU in float32 without a GPU)."""
    if not gpu:  # also on a CUDA machine: the fallback is what a CPU-only machine runs
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1)
    assert train.main(["--config", cfg, "--device", "cuda", "--amp", "--no-data-report"]) == 0
    said = capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (saved["training"]["device"], saved["training"]["amp"]) == (("cuda", True) if gpu else ("cpu", False))
    assert ("CUDA is not available: running on the CPU" in said) is not gpu
    assert ("--amp needs CUDA" in said) is not gpu
    assert saved["distributed"]["world_size"] == 1 and saved["data"]["shapes"].items() >= TINY_SHAPES.items()


@pytest.mark.slow
def test_output_dir_empty_saves_nothing(tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, plots=True, gallery_images=1)
    before = set(os.listdir(tmp_path))
    assert train.main(["--config", cfg, "--output-dir", ""]) == 0
    assert set(os.listdir(tmp_path)) == before


# -- 6. YAML as users write it -----------------------------------------------------------------------
def test_yaml_numbers_and_duplicate_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  lr: 1e-3\n  weight_decay: 5e-5\n")
    cfg = train_config.resolve(["--config", str(p)])[0]
    assert cfg.training.lr == 0.001 and cfg.training.weight_decay == 5e-05
    p.write_text("training:\n  lr: 0.01\n  batch_size: 2\n  lr: 0.02\n")
    with raises_naming(train_config.ConfigError, str(p), "'lr'", "twice", "lines 2 and 4"):
        train_config.resolve(["--config", str(p)])


# -- 7. one-line errors before any data is read --------------------------------------------------------
@pytest.mark.parametrize(
    "argv, error, names",
    [
        (
            ["--model", "maskrcnn_resnet50_fpnn"],
            models.ModelError,
            ["'maskrcnn_resnet50_fpnn'", "'maskrcnn_resnet50_fpn'"],
        ),
        (
            ["--weights", "MaskRCNN_ResNet50_FPN_Weights.COCO_V2"],
            models.ModelError,
            ["--weights", "COCO_V2", "maskrcnn_resnet50_fpn", "DEFAULT, MaskRCNN_ResNet50_FPN_Weights.COCO_V1"],
        ),
        (
            ["--weights-backbone", "ResNet50_Weights.IMAGENET9K"],
            models.ModelError,
            ["--weights-backbone", "IMAGENET9K", "ResNet50_Weights.IMAGENET1K_V2"],
        ),
        (["--device", "gpu"], train_config.ConfigError, ["--device 'gpu'", "cpu"]),
        (
            ["--weights", "nowhere/model.pth"],
            CheckpointNotFoundError,
            ["--weights: ", "not found", "nowhere/model.pth"],
        ),
    ],
)
def test_errors_before_data(argv, error, names):
    with raises_naming(error, *names) as e:
        train.main(argv + ["--data-path", "/nonexistent/coco"])
    assert str(e.value).startswith(argv[0])  # the flag comes first


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with raises_naming(train_config.ConfigError, f"--output-dir {str(f)!r}", "file"):
        train.main(["--output-dir", str(f), "--data-path", "/nonexistent"])


def test_weights_offline_says_where_the_file_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    member = models.resolve_weights("maskrcnn_resnet50_fpn", "DEFAULT")
    expected = os.path.join(str(tmp_path), "hub", "checkpoints", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth")
    with raises_naming(models.ModelError, member.url, expected):  # what to fetch and where it goes
        models.ensure_weights_file(member)
    with raises_naming(models.ModelError, "--weights", member.url):  # before any data is read
        train.main(["--weights", "DEFAULT", "--data-path", "/nonexistent/coco", "--device", "cpu"])
    with raises_naming(models.ModelError, "--weights-backbone ResNet50_Weights.IMAGENET1K_V1", "download"):
        train.main(["--weights-backbone", "ResNet50_Weights.IMAGENET1K_V1", "--data-path", "/nonexistent/coco"])
    os.makedirs(os.path.dirname(expected))
    open(expected, "wb").close()
    models.ensure_weights_file(member)  # cached: nothing to download


def test_torchvision_reference_checkpoint_loads_safely(tmp_path):
    model = _tiny_checkpoint(tmp_path / "unused.pth")
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    args = argparse.Namespace(model="maskrcnn_tiny", lr=0.02, epochs=26, weights=None)
    path = tmp_path / "tv.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "args": args, "epoch": 3}, path)
    ckpt = training_checkpoint.load_training_checkpoint(str(path))
    assert ckpt["args"].model == "maskrcnn_tiny" and training_checkpoint.checkpoint_model_name(ckpt) == "maskrcnn_tiny"
    built, report = models.build_model(name="maskrcnn_tiny", num_classes=5, weights=str(path))
    assert report.replaced == () and built.roi_heads.box_predictor.cls_score.out_features == 5

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": model.state_dict(), "payload": Evil()}, tmp_path / "evil.pth")
    with raises_naming(training_checkpoint.CheckpointError, str(tmp_path / "evil.pth"), "cannot read"):
        training_checkpoint.load_training_checkpoint(str(tmp_path / "evil.pth"))


# -- 1. augmentation: the model's input follows the policy ----------------------------------------------
@pytest.mark.slow
def test_lsj_sets_the_input_size_and_the_model_does_not_resize_back(tmp_path, monkeypatch, data_root):
    seen = []
    real = run_model.build_model

    def build(*a, **k):
        model, replaced = real(*a, **k)
        model.backbone.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
        return model, replaced

    monkeypatch.setattr(run_model, "build_model", build)
    cfg = tiny_config(tmp_path, data_root, data={"lsj_size": 64}, iters_per_epoch=2, plots=False)
    assert train.main(["--config", cfg, "--data-augmentation", "lsj", "--use-copypaste", "--no-data-report"]) == 0
    # tiny_config's model resizes to 64 px; lsj_size 64 too above, so use another size below.
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=2, plots=False)  # hflip reads no data.lsj_size
    assert train.main(["--config", cfg, "--data-augmentation", "hflip", "--no-data-report", "--overwrite"]) == 0
    assert seen[0] == (64, 64)
    p = tmp_path / "lsj.yaml"
    data = yaml.safe_load(open(cfg))
    data["data"]["lsj_size"] = 96
    p.write_text(yaml.safe_dump(data))
    seen.clear()
    assert train.main(["--config", str(p), "--data-augmentation", "lsj", "--no-data-report", "--overwrite"]) == 0
    assert seen[0] == (96, 96)  # training input at the policy's size: no resize back to 64
    assert seen[-1] == (64, 64)  # evaluation still resizes, as torchvision


def test_keypoint_models_refuse_policies_that_would_not_move_keypoints():
    from data import DetectionPresetTrain

    with raises_naming(ValueError, "--data-augmentation lsj", "keypoints"):
        DetectionPresetTrain("lsj", with_keypoints=True)
    DetectionPresetTrain("hflip", with_keypoints=True)


@pytest.mark.slow
def test_banner_prints_only_changed_loss_settings(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    assert "losses: torchvision's defaults" in capsys.readouterr().out
    p = tmp_path / "w.yaml"
    data = yaml.safe_load(open(cfg))
    data["model"]["roi_head"] = {"cls_pos_weight": 2.0}
    p.write_text(yaml.safe_dump(data))
    assert train.main(["--config", str(p), "--no-data-report", "--overwrite"]) == 0
    assert "losses: roi_head.cls_pos_weight=2.0;" in capsys.readouterr().out
