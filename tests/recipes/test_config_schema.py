"""references/config_schema.py: each key's policy is declared on its setting(...) and read from there by
the recipe (--resume in training_checkpoint.py, a mid-epoch resume in run_model.py; the ranges and
modes in test_config_rules.py, the Lightning CLI in test_lightning.py)."""

import dataclasses

import pytest

import config_schema
import run_model
import train_config
import training_checkpoint
from helpers import another_value


def _changed(path, old, new):
    """(saved config tree, this run's config) differing in ``path`` alone."""
    base = train_config.defaults()
    return base.replace({path: old}).to_dict(), base.replace({path: new})


def test_every_key_the_schema_refuses_on_resume_is_refused_naming_it():
    refusing = [o for o in train_config.OPTIONS if o.resume.refused is not None]
    assert {"model.name", "model.num_classes", "training.opt", "training.seed"} <= {o.path for o in refusing}
    for o in refusing:
        new = another_value(o)
        old = o.default if o.default is not None else new
        new = new if old != new else None  # a nullable key: set -> null
        saved, cfg = _changed(o.path, old, new)
        applied, refused = training_checkpoint.reconcile(saved, cfg)
        assert applied == [] and len(refused) == 1 and refused[0].startswith(f"{o.path}: "), (o.path, refused)


def test_a_new_value_is_applied_as_the_schema_says_and_a_run_setting_is_not_compared():
    saved, cfg = _changed("training.lr", 0.02, 0.01)
    applied, refused = training_checkpoint.reconcile(saved, cfg)
    assert refused == [] and applied == [
        f"training.lr: 0.02 -> 0.01 applied: {train_config.on_resume('training.lr').applied}"
    ]
    saved, cfg = _changed("training.print_freq", 20, 5)  # no policy: read by this run as given
    assert training_checkpoint.reconcile(saved, cfg) == (
        ["training.print_freq: 20 -> 5 applied: read by this run as given"],
        [],
    )
    for o in train_config.OPTIONS:
        if not o.resume.compared:
            saved, cfg = _changed(o.path, o.default, another_value(o))
            assert training_checkpoint.reconcile(saved, cfg) == ([], []), o.path
    assert train_config.on_resume("model.a_key_of_an_older_recipe").refused is None


def test_norm_weight_decay_is_refused_when_turned_on_or_off_and_applied_otherwise():
    path = "training.norm_weight_decay"
    assert training_checkpoint.reconcile(*_changed(path, None, 0.0))[1][0].startswith(path)
    assert training_checkpoint.reconcile(*_changed(path, 0.0, None))[1][0].startswith(path)
    applied, refused = training_checkpoint.reconcile(*_changed(path, 0.0, 1e-5))
    assert refused == [] and applied[0].startswith(path) and train_config.on_resume(path).applied in applied[0]


def test_a_mid_epoch_checkpoint_refuses_every_key_that_orders_its_batches():
    fixed = train_config.mid_epoch_fixed_paths()
    assert {"training.batch_size", "distributed.world_size", "data.repeat_factor_threshold"} <= set(fixed)
    for path in fixed:
        o = train_config.BY_PATH[path]
        if o.default is not None:
            new = another_value(o)
        else:  # a null default: a value of the key's own type
            new = "random" if o.kind is str else 0.5
        saved, cfg = _changed(path, o.default, new)
        ckpt = {"config": saved, "in_epoch": {"epoch": 1, "iteration": 3}}
        lines = run_model._mid_epoch_refusals(ckpt, cfg)
        assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and "model_0.pth" in lines[0], lines
        assert run_model._mid_epoch_refusals({"config": saved}, cfg) == []  # an epoch's end: another order is fine


def test_a_setting_with_an_unknown_policy_keyword_fails_when_the_schema_is_read():
    @dataclasses.dataclass(frozen=True)
    class Section:
        x: int = config_schema.setting(1, "--x", help="x", mid_epoch_fixd=True)

    with pytest.raises(TypeError, match="mid_epoch_fixd"):
        config_schema._options(Section, "section.")


def test_a_torchvision_checkpoints_args_are_read_under_torchvisions_names():
    import argparse

    args = argparse.Namespace(
        model="maskrcnn_tiny", weight_decay=0.5, wd=9.0, lr_steps=(3, 4), aspect_ratio_group_factor=-1
    )
    tree = training_checkpoint.torchvision_args_config(args)
    assert tree["training"] == {"weight_decay": 0.5, "lr_steps": [3, 4]}  # --wd's dest is weight_decay there
    assert tree["model"] == {"name": "maskrcnn_tiny"} and tree["data"] == {"aspect_ratio_group_factor": -1}
