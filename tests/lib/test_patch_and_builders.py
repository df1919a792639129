import copy

import pytest
import torch
from torchvision.models import detection as tvdet

import tv_lossfix
from tv_lossfix import LossConfigError, LossFixRoIHeads, LossFixRPN

from helpers import make_targets, run_losses, tiny_model


def test_patch_round_trip_keeps_weights_and_keys():
    stock = tiny_model("mask")
    before = copy.deepcopy(stock.state_dict())
    patched = tv_lossfix.patch_model(stock, {"roi_head": {"class_weight": [1, 2, 3]}})
    assert patched is stock
    after = patched.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = tiny_model("mask", seed=1)  # stock, other weights
    fresh.load_state_dict(after)  # patched -> stock
    patched.load_state_dict(fresh.state_dict())  # stock -> patched


def test_patch_again_replaces_config_and_repr_shows_it():
    model = tv_lossfix.patch_model(tiny_model("faster"), {"roi_head": {"cls_pos_weight": 2.0}})
    assert "cls_pos_weight=2.0" in repr(model)
    tv_lossfix.patch_model(model, "positive")
    assert model.roi_heads.cls_pos_weight == 1.0 and model.roi_heads.bbox_avg_factor == "positive"
    assert tv_lossfix.get_loss_cfg(model) == tv_lossfix.LossConfig.preset("positive")
    assert "bbox_avg_factor='positive'" in repr(model)


def test_bad_class_weight_leaves_model_unpatched():
    model = tiny_model("mask")
    with pytest.raises(LossConfigError, match="has 2 entries but the model has 3 classes"):
        tv_lossfix.patch_model(model, {"roi_head": {"class_weight": [1, 2]}})
    assert type(model.roi_heads) is tvdet.roi_heads.RoIHeads and type(model.rpn) is tvdet.rpn.RegionProposalNetwork


def test_patch_rejects_unsupported_models():
    retina = tvdet.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(TypeError, match="two-stage detector.*RetinaNet"):
        tv_lossfix.patch_model(retina)
    model = tiny_model("faster")

    class MyHeads(tvdet.roi_heads.RoIHeads):
        pass

    model.roi_heads.__class__ = MyHeads
    with pytest.raises(TypeError, match="model.roi_heads is a .*MyHeads.*custom subclass"):
        tv_lossfix.patch_model(model)


def test_class_weight_buffer_not_in_state_dict_and_moves_with_model():
    model = tv_lossfix.patch_model(tiny_model("faster"), {"roi_head": {"class_weight": [0.5, 1, 2]}})
    assert "roi_heads.class_weight" not in model.state_dict()
    model.to(torch.float64)  # a non-persistent buffer still follows the model
    assert model.roi_heads.class_weight.dtype == torch.float64
    images, targets = make_targets("faster", [(64, 64)])
    out = run_losses(model, [i.double() for i in images], [{**t, "boxes": t["boxes"].double()} for t in targets])
    assert out["loss_classifier"].dtype == torch.float64


def test_builder_rejects_unknown_kwargs():
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'box_score_tresh'.*did you mean 'box_score_thresh'"
    ):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_tresh=0.1)
    with pytest.raises(TypeError, match="totally_bogus"):
        tv_lossfix.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, totally_bogus=5)
    m = tv_lossfix.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4, size_divisible=16
    )
    assert m.transform.size_divisible == 16 and isinstance(m.rpn, LossFixRPN)


def test_builder_bad_loss_cfg_fails_before_building():
    with pytest.raises(LossConfigError, match="roi_head.bbox_loss"):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, loss_cfg={"roi_head": {"bbox_loss": "x"}})
    with pytest.raises(LossConfigError, match="class_weight has 2 entries but the model has 3"):
        tv_lossfix.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=3, loss_cfg={"roi_head": {"class_weight": [1, 1]}}
        )


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "training-checkpoint"])
def test_local_checkpoint_with_other_num_classes_replaces_predictors(tmp_path, wrap):
    torch.manual_seed(0)
    src = tvdet.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "ckpt.pth"
    state = src.state_dict()
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3} if wrap else state, path)

    model = tv_lossfix.maskrcnn_resnet50_fpn(
        weights=str(path), num_classes=3, loss_cfg={"roi_head": {"class_weight": [1, 2, 2]}}
    )
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    new = model.state_dict()
    # Class-dependent layers are new; everything else, the mask upsampler included, is kept.
    replaced = [k for k in new if "box_predictor" in k or "mask_predictor.mask_fcn_logits" in k]
    assert len(replaced) == 6 and all(new[k].shape != state[k].shape for k in replaced)
    for k, v in new.items():
        if k not in replaced:
            assert torch.equal(v, state[k]), k
    # Like weights=..., the first backbone stages are frozen (trainable_backbone_layers=3).
    assert (
        not model.backbone.body.conv1.weight.requires_grad
        and not model.backbone.body.layer1[0].conv1.weight.requires_grad
    )
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    images, targets = make_targets("mask", [(96, 96)])
    model.transform.min_size, model.transform.max_size = (96,), 128
    assert torch.isfinite(sum(run_losses(model, images, targets).values()))


def test_local_checkpoint_from_pretrained_model_uses_frozen_bn(tmp_path):
    # A model built like weights="DEFAULT" (FrozenBatchNorm2d, 307 keys), saved, then fine-tuned.
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    src = tvdet.MaskRCNN(backbone, num_classes=91)
    path = tmp_path / "pretrained.pth"
    torch.save(src.state_dict(), path)
    model = tv_lossfix.maskrcnn_resnet50_fpn(weights=path, num_classes=5)
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert len(model.state_dict()) == len(src.state_dict()) == 307


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights: cannot read .*junk.pth"):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(junk))
    truncated = tmp_path / "trunc.pth"
    torch.save(tvdet.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights: cannot read .*trunc.pth"):
        tv_lossfix.fasterrcnn_resnet50_fpn(weights=str(truncated))
    faster = tmp_path / "faster.pth"
    torch.save(tvdet.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), faster)
    with pytest.raises(ValueError, match="faster.pth does not match maskrcnn_resnet50_fpn"):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(faster))
    other = tmp_path / "other.pth"
    torch.save({"a": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="other.pth is not a maskrcnn_resnet50_fpn checkpoint"):
        tv_lossfix.maskrcnn_resnet50_fpn(weights=str(other))


def test_weights_enum_goes_through_torchvision_and_num_classes_is_replaced(monkeypatch):
    # No download here: torchvision's own loader is fed a local state_dict.
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(0)
    coco = tvdet.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, num_keypoints=17)
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import resnet50
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = tvdet.KeypointRCNN(
        _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3), num_classes=2, num_keypoints=17
    )
    frozen.load_state_dict(coco.state_dict(), strict=False)
    calls = []
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: calls.append(self) or frozen.state_dict())
    model = tv_lossfix.keypointrcnn_resnet50_fpn(weights="DEFAULT", num_classes=3, num_keypoints=5)
    assert calls and type(calls[0]).__name__ == "KeypointRCNN_ResNet50_FPN_Weights"
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 5
    assert isinstance(model.roi_heads, LossFixRoIHeads)
    torch.testing.assert_close(model.rpn.head.conv[0][0].weight, frozen.rpn.head.conv[0][0].weight)


@pytest.mark.parametrize("name", sorted(tv_lossfix.BUILDERS))
def test_every_builder_builds_patched_model(name):
    kw = {"num_keypoints": 4} if "keypoint" in name else {}
    model = tv_lossfix.BUILDERS[name](weights=None, weights_backbone=None, num_classes=4, loss_cfg="positive", **kw)
    assert isinstance(model.rpn, LossFixRPN) and isinstance(model.roi_heads, LossFixRoIHeads)
    assert model.roi_heads.bbox_avg_factor == "positive"
    torch.manual_seed(0)
    stock = getattr(tvdet, name)(weights=None, weights_backbone=None, num_classes=4, **kw)
    assert list(stock.state_dict()) == list(model.state_dict())
