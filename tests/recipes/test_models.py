"""train.py's --weights: it says what the builder replaced and the checkpoint's class names from the
builder's report (tv_lossfix.builders.BuildReport); a missing checkpoint is one error, in one line."""

import torch
from torchvision.models import detection as tvdet

from tv_lossfix.checkpoint import CheckpointNotFoundError

import errors
import models
import train
from helpers import assert_names, one_line_error_naming, raises_naming, tiny_config


def test_a_missing_checkpoint_is_one_line_from_weights_and_resume(tmp_path, data_root, capsys):
    missing = tmp_path / "missing.pth"
    cfg = tiny_config(tmp_path, data_root)
    for flag in ("--weights", "--resume"):
        assert train.cli(["--config", cfg, flag, str(missing)]) == 1
        one_line_error_naming(1, capsys.readouterr().err, f"error: {flag}: ", str(missing), "not found")
        # The library's type: a CheckpointError (errors.USER_ERRORS) and a FileNotFoundError.
        with raises_naming(CheckpointNotFoundError, str(missing), "not found") as info:
            train.main(["--config", cfg, flag, str(missing)])
        assert str(info.value).startswith(f"{flag}: ")
    assert issubclass(CheckpointNotFoundError, errors.USER_ERRORS)
    assert not (tmp_path / "out").exists()  # stopped before the run made its output folder


def test_build_model_reports_a_replaced_keypoint_predictor(monkeypatch):
    # No download: torchvision's loader is fed a COCO-shaped (17 keypoints) state_dict, frozen BN as pretrained.
    from torchvision.models._api import WeightsEnum
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    coco = tvdet.KeypointRCNN(_resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=2)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: coco.state_dict())
    model, report = models.build_model(
        name="keypointrcnn_resnet50_fpn", num_classes=2, weights="DEFAULT", kwargs={"num_keypoints": 4}
    )
    assert len(report.replaced) == 1
    assert_names(report.replaced[0], "roi_heads.keypoint_predictor", "17 -> 4", one_line=True)
    assert report.checkpoint_settings == {}
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 4


def test_weights_report_says_replaced_layers_and_other_class_names(tmp_path, data_root, capsys):
    # Trained on 4 other classes (5 with background, as the shapes data): same count, other names.
    torch.manual_seed(0)
    path = tmp_path / "other_classes.pth"
    other = ["a", "b", "c", "d"]
    torch.save({"model": models.maskrcnn_tiny(5).state_dict(), "model_settings": {"class_names": other}}, path)
    model, report = models.build_model(name="maskrcnn_tiny", num_classes=5, weights=str(path))
    assert report.replaced == () and report.checkpoint_settings == {"class_names": other}
    cfg = tiny_config(tmp_path, data_root)
    argv = ["--config", cfg, "--no-data-report", "--test-only", "--weights", str(path)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    data_names = ["square", "circle", "triangle", "star"]
    line = next(x for x in out.splitlines() if x.startswith(f"--weights {path}: "))
    assert_names(line, other, data_names)
    assert line.index(str(other)) < line.index(str(data_names))  # the checkpoint's, then the data's
    assert "replaced" not in out
    # Fewer classes in the checkpoint: the predictors are replaced, and said from the builder's report;
    # --test-only refuses to evaluate the freshly initialised predictors.
    small = tmp_path / "three_classes.pth"
    torch.save({"model": models.maskrcnn_tiny(3).state_dict()}, small)
    with raises_naming(models.ModelError, f"--test-only --weights {small}", "roi_heads.box_predictor (3 -> 5"):
        train.main(["--config", cfg, "--no-data-report", "--test-only", "--weights", str(small)])
    capsys.readouterr()
    assert train.main(["--config", cfg, "--no-data-report", "--iters-per-epoch", "1", "--weights", str(small)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(f"--weights {small} "))
    assert_names(line, "num_classes 5", "roi_heads.box_predictor (3 -> 5", "mask_fcn_logits (3 -> 5", "conv5_mask kept")
    assert "was trained on classes" not in out  # a bare checkpoint carries no class names
