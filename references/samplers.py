"""The order the training images come in: one small interface for the per-image samplers, chosen by name
from the config in one place (``data.sampler``, as Detectron2's ``DATALOADER.SAMPLER_TRAIN``), batched by
aspect-ratio group or plainly, and skipped into mid-epoch on ``--resume``.

Adding a sampler: a :class:`TrainSampler` subclass and ``@register_sampler("name")`` on it; ``data.sampler:
name`` (``--sampler name``) then trains with it. Registered here: ``random`` (a seeded shuffle;
DistributedSampler's under DDP) and ``repeat_factor`` (LVIS / Detectron2). ``data.sampler`` null keeps the
recipe's rule: ``repeat_factor`` when ``data.repeat_factor_threshold`` is given, else ``random``.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING, ClassVar, Dict, Iterator, List, Sequence, Tuple, Type

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler
from torch.utils.data.distributed import DistributedSampler

import distributed
from data import image_classes, repeat_factors
from train_config import BY_PATH, ConfigError, TrainConfig

if TYPE_CHECKING:
    from run_context import Run


class TrainSampler(Sampler):
    """The per-image order of one epoch on this rank: the interface every training sampler keeps.

    * ``set_epoch(epoch)`` before each epoch; iterating then yields dataset indices, and ``len()`` is how
      many (this rank's share). The order must follow from the seed and the epoch alone (a generator seeded
      per epoch, never the global RNG): a mid-epoch ``--resume`` draws the epoch again and skips the batches
      already trained (:func:`skip_batches`), so it continues the interrupted order exactly.
    * ``exact_length``: False where ``len()`` changes from epoch to epoch (the plan line then says ``~``).
    * ``reads``: the config keys the sampler reads. Another sampler refuses them at a non-default value
      (:func:`check_sampler`); a change of them across a mid-epoch resume would change the epoch's
      remaining batches, so the resume must refuse it (as ``data.sampler`` itself).
    * ``check(cfg)``: rules on the config before any data is read (a ConfigError naming the key);
      ``from_run(run, dataset)``: the sampler for this run (seed ``run.cfg.training.seed``, this rank's share).
    """

    name: ClassVar[str] = ""  # set by register_sampler
    reads: ClassVar[Tuple[str, ...]] = ()
    exact_length: ClassVar[bool] = True

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Nothing to check by default."""

    @classmethod
    def from_run(cls, run: "Run", dataset) -> "TrainSampler":
        raise NotImplementedError(f"{cls.__name__}.from_run")

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError(f"{type(self).__name__}.set_epoch")


SAMPLERS: Dict[str, Type[TrainSampler]] = {}


def register_sampler(name: str):
    """Class decorator: ``data.sampler: name`` builds the class's ``from_run``."""

    def add(cls: Type[TrainSampler]) -> Type[TrainSampler]:
        if name in SAMPLERS:
            raise ValueError(f"data.sampler {name!r} is registered twice ({SAMPLERS[name].__name__}, {cls.__name__})")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return add


def sampler_name(cfg: TrainConfig) -> str:
    """``data.sampler``; where null, ``repeat_factor`` when data.repeat_factor_threshold is given, else ``random``."""
    d = cfg.data
    if d.sampler is not None:
        return d.sampler
    return "repeat_factor" if d.repeat_factor_threshold is not None else "random"


def check_sampler(cfg: TrainConfig) -> None:
    """Before any data: the sampler exists, no other sampler's key is set, and its own rules hold."""
    name = sampler_name(cfg)
    if name not in SAMPLERS:
        raise ConfigError(f"data.sampler (--sampler) {name!r} is not a registered sampler: {', '.join(SAMPLERS)}")
    chosen = SAMPLERS[name]
    for other in SAMPLERS.values():
        for key in other.reads:
            value = cfg.get(key)
            if key not in chosen.reads and value != BY_PATH[key].default:
                raise ConfigError(
                    f"{key} = {value!r} has no effect: data.sampler {name} does not read it ({other.name} does)"
                )
    chosen.check(cfg)


def build_train_batches(run: "Run", dataset) -> Tuple[TrainSampler, Sampler]:
    """(the per-image sampler data.sampler names, the loader's batch sampler over it: aspect-ratio groups
    as torchvision's --aspect-ratio-group-factor, or plain batches without the last partial one at -1)."""
    d, t = run.cfg.data, run.cfg.training
    sampler = SAMPLERS[sampler_name(run.cfg)].from_run(run, dataset)
    if d.aspect_ratio_group_factor >= 0:
        groups = aspect_ratio_groups(dataset.aspect_ratios(), d.aspect_ratio_group_factor)
        return sampler, GroupedBatchSampler(sampler, groups, t.batch_size)
    return sampler, BatchSampler(sampler, t.batch_size, drop_last=True)


# -- batching -------------------------------------------------------------------------------------
def aspect_ratio_groups(ratios: Sequence[float], k: int) -> List[int]:
    """Group index of each image: log2 aspect ratio quantized into 2k bins (torchvision's scheme)."""
    bins = [2**x for x in np.linspace(-1, 1, 2 * k + 1)] if k > 0 else [1.0]
    return [bisect.bisect_right(bins, r) for r in ratios]


class GroupedBatchSampler(Sampler):
    """Batches whose images share an aspect-ratio group (less padding), from any base sampler.

    Leftovers of the groups are merged at the end, so there are exactly ceil(N / batch_size)
    batches and every sample of the base sampler appears once.
    """

    def __init__(self, sampler: Sampler, group_ids: Sequence[int], batch_size: int):
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[List[int]]:
        buffers: Dict[int, List[int]] = {}
        for idx in self.sampler:
            buf = buffers.setdefault(self.group_ids[idx], [])
            buf.append(idx)
            if len(buf) == self.batch_size:
                yield list(buf)
                buf.clear()
        rest = [i for buf in buffers.values() for i in buf]
        for k in range(0, len(rest), self.batch_size):
            yield rest[k : k + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)


class SkipBatches:
    """The batches of ``batch_sampler`` after its first ``skip``: a mid-epoch resume draws the epoch's
    batch order as the interrupted run did (the base sampler is seeded per (seed, epoch)) and skips
    the batches already trained on at the index level, without loading their images."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        it = iter(self.batch_sampler)
        for _ in range(self.skip):
            if next(it, None) is None:
                return
        yield from it

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def skip_batches(loader, skip: int):
    """``loader`` (built with a ``batch_sampler``) without its epoch's first ``skip`` batches."""
    from torch.utils.data import DataLoader

    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(
        loader.dataset,
        batch_sampler=SkipBatches(loader.batch_sampler, skip),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=False,
        **extra,
    )


# -- the registered samplers ------------------------------------------------------------------------
@register_sampler("random")
class SeededRandomSampler(TrainSampler):
    """A random permutation per epoch from (seed, epoch): the order is reproducible on resume. Under DDP
    ``from_run`` gives :class:`DistributedShuffle` (torch's DistributedSampler) instead."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    @classmethod
    def from_run(cls, run: "Run", dataset) -> TrainSampler:
        seed = run.cfg.training.seed
        if distributed.is_dist():
            return DistributedShuffle(dataset, shuffle=True, seed=seed)
        return cls(len(dataset), seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class DistributedShuffle(DistributedSampler, TrainSampler):
    """torch's DistributedSampler (a (seed, epoch) shuffle padded to a multiple of the world; rank k takes
    every world-th index from k): ``random`` under DDP."""

    name = "random"


# Repeat-factor sampling (Gupta et al., LVIS 2019; Detectron2's RepeatFactorTrainingSampler).
@register_sampler("repeat_factor")
class RepeatFactorSampler(TrainSampler):
    """Each image ``floor(r) + (u < frac(r))`` times per epoch, shuffled; this rank's share of the list.

    The generator is seeded with ``seed + epoch`` (as DistributedSampler and SeededRandomSampler), so
    an epoch draws the same list on every rank and again after --resume. Draw order: ``u`` =
    torch.rand(N, float64), then torch.randperm of the repeated list. The list is padded with its own
    first entries to a multiple of ``world`` and rank k takes entries k, k + world, ... (as
    DistributedSampler), so all ranks have the same length and their shares are disjoint.
    ``len()`` is this epoch's share: it changes with set_epoch, as the rounding does.
    """

    reads = ("data.repeat_factor_threshold", "data.repeat_sqrt")
    exact_length = False

    def __init__(self, factors: Sequence[float], seed: int = 0, rank: int = 0, world: int = 1):
        f = torch.as_tensor(factors, dtype=torch.float64).reshape(-1)
        if len(f) == 0 or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("RepeatFactorSampler: factors must be a non-empty list of finite numbers >= 0")
        if not 0 <= rank < world:
            raise ValueError(f"RepeatFactorSampler: rank {rank} is not in [0, {world})")
        self.whole, self.frac = torch.floor(f), f - torch.floor(f)
        self.seed, self.rank, self.world = seed, rank, world
        self.expected = float(f.sum())
        self.set_epoch(0)

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        if cfg.data.repeat_factor_threshold is None:
            raise ConfigError(
                "data.sampler repeat_factor needs data.repeat_factor_threshold (--repeat-factor-threshold T)"
            )

    @classmethod
    def from_run(cls, run: "Run", dataset) -> "RepeatFactorSampler":
        d, coco = run.cfg.data, dataset.coco
        tiled = getattr(dataset, "item_classes", None)  # tiles: each tile's classes
        classes = tiled() if tiled else image_classes(coco.dataset["annotations"], dataset.ids)
        factors, per_class = repeat_factors(classes, d.repeat_factor_threshold, d.repeat_sqrt)
        sampler = cls(factors, run.cfg.training.seed, distributed.rank(), distributed.world())
        sampler._report(run, dataset, per_class)
        return sampler

    def _report(self, run: "Run", dataset, per_class: Dict[int, float]) -> None:
        """The line and record of what repeats: the classes' factors and the epoch's expected length."""
        d, coco = run.cfg.data, dataset.coco
        names = {c: coco.cats[c].get("name", str(c)) if c in coco.cats else str(c) for c in per_class}
        ranked = sorted(per_class, key=lambda c: -per_class[c])
        repeated = [c for c in ranked if per_class[c] > 1]
        shown = ", ".join(f"{names[c]} x{per_class[c]:.2f}" for c in repeated[:5])
        shown = shown or "no class is rare enough to repeat"
        shown += f" (+{len(repeated) - 5} more)" if len(repeated) > 5 else ""
        rule = "sqrt(t / f)" if d.repeat_sqrt else "t / f"
        run.writer.say(
            f"repeat-factor sampling, data.repeat_factor_threshold {d.repeat_factor_threshold:g} ({rule}): "
            f"{shown}; {self.expected:.1f} images per epoch expected (epoch 0 draws {self.epoch_total}) "
            f"vs {len(dataset)} in the dataset"
        )
        run.writer.record(
            {
                "type": "repeat_factors",
                "threshold": d.repeat_factor_threshold,
                "sqrt": d.repeat_sqrt,
                "class_factors": {names[c]: per_class[c] for c in ranked},
                "images": len(dataset),
                "expected_images_per_epoch": self.expected,
                "epoch0_images": self.epoch_total,
                "epoch0_images_per_rank": len(self),
            }
        )

    def epoch_indices(self, epoch: int) -> List[int]:
        """The whole epoch's shuffled list, the same on every rank (before padding)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        u = torch.rand(len(self.frac), generator=g, dtype=torch.float64)
        counts = (self.whole + (u < self.frac).double()).long()
        repeated = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return repeated[torch.randperm(len(repeated), generator=g)].tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        indices = self.epoch_indices(epoch)
        self.epoch_total = len(indices)
        pad = -len(indices) % self.world
        while pad > 0 and indices:  # a list shorter than the padding is repeated whole, as DistributedSampler does
            indices += indices[:pad]
            pad = -len(indices) % self.world
        self._share = indices[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._share)

    def __len__(self) -> int:
        return len(self._share)
