"""The Lightning recipe (references/lightning/): the Trainer clips after backward, to the limit; the module
logs the loss terms, training_stats and the pre-clip norm without host reads, warms up as train.py does, and
validates with the recipe's per-class COCO evaluation; the CLI refuses recipe settings it cannot honour.

Skipped where Lightning is not installed (the floor CI venv): it is the optional extra ``lightning``."""

import importlib.util
import json
import math
import os
import re

import pytest
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

# "lightning.pytorch", not "lightning": with references/ on sys.path, a bare "lightning" resolves to the
# references/lightning folder as a namespace package when the real one is missing.
pl = pytest.importorskip("lightning.pytorch")

import tv_lossfix  # noqa: E402

from helpers import REFS, another_value, raises_naming, tiny_config  # noqa: E402


def _load_cli():
    spec = importlib.util.spec_from_file_location("lightning_train", os.path.join(REFS, "lightning", "train.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)  # puts references/ and references/lightning/ on sys.path
    return cli


LT = _load_cli()
import module as LM  # noqa: E402

LIMIT = 0.5  # far under the ~10-20 a from-scratch maskrcnn_tiny starts at
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _norm(module) -> float:
    """The global L2 norm of the gradients, computed here independently (float64)."""
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in module.parameters() if p.grad is not None))


def _host_reads(fn, counts):
    def wrapped(*args, **kwargs):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn(*args, **kwargs)
        names = [e.name for e in prof.events()]
        counts.append((names.count("aten::_local_scalar_dense"), names.count("aten::item")))
        return out

    return wrapped


class Probe(pl.Callback):
    """Callbacks' on_before_optimizer_step runs after backward, before the module's hook and before the
    Trainer clips (Lightning 2.x); on_train_batch_end runs after the step, whose SGD leaves .grad clipped."""

    def __init__(self):
        self.pre, self.post, self.logged, self.losses, self.lrs = [], [], [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append(_norm(pl_module))
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post.append(_norm(pl_module))
        self.logged.append(float(trainer.callback_metrics["train/grad_norm"]))
        self.losses.append(float(outputs["loss"]))


def _setup(tmp_path, data_root, *flags, **training):
    cfg_path = tiny_config(tmp_path, data_root, **training)
    args, cfg, loss_cfg = LT.parse(["--config", cfg_path, "--max-epochs", "1", *flags])
    LT.check_supported(cfg)
    _, data = LT.build_data(cfg, loss_cfg)
    torch.manual_seed(0)
    return args, cfg, LT.build_module(cfg, loss_cfg, data), data


@pytest.mark.slow
def test_trainer_clips_after_backward_and_module_logs_without_host_reads(tmp_path, data_root):
    args, cfg, module, data = _setup(tmp_path, data_root, "--gradient-clip-val", str(LIMIT))
    counts = []
    module._log_step = _host_reads(module._log_step, counts)
    module.on_before_optimizer_step = _host_reads(module.on_before_optimizer_step, counts)
    probe = Probe()
    trainer = LT.build_trainer(args, cfg, callbacks=[probe], limit_train_batches=3, num_sanity_val_steps=0, **QUIET)
    assert trainer.gradient_clip_val == LIMIT and trainer.gradient_clip_algorithm == "norm"
    trainer.fit(module, data.train_loader, data.val_loader)

    assert len(probe.pre) == 3
    assert min(probe.pre) > LIMIT  # so every step was clipped
    assert probe.logged == pytest.approx(probe.pre, rel=1e-5)  # the module logs the pre-clip norm
    assert probe.post == pytest.approx([LIMIT] * 3, rel=1e-4)  # and the Trainer clipped to the limit
    assert counts == [(0, 0)] * 6  # 3 steps x (losses + statistics, grad norm): nothing read back
    # train.py's warmup: LinearLR from lr x 0.001 over warmup_iters=2 steps, stepped per iteration.
    lr = cfg.training.lr
    assert probe.lrs == pytest.approx([lr * 0.001, lr * (0.001 + 0.999 / 2), lr])

    metrics = trainer.callback_metrics
    loss_keys = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    stat_keys = set(tv_lossfix.training_stats(module.model))
    assert len(stat_keys) == 9
    for k in loss_keys | stat_keys:
        assert f"train/{k}_epoch" in metrics and f"train/{k}_step" in metrics, k
    assert float(metrics["train/loss_epoch"]) == pytest.approx(sum(probe.losses) / 3, rel=1e-5)

    # Validation: the recipe's per-class evaluation, its numbers logged.
    with open(os.path.join(data.val_set.image_dir, "..", "val.json")) as f:
        val = json.load(f)
    gt = {c["name"]: sum(a["category_id"] == c["id"] for a in val["annotations"]) for c in val["categories"]}
    per_class = module.last_evaluation["per_class"]
    assert {k: int(v["gt"]) for k, v in per_class.items()} == gt
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "recall", "dets_per_image"} <= set(next(iter(per_class.values())))
    assert module.last_evaluation["images"] == len(val["images"])
    assert "val/bbox_AP" in metrics and "val/segm_AP" in metrics
    name = next(n for n, c in gt.items() if c)
    assert float(metrics[f"val/{name}/gt"]) == gt[name]


class CountValidations(pl.Callback):
    def __init__(self):
        self.epochs = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)


@pytest.mark.slow
@pytest.mark.parametrize("max_epochs, eval_every, expected", [(2, 3, [2]), (2, 2, [1]), (3, 2, [1, 3])])
def test_cli_fit_validates_after_the_last_epoch_as_train_py(tmp_path, data_root, max_epochs, eval_every, expected):
    # train.py: every eval_every epochs and after the last; check_val_every_n_epoch alone skips the last.
    args, cfg, module, data = _setup(tmp_path, data_root, eval_every=eval_every)
    count = CountValidations()
    trainer = LT.build_trainer(
        args,
        cfg,
        callbacks=[count],
        max_epochs=max_epochs,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        **QUIET,
    )
    said = []
    LT.fit(trainer, module, data, eval_every, said.append)
    assert count.epochs == expected
    assert len(said) == (max_epochs % eval_every != 0)


@pytest.mark.slow
def test_without_gradient_clip_val_nothing_is_clipped(tmp_path, data_root):
    # The contrast that shows the probe above would catch a Trainer that does not clip.
    args, cfg, module, data = _setup(tmp_path, data_root, "--gradient-clip-val", "0")
    probe = Probe()
    trainer = LT.build_trainer(args, cfg, callbacks=[probe], limit_train_batches=1, limit_val_batches=0, **QUIET)
    assert trainer.gradient_clip_val is None
    trainer.fit(module, data.train_loader)
    assert probe.pre[0] > LIMIT
    assert probe.post == pytest.approx(probe.pre, rel=1e-6)


@pytest.mark.slow
def test_under_16_mixed_the_logged_norm_is_unscaled_and_the_clip_applies_to_it(tmp_path, data_root):
    # What precision="16-mixed" builds on CUDA (autocast + GradScaler), here with torch's CPU GradScaler.
    from lightning.pytorch.plugins.precision import MixedPrecision

    runs = {}
    for name in ("fp32", "amp"):
        args, cfg, module, data = _setup(tmp_path, data_root, "--gradient-clip-val", str(LIMIT))
        probe = Probe()
        amp = dict(precision=None, plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
        trainer = LT.build_trainer(
            args,
            cfg,
            callbacks=[probe],
            limit_train_batches=1,
            limit_val_batches=0,
            **QUIET,
            **(amp if name == "amp" else {}),
        )
        trainer.fit(module, data.train_loader)
        runs[name] = probe
    scale = trainer.precision_plugin.scaler.get_scale()
    assert scale >= 2**15  # scaled gradients would be this many times larger
    amp, fp32 = runs["amp"], runs["fp32"]
    assert amp.logged == pytest.approx(amp.pre, rel=1e-5)
    assert amp.pre[0] == pytest.approx(fp32.pre[0], rel=0.05)  # the true norm (float16 rounding apart)
    assert amp.post == pytest.approx([LIMIT], rel=1e-4)


def test_module_takes_a_yaml_loss_config_and_refuses_unknown_training_keys(tmp_path):
    path = tmp_path / "loss.yaml"
    path.write_text(yaml.safe_dump({"roi_head": {"loss_cls_weight": 2.0}, "rpn_head": {"cls_pos_weight": 1.5}}))
    module = LM.DetectionModule("maskrcnn_tiny", 3, loss_cfg=str(path), training={"lr": 0.005})
    assert tv_lossfix.get_loss_cfg(module.model) == tv_lossfix.LossConfig.from_yaml(str(path))
    assert module.training_cfg["lr"] == 0.005 and module.training_cfg["opt"] == "sgd"
    with raises_naming(ValueError, "['nan_policy']"):
        LM.DetectionModule("maskrcnn_tiny", 3, training={"nan_policy": "skip"})


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--amp"], "training.amp = True"),
        (["--nan-policy", "skip"], "training.nan_policy = 'skip'"),
        (["--stock"], "model.stock = True"),
        (["--tile-size", "96"], "data.tile_size = 96"),
        (["--gradient-clip-val", "-1"], "--gradient-clip-val"),
    ],
)
def test_cli_refuses_what_cannot_take_effect_in_one_line(tmp_path, data_root, flags, expected):
    cfg = tiny_config(tmp_path, data_root)
    with pytest.raises(LT.ConfigError) as e:
        LT.main(["--config", cfg, *flags])
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)


def test_cli_clip_default_comes_from_the_config(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, gradient_clip={"enabled": True, "max_norm": 7.0, "norm_type": 2})
    args, resolved, _ = LT.parse(["--config", cfg])
    assert LT.clip_value(args, resolved) == 7.0
    args, resolved, _ = LT.parse(["--config", cfg, "--gradient-clip-val", "3"])
    assert LT.clip_value(args, resolved) == 3.0  # the flag wins, as every flag over the config
    _, resolved, _ = LT.parse(
        ["--config", tiny_config(tmp_path, data_root, gradient_clip={"enabled": True, "norm_type": 1})]
    )
    with raises_naming(LT.ConfigError, "norm_type 1.0", "L2"):
        LT.check_supported(resolved)


# -- every recipe key: honoured or refused, as its setting(lightning=...) says ------------------------------


def test_every_training_and_distributed_key_says_whether_lightning_honours_it():
    import train_config

    undeclared = [
        o.path
        for o in train_config.OPTIONS
        if o.path.split(".")[0] in ("training", "distributed") and o.lightning is None
    ]
    assert undeclared == []  # a new key of the loop's own sections states it (model:/data: go through the recipe)
    honoured = {o.path for o in train_config.OPTIONS if o.lightning is True}
    assert {f"training.{k}" for k in LM.OPTIM_KEYS} <= honoured  # DetectionModule's optimiser reads them


def test_lightning_honours_or_refuses_every_key():
    import train_config

    base, refused = train_config.defaults(), []
    for o in train_config.OPTIONS:
        value = another_value(o)
        if value is None or value == o.off:
            continue
        try:
            cfg = base.replace({o.path: value})
        except train_config.ConfigError:
            continue
        if o.lightning in (None, True):
            LT.check_supported(cfg)  # honoured: accepted
            continue
        with pytest.raises(train_config.ConfigError, match=re.escape(f"{o.path} = {value!r}")):
            LT.check_supported(cfg)
        refused.append(o.path)
    assert {"training.amp", "training.overwrite", "training.nan_policy", "distributed.world_size"} <= set(refused)
    assert {"model.stock", "training.resume"} <= set(refused)
