r"""Train or evaluate a torchvision two-stage detector with tv_lossfix's configurable losses.

Command line compatible with torchvision's references/detection/train.py, plus a YAML config,
gradient clipping, a NaN policy, data checks and collapse diagnostics.

    # the embedded demo (CPU, ~5 min):
    torchrun --standalone --nproc_per_node=1 references/train.py --config references/configs/shapes.yaml
    # 8 GPUs, your config, flags override it:
    torchrun --nproc_per_node=8 references/train.py --config my.yaml --lr 0.02 --amp
    # COCO, as torchvision's reference:
    torchrun --nproc_per_node=8 references/train.py --dataset coco --data-path /data/coco --model maskrcnn_resnet50_fpn

Outputs in --output-dir: config.yaml (resolved), metrics.jsonl, checkpoint.pth + model_<epoch>.pth
(atomic writes), TensorBoard events (if installed), training_curves.png, eval_curves.png, gallery.png.

This file checks what needs no data, sets the run up and assembles it: the data (run_data.py), the model
and its optimisation (run_model.py), then trainer.Trainer with the hooks of hooks.py runs the epochs.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from tv_lossfix.checkpoint import model_state_dict  # noqa: E402

import distributed  # noqa: E402
from diagnostics import per_class_table  # noqa: E402
from errors import run_cli  # noqa: E402
from evaluation import evaluate  # noqa: E402
from hooks import HookBase, default_hooks  # noqa: E402
from models import (  # noqa: E402
    check_anchors,
    check_model_kwargs,
    check_model_name,
    check_weights_model,
    check_weights_path,
    ensure_weights_file,
    resolve_weights,
)
from output_dir import check_epochs_left, check_output_dir, prepare_output_dir  # noqa: E402
from run_context import Run  # noqa: E402
from run_data import Data, build_data, resolve_class_weight, resolve_fed_image_counts  # noqa: E402
from run_model import build_model_for, build_optimization, resume  # noqa: E402
from samplers import check_sampler  # noqa: E402
from tiles import sliced  # noqa: E402
from train_config import ConfigError, TrainConfig, dump, resolve  # noqa: E402
from trainer import Trainer, iters_per_epoch  # noqa: E402
from training_checkpoint import (  # noqa: E402
    CheckpointError,
    TrainingParts,
    atomic_write_text,
    checkpoint_model_name,
    load_training_checkpoint,
    release_lock,
)
from writers import EventWriter  # noqa: E402


# -- 1. checks against the machine and the files, before any data (train_config.validate did the rest) --
def check_before_data(cfg: TrainConfig, loss_cfg=None, own_files: bool = True) -> Optional[Dict[str, Any]]:
    """The checks of a validated config against this machine and its files (model name, its keywords and
    sampler, output folder, weights, the --resume checkpoint) before any data is read; returns the
    --resume checkpoint (read once)."""
    m, t = cfg.model, cfg.training
    check_model_name(m.name)
    check_model_kwargs(m.name, m.kwargs, loss_cfg, m.stock)
    check_anchors(m.name, m.anchor_sizes, m.aspect_ratios)  # against the backbone's feature maps
    check_sampler(cfg)  # data.sampler: registered, and no other sampler's key set
    check_output_dir(t, own_files)  # a file, not writable, or (own_files) holding another run's checkpoint
    check_weights_path(m.weights)
    check_weights_model(m.name, m.weights)  # another model's checkpoint fails here, not after the data
    # A bad name fails here, listing the valid ones; weights not yet downloaded are fetched now, so
    # that a machine without network fails here, in one line, and not after the data pass.
    ensure_weights_file(resolve_weights(m.name, m.weights))
    ensure_weights_file(resolve_weights(m.name, m.weights_backbone, "--weights-backbone"), "--weights-backbone")
    if not t.resume:
        return None
    ckpt = load_training_checkpoint(t.resume)
    saved = checkpoint_model_name(ckpt)
    if saved is not None and saved != m.name:
        raise CheckpointError(f"--resume {t.resume} holds a {saved} model, not --model {m.name}")
    check_epochs_left(cfg, ckpt)
    return ckpt


def setup(argv: Optional[List[str]]) -> Optional[Run]:
    cfg, loss_cfg, print_only = resolve(argv)
    if print_only:
        print(dump(cfg, loss_cfg), end="")
        return None
    ckpt = check_before_data(cfg, loss_cfg)
    t = cfg.training
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    # torchvision's default is --device cuda; without a GPU we say so and use the CPU.
    cuda_missing = t.device.startswith("cuda") and not torch.cuda.is_available()
    device = torch.device("cpu" if cuda_missing else t.device)
    info = distributed.detect(cfg.distributed.world_size)
    distributed.init(info, device.type, cfg.distributed.backend, cfg.distributed.dist_url)
    if device.type == "cuda" and info.launcher != "none":
        device = torch.device("cuda", info.local_rank)
    out_dir = t.output_dir
    lock, said = _take_output_dir(out_dir, t, cfg.model.weights)
    try:  # from here on the lock is released on every error (main's finally releases it after)
        run = Run(cfg, loss_cfg, device, info.rank, EventWriter(out_dir, distributed.is_main()), out_dir, ckpt)
        run.lock = lock
        run.writer.record(start_record(t.resume, ckpt))
        for line in said:
            run.writer.say(line)
        if cuda_missing:
            run.writer.say("CUDA is not available: running on the CPU")
        _record_what_runs(run)
    except BaseException:
        release_lock(lock)
        raise
    random.seed(t.seed + info.rank)
    torch.manual_seed(t.seed + info.rank)
    if t.use_deterministic_algorithms:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    return run


def _take_output_dir(out_dir: str, t, weights: Optional[str]):
    """Rank 0 alone creates, clears and locks --output-dir; every rank learns whether it could (the
    others would otherwise wait at a barrier for a rank 0 that refused the folder). (lock, lines to say)"""
    lock, said, refusal = None, [], None
    if out_dir and distributed.is_main():
        try:
            lock, said = prepare_output_dir(out_dir, t.overwrite, [weights, t.resume])
        except (ConfigError, CheckpointError) as e:
            refusal = e
    refused_by_main = distributed.all_gather(str(refusal) if refusal else None)[0]  # a barrier too
    if refusal is not None:
        raise refusal
    if refused_by_main:
        raise CheckpointError(f"rank 0: {refused_by_main}")
    return lock, said


def start_record(resume_path: str, ckpt: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The first metrics.jsonl record of a run. After a resume, the earlier runs' records from past
    the checkpoint (a larger ``iter``, or an epoch after ``epoch``) were superseded."""
    if ckpt is None:
        return {"type": "run", "resumed_from": None, "epoch": None, "iter": 0}
    state = ckpt.get("state") if isinstance(ckpt.get("state"), dict) else {}
    return {"type": "run", "resumed_from": resume_path, "epoch": ckpt.get("epoch"), "iter": state.get("iteration")}


def _record_what_runs(run: Run) -> None:
    """The saved config records what actually runs (device, amp, world size), not what was asked."""
    t = run.cfg.training
    changes: Dict[str, Any] = {"training.device": str(run.device), "distributed.world_size": distributed.world()}
    if t.amp and run.device.type != "cuda":
        run.writer.say("--amp needs CUDA (float16 autocast + GradScaler): training in float32 on the CPU")
        changes["training.amp"] = False
    if t.auto_scale_lr:
        images = t.batch_size * distributed.world()
        scaled = t.lr * images / 16
        run.writer.say(
            f"training.auto_scale_lr: lr {t.lr:g} is for 16 images per step; {images} per step here -> lr {scaled:g}"
        )
        # Folded into lr: a resumed run must not scale it twice.
        changes.update({"training.lr": scaled, "training.auto_scale_lr": False})
    run.cfg = run.cfg.replace(changes)


def save_config(run: Run) -> None:
    if not run.out_dir or not distributed.is_main():
        return
    path = run.config_path
    atomic_write_text(dump(run.cfg, run.loss_cfg), path)
    m = run.cfg.model
    changed = _loss_changes(run.loss_cfg)
    run.writer.say(
        f"tv_lossfix training: {m.name} ({'stock torchvision' if m.stock else 'tv_lossfix heads'}) on "
        f"{run.device}, {distributed.world()} process(es); losses: {changed}; config saved to {path}"
    )


def _loss_changes(loss_cfg) -> str:
    diffs = [f"{k}={v}" for k, v in loss_cfg.changed_keys().items()]
    return ", ".join(diffs) if diffs else "torchvision's defaults"


# -- 2. data (run_data.py), model and optimisation (run_model.py); 3. train (trainer.py) or evaluate --
def evaluate_only(run: Run, model, net, data: Data) -> int:
    if run.cfg.model.weights is None and run.resume_ckpt is None:
        run.writer.say("--test-only without --weights or --resume evaluates a randomly initialised model")
    if run.resume_ckpt is not None:
        try:
            net.load_state_dict(model_state_dict(run.resume_ckpt, run.cfg.training.resume, "--resume"))
        except RuntimeError as e:
            raise CheckpointError(
                f"--resume: {run.cfg.training.resume} does not fit --model "
                f"{run.cfg.model.name}: {str(e).splitlines()[0]}"
            ) from None
    torch.backends.cudnn.deterministic = True  # as torchvision's --test-only
    d = run.cfg.data
    sliced_model = sliced(model, d.tile_size, d.tile_overlap, d.tile_whole_image)
    res = evaluate(sliced_model, data.val_loader, run.device, data.coco_val, data.label_to_cat, run.writer, data.names)
    if distributed.is_main():
        run.writer.say(per_class_table(res["per_class"], res["score_thresh"]))
        run.writer.record({"type": "eval", "epoch": run.cfg.training.start_epoch, **res})
    return 0


def main(argv: Optional[List[str]] = None, hooks: Sequence[HookBase] = ()) -> int:
    """Train (or evaluate) as the command line says; ``hooks``: extra hooks.HookBase the trainer runs too."""
    run = setup(argv)
    if run is None:  # --print-config
        return 0
    try:
        save_config(run)
        data = build_data(run)
        resolve_class_weight(run, data)
        resolve_fed_image_counts(run, data)
        model, net = build_model_for(run, data)
        if run.cfg.training.test_only:
            return evaluate_only(run, model, net, data)
        t = run.cfg.training
        iters = iters_per_epoch(data.train_loader, t)
        optimizer, lr_scheduler, warmup, state = build_optimization(run, net, iters)
        scaler = torch.amp.GradScaler("cuda") if t.amp and run.device.type == "cuda" else None
        parts = TrainingParts(net, optimizer, lr_scheduler, warmup, scaler, state, run, data.names)
        if run.resume_ckpt is not None:
            resume(parts, iters)
        return Trainer(run, model, data, parts, default_hooks(hooks)).train()
    finally:
        run.writer.close()
        release_lock(run.lock)
        distributed.cleanup(ok=sys.exc_info()[0] is None)


def cli(argv: Optional[List[str]] = None, hooks: Sequence[HookBase] = ()) -> int:
    """``main`` as a command: a user error ends the run in one line on stderr, exit code 1."""
    try:
        return run_cli(lambda: main(argv, hooks))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which stops with a checkpoint itself)
        print("interrupted (SIGINT) before training began or after it ended: nothing more saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
