r"""Train a tv_lossfix detector with PyTorch Lightning, on the recipe's config, data and evaluation.

    python references/lightning/train.py --config references/configs/shapes.yaml \
        --gradient-clip-val 35 --precision 32-true --max-epochs 2

The flags below are Lightning's; every other flag is references/train.py's (``--help`` there lists
them) and sets the model, the data and the optimiser exactly as there. Clipping is the Trainer's:
after backward and, under ``--precision 16-mixed``, after ``GradScaler.unscale_``, before the step.
One device; for more, use ``DetectionModule`` (module.py) in your own script.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REFS = os.path.dirname(HERE)
for _p in (HERE, REFS):  # REFS first: "import train" is the recipe's train.py, not this file
    while _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402

import train as recipe  # noqa: E402 (for check_before_data: the recipe's checks that need no data)
from data import SIZE_SETTING_POLICIES  # noqa: E402
from errors import run_cli  # noqa: E402
from hooks import report_before_step_one  # noqa: E402
from module import OPTIM_KEYS, DetectionModule, EvalData  # noqa: E402
from run_context import Run  # noqa: E402
from run_data import build_data as build_recipe_data  # noqa: E402
from run_data import resolve_class_weight  # noqa: E402
from train_config import OPTIONS, ConfigError, TrainConfig, dump, resolve  # noqa: E402
from writers import EventWriter  # noqa: E402

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="references/lightning/train.py",
        description="Train a tv_lossfix detector with PyTorch Lightning on the recipe's config and data.",
        epilog="Every other flag (--config, --model, --lr, --data-path, ...) is references/train.py's: "
        "see python references/train.py --help.",
    )
    p.add_argument(
        "--gradient-clip-val",
        type=float,
        default=None,
        metavar="MAX",
        help="Trainer(gradient_clip_val=MAX, gradient_clip_algorithm='norm'): global L2-norm clipping; "
        "0 = off (default: the config's training.gradient_clip.max_norm when enabled, else off)",
    )
    p.add_argument(
        "--precision", default="32-true", choices=PRECISIONS, help="Trainer(precision=...) (default: 32-true)"
    )
    p.add_argument("--max-epochs", type=int, default=None, help="default: the config's training.epochs")
    return p


def parse(argv: Optional[List[str]] = None):
    """(Lightning's flags, the recipe's config, its LossConfig); None for --print-config."""
    args, rest = build_parser().parse_known_args(argv)
    if args.gradient_clip_val is not None and args.gradient_clip_val < 0:
        raise ConfigError(f"--gradient-clip-val must be >= 0 (0 = off), got {args.gradient_clip_val:g}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    cfg, loss_cfg, print_only = resolve(rest)
    if print_only:
        print(dump(cfg, loss_cfg), end="")
        return None
    return args, cfg, loss_cfg


def check_supported(cfg: TrainConfig) -> None:
    """A recipe setting this loop cannot honour (Opt.lightning false or a hint, config_schema.py) is refused
    in one line, never ignored; its default, or a value that asks for nothing (Opt.off), is accepted.
    The model: and data: keys go through the recipe's own code (run_data.build_data, build_module)."""
    for o in OPTIONS:
        v = cfg.get(o.path)
        if o.lightning in (None, True) or v == o.default or v == o.off:
            continue
        hint = f": {o.lightning}" if isinstance(o.lightning, str) else ""
        raise ConfigError(
            f"{o.path} = {v!r} is references/train.py's and cannot take effect in the Lightning loop{hint}"
        )
    clip = cfg.training.gradient_clip
    if clip.enabled and float(clip.norm_type) != 2.0:
        raise ConfigError(
            f"training.gradient_clip.norm_type {clip.norm_type}: Lightning's Trainer clips the L2 norm only"
        )


def build_data(cfg: TrainConfig, loss_cfg):
    """The recipe's own datasets, checks and loaders (references/run_data.py build_data), and
    model.roi_head.class_weight: auto resolved from the training data as train.py does (said; the
    returned run's cfg and loss_cfg hold the list)."""
    run = Run(cfg, loss_cfg, torch.device("cpu"), 0, EventWriter("", True), "")
    data = build_recipe_data(run)
    resolve_class_weight(run, data)
    return run, data


def build_module(cfg: TrainConfig, loss_cfg, data) -> DetectionModule:
    m, t = cfg.model, cfg.training
    kwargs = dict(m.kwargs)
    if m.rpn_score_thresh is not None:
        kwargs["rpn_score_thresh"] = m.rpn_score_thresh
    if cfg.data.augmentation in SIZE_SETTING_POLICIES:
        kwargs["_skip_resize"] = True  # the policy sets the input size, as in references/train.py
    return DetectionModule(
        m.name,
        data.num_classes,
        loss_cfg,
        training={k: getattr(t, k) for k in OPTIM_KEYS},
        model_kwargs=kwargs,
        weights=m.weights,
        weights_backbone=m.weights_backbone,
        trainable_backbone_layers=m.trainable_backbone_layers,
        anchor_sizes=m.anchor_sizes,
        aspect_ratios=m.aspect_ratios,
        eval_data=EvalData(data.coco_val, data.label_to_cat, data.names),
        class_agnostic_bbox=m.class_agnostic_bbox,
        class_agnostic_mask=m.class_agnostic_mask,
    )


def _accelerator(device: str, say) -> tuple:
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        say("CUDA is not available: running on the CPU")
        return "cpu", 1
    return (d.type, [d.index or 0]) if d.type == "cuda" else (d.type, 1)


def clip_value(args, cfg: TrainConfig) -> Optional[float]:
    """--gradient-clip-val, else the config's clipping; None = off."""
    clip = cfg.training.gradient_clip
    value = args.gradient_clip_val if args.gradient_clip_val is not None else clip.max_norm * clip.enabled
    return float(value) if value else None


class LossLine(pl.Callback):
    """references/train.py's console line every ``every`` steps: the only host read of the losses."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every:
            return
        m = trainer.callback_metrics
        terms = [k for k in m if k.startswith("train/loss_") and k.endswith("_step") and k != "train/loss_step"]
        shown = " ".join(f"{k[len('train/loss_') : -len('_step')]} {float(m[k]):.4f}" for k in terms)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        norm = f" grad_norm {float(m['train/grad_norm']):.3f}" if "train/grad_norm" in m else ""
        pl_module.print(
            f"epoch {trainer.current_epoch} step {trainer.global_step} lr {lr:.5f} "
            f"loss {float(m['train/loss_step']):.4f} ({shown}){norm}"
        )


def build_trainer(args, cfg: TrainConfig, say=print, **overrides) -> pl.Trainer:
    t = cfg.training
    accelerator, devices = _accelerator(t.device, say)
    kw: Dict[str, Any] = dict(
        accelerator=accelerator,
        devices=devices,
        precision=args.precision,
        max_epochs=args.max_epochs or t.epochs,
        gradient_clip_val=clip_value(args, cfg),
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.print_freq,
        check_val_every_n_epoch=t.eval_every,
        limit_train_batches=t.iters_per_epoch or 1.0,
        deterministic=True if t.use_deterministic_algorithms else None,
        callbacks=[LossLine(t.print_freq)],
    )
    if t.output_dir:
        kw["default_root_dir"] = t.output_dir
    else:  # torchvision's "save nothing"
        kw.update(logger=False, enable_checkpointing=False)
    kw.update(overrides)
    try:
        return pl.Trainer(**kw)
    except (MisconfigurationException, ValueError) as e:
        raise ConfigError(f"lightning.Trainer: {str(e).splitlines()[0]}") from None


def fit(trainer: pl.Trainer, module, data, eval_every: int, say=print) -> None:
    """``trainer.fit``, then one validation after the last epoch unless check_val_every_n_epoch just
    ran it: references/train.py evaluates every N epochs *and after the last*, Lightning only every N."""
    trainer.fit(module, data.train_loader, data.val_loader)
    epochs = trainer.current_epoch  # epochs completed
    if trainer.interrupted or not epochs or epochs % eval_every == 0 or not trainer.limit_val_batches:
        return
    say(f"Lightning: validating after the last epoch ({epochs}; training.eval_every {eval_every}), as train.py does")
    trainer.validate(module, data.val_loader, verbose=False)


def main(argv: Optional[List[str]] = None) -> int:
    parsed = parse(argv)
    if parsed is None:  # --print-config
        return 0
    args, cfg, loss_cfg = parsed
    check_supported(cfg)
    # Lightning writes its own lightning_logs/version_N: a train.py run's files in the folder are not mixed.
    recipe.check_before_data(cfg, loss_cfg, own_files=False)
    t = cfg.training
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    pl.seed_everything(t.seed, verbose=False)
    run, data = build_data(cfg, loss_cfg)
    module = build_module(run.cfg, run.loss_cfg, data)
    for line in module.replaced + module.anchor_changes:
        run.writer.say(line)
    report_before_step_one(run, data, module.model)  # the lr check and the data / anchor report
    trainer = build_trainer(args, cfg, run.writer.say)
    clip = trainer.gradient_clip_val
    run.writer.say(
        f"Lightning: precision {args.precision}, gradient clipping {f'max_norm {clip:g}' if clip else 'off'}"
    )
    fit(trainer, module, data, t.eval_every, run.writer.say)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
