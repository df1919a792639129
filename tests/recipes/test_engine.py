"""engine.train_one_epoch: the hooks' before_step / after_step around each step, the step's numbers in the
one Progress object, and a stop signal raised as Preempted after the hooks of its step."""

from types import SimpleNamespace

import pytest
import torch

import engine
import step
from helpers import make_targets, tiny_model
from preemption import Preempted, StopRequest


class Recorder:
    def __init__(self, progress):
        self.progress, self.seen = progress, []

    def before_step(self):
        self.seen.append(("before", self.progress.done, self.progress.iteration))

    def after_step(self):
        p = self.progress
        self.seen.append(("after", p.done, p.iteration, p.result.values["loss"], p.lr))


def _ctx(stop=None, **kw):
    model = tiny_model("mask", loss_cfg={})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SimpleNamespace(say=lambda s: None, record=lambda r: None)
    return step.StepContext(model, opt, torch.device("cpu"), stop=stop, writer=writer, **kw)


def test_hooks_see_each_step_through_progress():
    images, targets = make_targets("mask", [(64, 64), (64, 64)])
    ctx = _ctx(print_freq=1)
    progress = engine.Progress(engine.TrainState(), epoch=0)
    hook = Recorder(progress)
    torch.manual_seed(0)
    stats = engine.train_one_epoch(ctx, [(images, targets)] * 3, progress, [hook])
    assert [s[:3] for s in hook.seen] == [
        (k, i + (k == "after"), i + (k == "after")) for i in range(3) for k in ("before", "after")
    ]
    afters = [s for s in hook.seen if s[0] == "after"]
    assert stats["loss"] == pytest.approx(sum(s[3] for s in afters) / 3, rel=1e-12)
    assert all(s[4] == 0.01 for s in afters) and progress.n_iters == 3 and progress.meter.count == 3


def test_a_stop_signal_raises_after_the_hooks_of_its_step():
    images, targets = make_targets("mask", [(64, 64)])
    stop = StopRequest()
    stop.signum = 15  # as the handler sets it: the step's read-back carries it
    ctx = _ctx(stop=stop)
    progress = engine.Progress(engine.TrainState(), epoch=4)
    hook = Recorder(progress)
    with pytest.raises(Preempted) as e:
        engine.train_one_epoch(ctx, [(images, targets)] * 3, progress, [hook])
    assert [s[0] for s in hook.seen] == ["before", "after"]  # the hooks of the step ran (the checkpoint's)
    assert (e.value.signum, e.value.epoch, e.value.iteration, e.value.n_iters) == (15, 4, 1, 3)


def test_warmup_steps_in_the_loop_before_the_log_line():
    images, targets = make_targets("mask", [(64, 64)])
    ctx = _ctx(print_freq=1)
    ctx.warmup = torch.optim.lr_scheduler.LinearLR(ctx.optimizer, start_factor=0.1, total_iters=2)
    progress = engine.Progress(engine.TrainState(warmup_total=2), epoch=0)
    hook = Recorder(progress)
    engine.train_one_epoch(ctx, [(images, targets)] * 3, progress, [hook])
    # LinearLR from 0.1 * lr to lr over 2 steps: after step 1 0.55 * lr, after step 2 lr, then unchanged.
    assert [s[4] for s in hook.seen if s[0] == "after"] == pytest.approx([0.0055, 0.01, 0.01])
