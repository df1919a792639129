"""At default settings every loss equals stock torchvision's, for all three families."""

import pytest
import torch

import tv_lossfix

from helpers import make_targets, patched_copy, run_losses

SIZES = [(96, 128), (112, 96), (96, 96)]


@pytest.mark.parametrize("kind", ["faster", "mask", "keypoint"])
@pytest.mark.parametrize("empty", [(), (1,), (0, 1, 2)], ids=["all-gt", "one-empty", "all-empty"])
def test_default_losses_equal_stock(stock_models, kind, empty):
    stock = stock_models[kind]
    ours = patched_copy(stock)
    images, targets = make_targets(kind, SIZES, empty=empty)

    expected = run_losses(stock, images, targets)
    got = run_losses(ours, images, targets)

    assert set(got) == set(expected)  # same keys: sum(loss_dict.values()) loops keep working
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    if len(empty) == len(SIZES):
        assert got["loss_box_reg"].item() == 0.0
        assert got["loss_rpn_box_reg"].item() == 0.0


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_default_gradients_equal_stock(stock_models, kind):
    stock = stock_models[kind]
    ours = patched_copy(stock)
    images, targets = make_targets(kind, SIZES, empty=(2,))
    for m in (stock, ours):
        m.zero_grad()
        sum(run_losses(m, images, targets).values()).backward()
    for (name, p), q in zip(stock.named_parameters(), ours.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        # Summation order differs (one gather instead of two): allow float noise relative to scale.
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=name)


@pytest.mark.parametrize("kind", ["faster", "mask", "keypoint"])
def test_inference_unchanged(stock_models, kind):
    stock = stock_models[kind]
    ours = patched_copy(stock, {"roi_head": {"cls_pos_weight": 3.0, "bbox_loss": "giou"}})
    images, _ = make_targets(kind, SIZES)
    stock.eval()
    ours.eval()
    with torch.no_grad():
        a, b = stock(images), ours(images)
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            torch.testing.assert_close(db[k], da[k], rtol=0, atol=0, msg=k)


def test_builder_equals_torchvision_builder():
    # Same seed, same construction: our builder's weights and losses are torchvision's.
    from torchvision.models import detection as tvdet

    torch.manual_seed(0)
    stock = tvdet.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=128)
    torch.manual_seed(0)
    ours = tv_lossfix.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=96, max_size=128
    )
    sa, sb = stock.state_dict(), ours.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=k)
    images, targets = make_targets("mask", SIZES, empty=(1,))
    la, lb = run_losses(stock, images, targets), run_losses(ours, images, targets)
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-6, atol=1e-6, msg=k)


def test_training_trajectory_matches_stock():
    # Several SGD steps at a sane learning rate: same weights as stock up to float noise.
    # (In a diverging run the rounding differences grow; see the README's collapse study.)
    from helpers import tiny_model

    stock = tiny_model("mask")
    ours = patched_copy(stock)
    images, targets = make_targets("mask", [(64, 80), (72, 64)], empty=(1,))
    for model in (stock, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
        for step in range(6):
            opt.zero_grad()
            sum(run_losses(model, images, targets, seed=step).values()).backward()
            opt.step()
    for (name, a), b in zip(stock.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
