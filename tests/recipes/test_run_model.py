"""The optimizer's parameter groups (references/run_model.py param_groups, on torchvision's
split_normalization_params): the same groups, in the same order, as the recipe's own copy built
before, so that the optimizer state in earlier checkpoints still lines up on --resume."""

import pytest
import torch
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn

import models
import run_context
import run_model
import train_config
import writers

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def groups_as_built_before(model, weight_decay, norm_weight_decay):
    """The recipe's hand-written grouping that split_normalization_params replaced, as it was."""
    if norm_weight_decay is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm, other = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (norm if isinstance(module, NORM_TYPES) else other).append(p)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def _layout(groups):
    """Each group's weight decay and its parameters by identity, in order."""
    return [(g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]


def _models():
    tiny, _ = models.build_model(name="maskrcnn_tiny", num_classes=3, stock=True)
    next(tiny.parameters()).requires_grad_(False)
    # No weights: torchvision builds the ResNet body with trainable nn.BatchNorm2d (FrozenBatchNorm2d when pretrained).
    resnet = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    resnet.backbone.body.layer1.requires_grad_(False)  # frozen parameters stay out of every group
    return {"maskrcnn_tiny": tiny, "fasterrcnn_resnet50_fpn": resnet}


@pytest.mark.parametrize("name", ["maskrcnn_tiny", "fasterrcnn_resnet50_fpn"])
@pytest.mark.parametrize("norm_weight_decay", [None, 0.0, 1e-5])
def test_groups_match_the_recipe_s_former_grouping(name, norm_weight_decay):
    model = _models()[name]
    new = run_model.param_groups(model, 1e-4, norm_weight_decay)
    old = groups_as_built_before(model, 1e-4, norm_weight_decay)
    assert _layout(new) == _layout(old)
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in new) == trainable < len(list(model.parameters()))  # the frozen ones out
    if norm_weight_decay is not None:
        assert len(new) == 2 and new[1]["weight_decay"] == norm_weight_decay
        norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
        norm_ids = {id(p) for m in norms for p in m.parameters() if p.requires_grad}
        assert norm_ids and {id(p) for p in new[1]["params"]} == norm_ids  # both models have BatchNorm2d


def test_a_model_without_norm_layers_keeps_an_empty_norm_group():
    """torchvision's script drops an empty group; the recipe keeps [others, norms] so the optimizer's
    state_dict has the same two groups whatever the model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2))
    groups = run_model.param_groups(model, 1e-4, 0.0)
    assert [len(g["params"]) for g in groups] == [4, 0]
    assert _layout(groups) == _layout(groups_as_built_before(model, 1e-4, 0.0))


def test_the_optimizer_is_built_on_these_groups():
    cfg, loss, _ = train_config.resolve(["--norm-weight-decay", "0", "--wd", "0.0005"])
    run = run_context.Run(cfg, loss, torch.device("cpu"), 0, writers.EventWriter("", False), "")
    model = _models()["fasterrcnn_resnet50_fpn"]
    opt, _, _, _ = run_model.build_optimization(run, model, 10)
    assert [(g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups] == _layout(
        groups_as_built_before(model, 0.0005, 0.0)
    )
