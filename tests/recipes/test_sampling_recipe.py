"""The loss-fix guide's YAML and the sampling keys through references/: --print-config, train_config,
--stock, and the demo model's builder."""

import yaml

from tv_lossfix import LossConfig, LossConfigError

from helpers import raises_naming, sampling_settings

# -- the loss-fix guide's sections 3 and 4 --------------------------------------------------------------
GUIDE_YAML = """
model:
  num_classes: 3
  rpn_head:
    cls_pos_weight: 1.0
    loss_cls_weight: 1.0
    loss_bbox_weight: 1.0
    pos_iou_thr: 0.7
    neg_iou_thr: 0.3
    num_neg_ratio: 3
    feat_channels: 256
  roi_head:
    cls_pos_weight: 1.0
    loss_cls_weight: 1.0
    loss_bbox_weight: 1.0
    loss_mask_weight: 1.0
    pos_iou_thr: 0.6
    neg_iou_thr: 0.4
    pos_ratio: 0.5
    num_samples: 256

training:
  gradient_clip:
    enabled: true
    max_norm: 35.0
    norm_type: 2
"""
GUIDE_VALUES = {
    "rpn_head": {"pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "neg_pos_ub": 3, "feat_channels": 256},
    "roi_head": {"pos_iou_thr": 0.6, "neg_iou_thr": 0.4, "pos_fraction": 0.5, "num": 256},
}


def test_guide_config_loads_in_the_library_and_the_training_script(tmp_path, capsys):
    import models
    import train
    import train_config

    path = tmp_path / "config.yaml"
    path.write_text(GUIDE_YAML)
    cfg = LossConfig.from_yaml(path)
    assert train.main(["--config", str(path), "--print-config"]) == 0
    printed_cfg = yaml.safe_load(capsys.readouterr().out)
    for sec, values in GUIDE_VALUES.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, sec), key) == value, (sec, key)
            assert printed_cfg["model"][sec][key] == value, (sec, key)  # canonical keys, no alias
    assert printed_cfg["model"]["num_classes"] == 3 and printed_cfg["training"]["gradient_clip"]["enabled"] is True
    run_cfg, loss_cfg, _ = train_config.resolve(["--config", str(path)])
    assert loss_cfg == cfg
    model, _ = models.build_model(name=run_cfg.model.name, num_classes=run_cfg.model.num_classes, loss_cfg=loss_cfg)
    got = sampling_settings(model)
    for sec, values in GUIDE_VALUES.items():
        for key, value in values.items():
            if key != "feat_channels":
                assert got[sec][key] == value, (sec, key)
    assert model.rpn.head.cls_logits.in_channels == 256
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


def test_stock_refuses_settings_its_heads_cannot_apply(tmp_path, data_root):
    import train
    from helpers import tiny_config
    from train_config import ConfigError

    cfg = tiny_config(tmp_path, data_root)
    flags = ["--config", cfg, "--print-config", "--stock"]
    assert train.main(flags) == 0  # torchvision's defaults: nothing to refuse
    with raises_naming(ConfigError, "--stock", "model.sync_avg_factor"):
        train.main(flags + ["--sync-avg-factor"])
    # a YAML key is named the same way
    import yaml as _yaml

    data = _yaml.safe_load(open(cfg))
    data["model"]["roi_head"] = {"neg_pos_ub": 3}
    data["model"]["sync_avg_factor"] = True
    with open(cfg, "w") as f:
        _yaml.safe_dump(data, f)
    with raises_naming(ConfigError, "model.roi_head.neg_pos_ub, model.sync_avg_factor", "--stock"):
        train.main(flags)


def test_demo_model_refuses_a_kwarg_and_key_that_disagree():
    from models import build_model

    with raises_naming(LossConfigError, "box_batch_size_per_image=64", "roi_head.num=32"):
        build_model(
            name="maskrcnn_tiny",
            num_classes=3,
            loss_cfg={"roi_head": {"num": 32}},
            kwargs={"box_batch_size_per_image": 64},
        )
    model, _ = build_model(
        name="maskrcnn_tiny", num_classes=3, loss_cfg={"roi_head": {"num": 64}}, kwargs={"box_batch_size_per_image": 64}
    )
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
