"""Clipping order under AMP (with a scaler that really scales), and sync_avg_factor over 2 ranks."""

from types import SimpleNamespace

import pytest
import torch

import engine
import step
import train_config
from helpers import make_targets, on_gloo_ranks, tiny_model


class RecordingScaler:
    """GradScaler's contract on the CPU: scale the loss by 1024, unscale_ divides the grads back."""

    def __init__(self):
        self.calls = []
        self.factor = 1024.0

    def scale(self, loss):
        self.calls.append("scale")
        return loss * self.factor

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.div_(self.factor)

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def _one_epoch(scaler, max_norm):
    clip_on = {"enabled": max_norm is not None, "max_norm": max_norm or 35.0}
    changes = {f"training.gradient_clip.{k}": v for k, v in clip_on.items()}
    cfg = train_config.defaults().replace(changes)
    model = tiny_model("mask", loss_cfg={})
    images, targets = make_targets("mask", [(64, 64), (64, 64)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves weights as they were
    logged = []
    clip = cfg.training.gradient_clip
    writer = SimpleNamespace(say=lambda s: None, record=logged.append)  # the records only
    max_norm = clip.max_norm if clip.enabled else float("inf")
    ctx = step.StepContext(model, opt, torch.device("cpu"), scaler, max_norm, print_freq=1, writer=writer)
    torch.manual_seed(0)
    engine.train_one_epoch(ctx, [(images, targets)], engine.Progress(engine.TrainState()))
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logged[-1]["grad_norm"], grads.norm().item()


def test_clip_after_unscale_measures_true_gradients():
    plain_norm, _ = _one_epoch(None, None)
    scaler = RecordingScaler()
    amp_norm, _ = _one_epoch(scaler, None)
    assert scaler.calls == ["scale", "unscale_", "step", "update"]
    assert amp_norm == pytest.approx(plain_norm, rel=1e-4)  # logged norm is the unscaled one
    clip = plain_norm / 4
    logged, after = _one_epoch(RecordingScaler(), clip)
    assert logged == pytest.approx(plain_norm, rel=1e-4)  # pre-clip norm is logged
    assert after == pytest.approx(clip, rel=1e-3)  # gradients the step saw were clipped, unscaled


def _reduce_mean_on(rank):
    from tv_lossfix._utils import reduce_mean

    return {"mean": reduce_mean(torch.tensor(10.0 if rank == 0 else 30.0)).item()}


def test_reduce_mean_over_two_gloo_ranks():
    assert on_gloo_ranks(_reduce_mean_on) == {(0, "mean"): 20.0, (1, "mean"): 20.0}
