"""The run's --output-dir: checked before any data (a file, not writable, another run's checkpoints),
then created, locked against a second run, and cleared of a killed run's temp files (and, with
--overwrite, of the previous run's files); and the --resume that would train nothing."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

from train_config import ConfigError, TrainConfig, TrainingConfig
from training_checkpoint import (
    CheckpointError,
    acquire_lock,
    release_lock,
    remove_run_files,
    remove_stale_temp_files,
    run_files,
)


def check_output_dir(t: TrainingConfig, writes_checkpoints: bool = True) -> None:
    """Before any data: --output-dir can be written, and (for a writer of train.py's checkpoints) holds no
    other run's checkpoint unless --resume or --overwrite."""
    if t.output_dir:
        _check_writable(t.output_dir)
        if writes_checkpoints:
            _check_reuse(t)


def _check_writable(out_dir: str) -> None:
    if not out_dir:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--output-dir {out_dir!r} is a file, not a folder")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output-dir {out_dir!r}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--output-dir {out_dir!r}: {parent} is not writable")


def resumes_in_place(t) -> bool:
    """--resume continues the run whose checkpoint lies in --output-dir (not another folder's run)."""
    return bool(t.resume) and os.path.dirname(os.path.realpath(t.resume)) == os.path.realpath(t.output_dir)


def _check_reuse(t) -> None:
    """A new run in a folder holding another run's checkpoint would mix the two runs' files; so would a
    --resume of another folder's checkpoint into it."""
    if t.overwrite and resumes_in_place(t):
        raise ConfigError(
            f"--overwrite with --resume {t.resume}: it would remove the files of the run that --resume continues "
            f"in {t.output_dir}: drop --overwrite"
        )
    ckpts, _ = run_files(t.output_dir)
    if not ckpts or resumes_in_place(t) or t.overwrite:
        return
    shown = ", ".join(ckpts[:3]) + (f", ... ({len(ckpts)} checkpoints)" if len(ckpts) > 3 else "")
    which = f"--resume {t.resume} continues a run of another folder, and " if t.resume else ""
    raise ConfigError(
        f"{which}--output-dir {t.output_dir} holds another run's checkpoint(s) ({shown}): pass --resume "
        f"{os.path.join(t.output_dir, 'checkpoint.pth')} to continue that run, --overwrite to replace its files, "
        f"or another --output-dir"
    )


def prepare_output_dir(out_dir: str, overwrite: bool, keep: Sequence[str] = ()) -> Tuple[str, List[str]]:
    """Create --output-dir and lock it; remove the temp files of atomic writes a killed run left, and
    with --overwrite the previous run's files but ``keep`` (the --weights or --resume file still to be
    read). Returns (the lock file, the lines to say)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output-dir {out_dir!r}: cannot create it: {e.strerror or e}") from None
    try:
        lock, stale_lock = acquire_lock(out_dir)
    except OSError as e:
        raise CheckpointError(f"--output-dir {out_dir}: cannot write its lock file: {e.strerror or e}") from None
    try:
        return lock, ([stale_lock] if stale_lock else []) + _clear(out_dir, overwrite, keep)
    except BaseException:
        release_lock(lock)
        raise


def _clear(out_dir: str, overwrite: bool, keep: Sequence[str]) -> List[str]:
    said = []
    stale = remove_stale_temp_files(out_dir)
    if stale:
        said.append(f"removed {len(stale)} temp file(s) an interrupted run left in {out_dir}: {', '.join(stale)}")
    _, old = run_files(out_dir)
    kept = {os.path.realpath(p) for p in keep if p}  # --weights out/model_3.pth stays to be read
    old = [n for n in old if os.path.realpath(os.path.join(out_dir, n)) not in kept]
    if overwrite and old:
        try:
            remove_run_files(out_dir, old)
        except OSError as e:
            raise CheckpointError(f"--overwrite: cannot remove the previous run's files in {out_dir}: {e}") from None
        said.append(f"--overwrite: removed the previous run's {', '.join(old)} from {out_dir}")
    return said


def check_epochs_left(cfg: TrainConfig, ckpt: Dict[str, Any]) -> None:
    """A --resume that would train nothing (the checkpoint already reached --epochs) fails, not exits 0."""
    t, done = cfg.training, ckpt.get("epoch")
    if t.test_only or not isinstance(done, int) or isinstance(ckpt.get("in_epoch"), dict):
        return
    if t.epochs <= done + 1:
        raise CheckpointError(
            f"--epochs {t.epochs}: --resume {t.resume} has trained epochs 0..{done} already, so nothing is left "
            f"to train: give --epochs {done + 2} or more (the total, as torchvision counts it)"
        )
