"""The hook protocol trainer.Trainer calls: a new hook is one class plus one registration (``train.main(argv,
hooks=[...])``); it sees before_step / after_step with the step's numbers in trainer.progress, after_train
in a ``finally`` (a forced stop too), and its state_dict round-trips through the training checkpoints."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch

import train
import train_config
from engine import TrainState
from helpers import records, tiny_config
from hooks import HookBase, default_hooks
from trainer import Trainer
from training_checkpoint import TrainingParts

QUIET = ["--no-data-report"]


class LossTally(HookBase):
    """A new hook: counts the steps and sums their losses (its state), and can stop the run at a step."""

    def __init__(self, stop_at=None):
        self.stop_at, self.steps, self.loss_sum = stop_at, 0, 0.0
        self.calls, self.loaded = [], None

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]
        self.calls.append("load_state_dict")

    def state_dict(self):
        return {"steps": self.steps, "loss_sum": self.loss_sum}

    def before_train(self):
        self.calls.append("before_train")

    def before_step(self):
        done = self.trainer.progress.done
        self.calls.append(("before_step", done))
        if done == self.stop_at:  # as a scheduler would: the run stops after this step, with a checkpoint
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self):
        p = self.trainer.progress
        self.steps += 1
        self.loss_sum += p.result.values["loss"]
        self.calls.append(("after_step", p.done, p.iteration))

    def after_train(self):
        self.calls.append(("after_train", self.trainer.progress.outcome))


def test_extra_hooks_run_before_the_checkpoint():
    extra = LossTally()
    names = [h.name for h in default_hooks([extra])]
    # Before the checkpoint: the state a checkpoint holds is that of the step it saves.
    assert names.index("LossTally") < names.index("Checkpointer")


@pytest.mark.slow
def test_a_new_hook_sees_every_step_after_train_on_a_stop_and_resumes_its_state(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=6, batch_size=1)
    out = tmp_path / "out"
    first = LossTally(stop_at=2)
    assert train.main(["--config", cfg, *QUIET], hooks=[first]) == 143  # SIGTERM: stopped after step 2
    assert first.calls == [
        "before_train",
        *[c for i in range(3) for c in (("before_step", i), ("after_step", i + 1, i + 1))],
        ("after_train", "stopped"),  # in the finally, after the stop
    ]
    logged = [r["loss"] for r in records(out, "train")]  # --print-freq 1: each step's loss
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["in_epoch"]["iteration"] == 3
    assert ckpt["hooks"]["LossTally"] == {"steps": 3, "loss_sum": sum(logged)}

    resumed = LossTally()
    assert train.main(["--config", cfg, *QUIET, "--resume", str(out / "checkpoint.pth")], hooks=[resumed]) == 0
    assert resumed.loaded == {"steps": 3, "loss_sum": sum(logged)}
    assert resumed.calls[:3] == ["load_state_dict", "before_train", ("before_step", 3)]
    assert resumed.calls[-1] == ("after_train", "done")
    end = torch.load(out / "checkpoint.pth", weights_only=True)
    all_losses = [r["loss"] for r in records(out, "train")]
    assert end["hooks"]["LossTally"]["steps"] == 6 and len(all_losses) == 6
    assert end["hooks"]["LossTally"]["loss_sum"] == pytest.approx(sum(all_losses), rel=1e-12)


@pytest.mark.slow
def test_a_checkpoint_without_hook_states_still_resumes(tmp_path, data_root):
    """A checkpoint written before hooks had state (no "hooks" entry): the hooks start afresh."""
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=2, epochs=2)
    out = tmp_path / "out"
    assert train.main(["--config", cfg, *QUIET, "--epochs", "1"]) == 0
    old = torch.load(out / "model_0.pth", weights_only=True)
    assert old.pop("hooks") == {}  # the recipe's own hooks keep no state
    torch.save(old, out / "old.pth")
    hook = LossTally()
    assert train.main(["--config", cfg, *QUIET, "--resume", str(out / "old.pth")], hooks=[hook]) == 0
    assert hook.loaded is None and hook.steps == 2 and hook.calls[-1] == ("after_train", "done")


class Breaks(LossTally):
    """At step 1: a NaN weight (a non-finite step, --nan-policy stop) or an error raised by the hook."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def before_step(self):
        super().before_step()
        if self.trainer.progress.done == 1 and self.how == "nan":
            with torch.no_grad():
                next(self.trainer.net.parameters()).fill_(float("nan"))
        elif self.trainer.progress.done == 1:
            raise RuntimeError("hook failed")


@pytest.mark.slow
@pytest.mark.parametrize("how,outcome", [("nan", "nonfinite"), ("error", "error")])
def test_after_train_runs_after_a_nonfinite_step_or_an_error(tmp_path, data_root, how, outcome):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=3)
    hook = Breaks(how)
    if how == "nan":
        assert train.main(["--config", cfg, *QUIET], hooks=[hook]) == 2
    else:
        with pytest.raises(RuntimeError, match="hook failed"):  # the hook's error, not an after_train one
            train.main(["--config", cfg, *QUIET], hooks=[hook])
    assert hook.calls[-1] == ("after_train", outcome)
    assert [c[0] for c in hook.calls if isinstance(c, tuple)].count("before_step") == 2


def _trainer(hooks, resume_ckpt=None):
    said = []
    run = SimpleNamespace(
        cfg=train_config.defaults(),
        writer=SimpleNamespace(say=said.append),
        device=torch.device("cpu"),
        resume_ckpt=resume_ckpt,
    )
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = TrainingParts(model, opt, None, None, None, TrainState(), run)
    return Trainer(run, model, None, parts, hooks), said


def test_two_hooks_with_one_name_are_refused():
    with pytest.raises(ValueError, match="'LossTally'"):  # their states would share one checkpoint entry
        _trainer([LossTally(), LossTally()])


def test_saved_hook_states_go_to_their_hooks_and_a_missing_hook_is_said():
    hook = LossTally()
    trainer, said = _trainer([hook], {"hooks": {"LossTally": {"steps": 4, "loss_sum": 2.5}, "Gone": {"n": 1}}})
    trainer._load_hook_states()
    assert hook.loaded == {"steps": 4, "loss_sum": 2.5} and hook.steps == 4
    assert len(said) == 1 and "Gone" in said[0]
