"""The one class-agnostic shape rule (tv_lossfix.class_agnostic) and what reads it."""

import pytest
import torch

from tv_lossfix import make_class_agnostic
from tv_lossfix.class_agnostic import (
    BOX_OUTPUTS,
    MASK_CHANNELS,
    contradicted_flag,
    is_class_agnostic,
    state_class_agnostic,
)
from tv_lossfix.roi_heads import is_class_agnostic_box, is_class_agnostic_mask

from helpers import tiny_model


@pytest.mark.parametrize(
    "outputs, num_classes, per_class, agnostic",
    [(4, 3, 4, True), (12, 3, 4, False), (4, 1, 4, False), (1, 3, 1, True), (3, 3, 1, False), (1, 1, 1, False)],
)
def test_the_rule(outputs, num_classes, per_class, agnostic):
    assert is_class_agnostic(outputs, num_classes, per_class) is agnostic


def test_head_tensors_and_state_dicts_follow_the_rule():
    logits = torch.zeros(2, 3)
    assert is_class_agnostic_box(logits, torch.zeros(2, BOX_OUTPUTS))
    assert not is_class_agnostic_box(logits, torch.zeros(2, 3 * BOX_OUTPUTS))
    assert not is_class_agnostic_box(torch.zeros(2, 1), torch.zeros(2, BOX_OUTPUTS))  # background alone
    assert is_class_agnostic_mask(torch.zeros(2, MASK_CHANNELS, 28, 28), 3)
    assert not is_class_agnostic_mask(torch.zeros(2, 3, 28, 28), 3)

    model = tiny_model("mask", num_classes=3, loss_cfg={})
    assert state_class_agnostic(model.state_dict()) == (False, False)
    make_class_agnostic(model, bbox=True, mask=False)
    assert state_class_agnostic(model.state_dict()) == (True, False)
    make_class_agnostic(model, bbox=False, mask=True)
    assert state_class_agnostic(model.state_dict()) == (True, True)
    assert state_class_agnostic({}) == (False, False)  # no classifier: nothing to tell


def test_the_flag_a_class_agnostic_checkpoint_needs_is_named():
    assert contradicted_flag((True, False), (False, False)) == "class_agnostic_bbox"
    assert contradicted_flag((False, True), (True, False)) == "class_agnostic_mask"
    assert contradicted_flag((True, True), (True, True)) is None
    assert contradicted_flag((False, False), (True, True)) is None  # asking for more than the checkpoint has: fine
