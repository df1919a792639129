"""samplers.py: the training samplers' interface and registry. A new sampler is one TrainSampler class plus
one registration (``@register_sampler``) and ``data.sampler: <name>``; the registered ones keep the
contract a mid-epoch resume relies on (the order follows from the seed and the epoch)."""

import os
import signal

import pytest

import train
import train_config
from helpers import raises_naming, records, tiny_config, train_loads
from hooks import HookBase
from samplers import (
    SAMPLERS,
    GroupedBatchSampler,
    RepeatFactorSampler,
    SeededRandomSampler,
    TrainSampler,
    aspect_ratio_groups,
    check_sampler,
    register_sampler,
    sampler_name,
)
from training_checkpoint import CheckpointError

QUIET = ["--no-data-report"]


class ReversedOrder(TrainSampler):
    """A new sampler: the images last to first, rotated by one more each epoch."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    @classmethod
    def from_run(cls, run, dataset):
        return cls(len(dataset))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))[::-1]
        k = self.epoch % self.n
        return iter(order[k:] + order[:k])

    def __len__(self):
        return self.n


@pytest.fixture
def reversed_order():
    register_sampler("reversed")(ReversedOrder)  # the one registration
    yield ReversedOrder
    SAMPLERS.pop("reversed")


@pytest.mark.slow
def test_a_new_sampler_trains_in_its_order(tmp_path, data_root, monkeypatch, reversed_order):
    cfg = tiny_config(tmp_path, data_root, batch_size=4, epochs=2)
    loaded = train_loads(monkeypatch)
    assert train.main(["--config", cfg, *QUIET, "--sampler", "reversed"]) == 0
    # The 8 training images: epoch 0 from the last, epoch 1 rotated by one.
    assert loaded == [7, 6, 5, 4, 3, 2, 1, 0] + [6, 5, 4, 3, 2, 1, 0, 7]
    assert records(tmp_path / "out", "eval")[-1]["epoch"] == 1


class StopAt(HookBase):
    """Sends SIGTERM during the step after ``done`` iterations: the run stops after it with a checkpoint."""

    def __init__(self, done):
        self.done = done

    def before_step(self):
        if self.trainer.progress.done == self.done:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_mid_epoch_resume_refuses_another_sampler(tmp_path, data_root, reversed_order):
    cfg = tiny_config(tmp_path, data_root, batch_size=2)
    assert train.main(["--config", cfg, *QUIET], hooks=[StopAt(1)]) == 143
    ckpt = str(tmp_path / "out" / "checkpoint.pth")
    # The epoch's remaining batches follow from the sampler the checkpoint was trained with.
    with pytest.raises(CheckpointError, match=r"data\.sampler: None -> 'reversed' refused"):
        train.main(["--config", cfg, *QUIET, "--sampler", "reversed", "--resume", ckpt])


def _cfg(**data):
    return train_config.defaults().replace({f"data.{k}": v for k, v in data.items()})


def test_the_default_rule_picks_repeat_factor_with_a_threshold():
    assert sampler_name(_cfg()) == "random"
    assert sampler_name(_cfg(repeat_factor_threshold=0.3)) == "repeat_factor"
    assert sampler_name(_cfg(sampler="random")) == "random"


def test_check_sampler_names_the_key(reversed_order):
    with raises_naming(train_config.ConfigError, "data.sampler", "'nope'", "reversed"):
        check_sampler(_cfg(sampler="nope"))
    with raises_naming(train_config.ConfigError, "data.repeat_factor_threshold", "reversed", "repeat_factor"):
        check_sampler(_cfg(sampler="reversed", repeat_factor_threshold=0.3))
    with raises_naming(train_config.ConfigError, "data.repeat_factor_threshold", "data.sampler"):
        check_sampler(_cfg(sampler="repeat_factor"))
    check_sampler(_cfg(sampler="reversed"))
    check_sampler(_cfg(sampler="repeat_factor", repeat_factor_threshold=0.3))


@pytest.mark.parametrize(
    "make",
    [lambda: SeededRandomSampler(11, seed=5), lambda: RepeatFactorSampler([1.0, 2.5, 0.5, 1.2] * 3, seed=5)],
    ids=["random", "repeat_factor"],
)
def test_registered_samplers_draw_each_epoch_from_the_seed_alone(make):
    """The contract a mid-epoch resume relies on: a fresh sampler set to the epoch draws the same order."""
    a, b = make(), make()
    a.set_epoch(0)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and len(a) == len(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert isinstance(a, TrainSampler) and SAMPLERS[a.name] is type(a)


def test_grouped_batch_sampler_covers_every_sample_once():
    ratios = [0.5, 2.0, 1.0, 0.5, 2.0, 1.0, 1.0, 0.7, 1.4, 3.0, 0.3]
    groups = aspect_ratio_groups(ratios, 3)
    assert groups[0] == groups[3] and groups[1] == groups[4]
    sampler = GroupedBatchSampler(SeededRandomSampler(len(ratios), seed=1), groups, batch_size=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    assert sorted(i for b in batches for i in b) == list(range(len(ratios)))


def test_a_mid_epoch_resume_refuses_a_change_of_a_key_a_registered_sampler_reads(monkeypatch, reversed_order):
    """A sampler's ``reads`` are fixed across a mid-epoch resume even where the schema does not mark them."""
    import run_model

    key = "training.print_freq"  # a key no schema policy fixes, standing for a new sampler's own key
    assert key not in train_config.mid_epoch_fixed_paths()
    monkeypatch.setattr(ReversedOrder, "reads", (key,))
    base = train_config.defaults()
    saved = base.replace({key: 7}).to_dict()
    cfg = base.replace({key: 9})
    ckpt = {"config": saved, "in_epoch": {"epoch": 2, "iteration": 5}}
    lines = run_model._mid_epoch_refusals(ckpt, cfg)
    assert [line.split(":")[0] for line in lines] == [key]
    assert run_model._mid_epoch_refusals({"config": saved}, cfg) == []
