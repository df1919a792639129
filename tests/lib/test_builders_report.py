"""What a builder replaced, and read from a checkpoint, as it reports it (tv_lossfix.builders.BuildReport);
the one "checkpoint not found" error behind every ``weights=<path>`` entry point."""

import logging

import pytest
import torch
from torch import nn
from torchvision.models import detection as tvdet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

import tv_lossfix
from tv_lossfix.builders import BuildReport, build_with_report, replace_predictors
from tv_lossfix.checkpoint import CheckpointError, CheckpointNotFoundError, check_checkpoint_file, read_checkpoint

from helpers import tiny_model


def _tiny_keypoint_model(num_keypoints: int = 17) -> tvdet.KeypointRCNN:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
    backbone.out_channels = 16
    return tvdet.KeypointRCNN(
        backbone,
        num_classes=2,
        num_keypoints=num_keypoints,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        keypoint_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
    )


# -- replace_predictors' report -----------------------------------------------------------------------
def test_replace_predictors_reports_the_box_and_mask_layers_with_their_class_counts():
    model = tiny_model("mask", num_classes=3)
    upsampler = model.roi_heads.mask_predictor.conv5_mask.weight.clone()
    assert replace_predictors(model, 5) == [
        "roi_heads.box_predictor (3 -> 5 classes)",
        "roi_heads.mask_predictor.mask_fcn_logits (3 -> 5 classes; mask_predictor.conv5_mask kept)",
    ]
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 20
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert torch.equal(model.roi_heads.mask_predictor.conv5_mask.weight, upsampler)
    assert replace_predictors(model, 5) == []  # the counts match now: nothing replaced, nothing said
    faster = tiny_model("faster", num_classes=3)
    assert replace_predictors(faster, 2) == ["roi_heads.box_predictor (3 -> 2 classes)"]


def test_replace_predictors_reports_a_replaced_keypoint_predictor():
    model = _tiny_keypoint_model(17)
    head = model.roi_heads.keypoint_head[0].weight.clone()
    assert replace_predictors(model, None, 4) == ["roi_heads.keypoint_predictor (17 -> 4 keypoints)"]
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 4
    assert torch.equal(model.roi_heads.keypoint_head[0].weight, head)  # only the predictor is new
    assert replace_predictors(model, 3, 5) == [
        "roi_heads.box_predictor (2 -> 3 classes)",
        "roi_heads.keypoint_predictor (4 -> 5 keypoints)",
    ]
    assert replace_predictors(model, 3, 5) == []


# -- the builder's report ------------------------------------------------------------------------------
def test_builder_reports_a_replaced_keypoint_predictor_over_pretrained_weights(monkeypatch, caplog):
    # No download: torchvision's own loader is fed the state_dict of a model built like weights="DEFAULT".
    from torchvision.models._api import WeightsEnum
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    coco = tvdet.KeypointRCNN(backbone, num_classes=2, num_keypoints=17).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: coco)
    with caplog.at_level(logging.INFO, logger="tv_lossfix.builders"):
        model, report = build_with_report(
            "keypointrcnn_resnet50_fpn", weights="DEFAULT", num_classes=3, num_keypoints=5
        )
    lines = ("roi_heads.box_predictor (2 -> 3 classes)", "roi_heads.keypoint_predictor (17 -> 5 keypoints)")
    assert report == BuildReport(replaced=lines, checkpoint_settings={})
    assert [r.getMessage() for r in caplog.records] == [f"keypointrcnn_resnet50_fpn: re-initialised {x}" for x in lines]
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 5
    assert torch.equal(model.roi_heads.keypoint_head[0].weight, coco["roi_heads.keypoint_head.0.weight"])


def test_builder_report_carries_the_checkpoints_model_settings(tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    state = tvdet.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict()
    path = tmp_path / "trained.pth"
    settings = {"class_names": ["__background__", "cat", "dog"], "box_score_thresh": 0.25}
    torch.save({"model": state, "model_settings": settings}, path)
    torch.manual_seed(1)
    model, report = build_with_report(name, weights=str(path), num_classes=4)
    assert report == BuildReport(replaced=("roi_heads.box_predictor (3 -> 4 classes)",), checkpoint_settings=settings)
    assert model.roi_heads.score_thresh == 0.25  # the settings were applied, not only reported
    torch.manual_seed(1)
    public = tv_lossfix.BUILDERS[name](weights=str(path), num_classes=4)
    # The public builder is the same build, less the report.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in public.state_dict().items())
    _, report = build_with_report(name, weights=str(path))
    assert report.replaced == () and report.checkpoint_settings == settings


def test_build_with_report_takes_the_builders_own_defaults_and_errors():
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    torch.manual_seed(0)
    model, report = build_with_report(name, weights_backbone=None, num_classes=4, loss_cfg="positive")
    torch.manual_seed(0)
    public = tv_lossfix.BUILDERS[name](weights_backbone=None, num_classes=4, loss_cfg="positive")
    assert report == BuildReport()
    assert list(model.state_dict()) == list(public.state_dict())
    assert all(torch.equal(v, public.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.roi_heads.bbox_avg_factor == "positive"
    with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'box_score_thres'"):
        build_with_report(name, weights_backbone=None, box_score_thres=0.1)
    with pytest.raises(ValueError, match="no tv_lossfix builder 'fasterrcnn_resnet50'; did you mean"):
        build_with_report("fasterrcnn_resnet50")


def test_build_is_keyword_only():
    from tv_lossfix import builders

    with pytest.raises(TypeError, match="positional"):
        builders._build(builders._ARCHS["fasterrcnn_resnet50_fpn"], None)


# -- one "checkpoint not found" ---------------------------------------------------------------------------
def test_a_missing_checkpoint_is_one_error_type_with_one_message(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(CheckpointNotFoundError) as builder:
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(missing))
    assert str(builder.value) == f"weights: checkpoint not found: {missing}"
    with pytest.raises(CheckpointNotFoundError) as reader:
        read_checkpoint(missing, "--resume")
    assert str(reader.value) == f"--resume: checkpoint not found: {missing}"
    # Caught as the library's CheckpointError and as the FileNotFoundError weights=<path> raised before.
    assert isinstance(builder.value, CheckpointError) and isinstance(builder.value, FileNotFoundError)
    with pytest.raises(CheckpointError) as folder:
        check_checkpoint_file(tmp_path, "weights")
    assert str(folder.value) == f"weights: {tmp_path} is a folder, not a checkpoint file"
    assert not isinstance(folder.value, FileNotFoundError)
    missing.write_bytes(b"")
    assert check_checkpoint_file(missing, "weights") == str(missing)  # a file: its path, as a str
