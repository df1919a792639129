"""Training checkpoints: written atomically, read through tv_lossfix's one loader, and reconciled
with the command line on ``--resume`` so that no setting is ignored silently."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from tv_lossfix.checkpoint import CheckpointError, model_state_dict, read_checkpoint
from tv_lossfix.model_settings import model_settings

import distributed
from train_config import BY_PATH, OPTIONS, TrainConfig, flatten, on_resume, set_path

if TYPE_CHECKING:
    from run_context import Run

FORMAT = "tv_lossfix-train-1"

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_save",
    "atomic_write_text",
    "remove_stale_temp_files",
    "load_training_checkpoint",
    "checkpoint_model_name",
    "reconcile",
    "TrainingParts",
    "save_training_checkpoint",
    "restore_rng",
]


# Temp files are "<name>.tmp<pid>" next to their target; a killed run leaves them behind.
_TEMP_NAME = re.compile(r"^(?P<target>.+\.(?:pth|yaml|json|jsonl|txt))\.tmp(?P<pid>\d+)$")


def _os_reason(e: BaseException) -> str:
    """The OS's reason behind ``e``: torch.save wraps a failed write in RuntimeError("unexpected pos")."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _atomic(write, path: str, mode: str, **open_kw) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file.

    On any failure the temp file is removed and the previous file at ``path`` stays as it was.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **open_kw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not a write error
            raise
        raise CheckpointError(f"could not write {path}: {_os_reason(e)} (the previous file, if any, is intact)") from e


def atomic_save(obj: Any, path: str) -> None:
    _atomic(lambda f: torch.save(obj, f), path, "wb")


def atomic_write_text(text: str, path: str) -> None:
    _atomic(lambda f: f.write(text), path, "w", encoding="utf-8")


def remove_stale_temp_files(out_dir: str) -> List[str]:
    """Remove the temp files of our atomic writes that a killed run left in ``out_dir``.

    Only names of our pattern, and only those whose writer process is gone; returns the names removed.
    """
    removed = []
    for name in sorted(os.listdir(out_dir)) if out_dir and os.path.isdir(out_dir) else []:
        m = _TEMP_NAME.match(name)
        path = os.path.join(out_dir, name)
        if m is None or not os.path.isfile(path) or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(name)
    return removed


# -- the output folder: another run's files, and the lock of the run writing there ------------------------
LOCK_NAME = ".tv_lossfix.lock"
_RUN_FILE = re.compile(
    r"^(?:checkpoint\.pth|model_\d+\.pth|config\.yaml|config\.resume-[\w-]+\.yaml|metrics\.jsonl"
    r"|training_curves\.png|eval_curves\.png|gallery\.png)$"
)
_CHECKPOINT_FILE = re.compile(r"^(?:checkpoint|model_\d+)\.pth$")


def run_files(out_dir: str) -> Tuple[List[str], List[str]]:
    """(the checkpoints, every file) a training run of this recipe wrote in ``out_dir``, by name."""
    names = sorted(os.listdir(out_dir)) if out_dir and os.path.isdir(out_dir) else []
    ours = [n for n in names if _RUN_FILE.match(n) and os.path.isfile(os.path.join(out_dir, n))]
    ckpts = sorted((n for n in ours if _CHECKPOINT_FILE.match(n)), key=_epoch_order)
    return ckpts, ours + (["tensorboard"] if "tensorboard" in names else [])


def _epoch_order(name: str) -> Tuple[int, str]:
    m = re.match(r"model_(\d+)", name)
    return (int(m.group(1)) if m else -1, name)


def remove_run_files(out_dir: str, names: List[str]) -> None:
    import shutil

    for name in names:
        path = os.path.join(out_dir, name)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _create_with(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` in one step (False: it exists): the text goes to a temp file that
    is hard-linked to ``path``, so a second run never reads a lock file before its owner is written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: exclusive create, then the text
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def acquire_lock(out_dir: str) -> Tuple[str, Optional[str]]:
    """Lock ``out_dir`` for this process: (the lock file, a line about a stale lock removed, or None).

    The lock file holds the writer's pid and host; a lock of a live process on this host (or of any
    process on another host, whose life cannot be checked here) fails in one line naming it."""
    import socket

    path, host, stale = os.path.join(out_dir, LOCK_NAME), socket.gethostname(), None
    for _ in range(2):
        if _create_with(path, json.dumps({"pid": os.getpid(), "host": host})):
            return path, stale
        try:
            with open(path, encoding="utf-8") as f:
                owner = json.load(f)
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            pid, owner_host = -1, host  # unreadable: not a lock this recipe wrote whole
        if owner_host != host or _pid_alive(pid):
            where = f"process {pid} on {owner_host}" if owner_host != host else f"process {pid}"
            raise CheckpointError(
                f"--output-dir {out_dir} is in use by {where} (lock file {path}): wait for that run, "
                f"or give another --output-dir (delete the lock file only if that run is gone)"
            )
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        stale = f"removed the lock of process {pid}, which is no longer running, from {out_dir}"
    raise CheckpointError(f"--output-dir {out_dir}: could not take the lock file {path}: another run took it")


def release_lock(path: Optional[str]) -> None:
    """Remove the lock file ``path`` if it is this process's."""
    if not path:
        return
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(path, encoding="utf-8") as f:
            if int(json.load(f)["pid"]) != os.getpid():
                return
        os.remove(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # ours: called before this run writes, so an earlier run's
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # it exists, as another user's
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def load_training_checkpoint(path: str, what: str = "--resume") -> Dict[str, Any]:
    """A checkpoint ``--resume`` can continue from: tv_lossfix's, or torchvision's reference script's."""
    ckpt = read_checkpoint(path, what)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = (
            " It looks like a bare model state_dict: start from it with --weights PATH."
            if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
            else ""
        )
        raise CheckpointError(f"{what}: {path} is not a tv_lossfix training checkpoint (found {found}).{hint}")
    model_state_dict(ckpt, path, what)  # validates the model entry
    return ckpt


def checkpoint_model_name(ckpt: Dict[str, Any]) -> Optional[str]:
    """The model a checkpoint was trained as, from its config (ours) or args (torchvision's)."""
    if isinstance(ckpt.get("config"), dict):
        return ckpt["config"].get("model", {}).get("name")
    args = ckpt.get("args")
    return getattr(args, "model", None)


def _scheduler_state(sched) -> Dict[str, Any]:
    sd = sched.state_dict()
    # MultiStepLR keeps its milestones in a Counter, which torch < 2.5 refuses under weights_only.
    if isinstance(sd.get("milestones"), collections.Counter):
        sd["milestones"] = {int(k): int(v) for k, v in sd["milestones"].items()}
    return sd


def load_scheduler_state(sched, sd: Dict[str, Any]) -> None:
    sd = dict(sd)
    if isinstance(sd.get("milestones"), dict):
        sd["milestones"] = collections.Counter({int(k): int(v) for k, v in sd["milestones"].items()})
    sched.load_state_dict(sd)


def _py_state_to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def restore_rng(rng: Dict[str, Any], rank: int) -> None:
    torch.set_rng_state(rng["torch"][rank] if rank < len(rng["torch"]) else rng["torch"][0])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available() and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][rank] if rank < len(rng["cuda"]) else rng["cuda"][0])


@dataclass
class TrainingParts:
    """What a training checkpoint is written from, as the trainer holds it (read anew at each save)."""

    net: Any  # the model without its DDP wrapper
    optimizer: Any
    lr_scheduler: Any
    warmup: Any  # None without warmup
    scaler: Any  # None without --amp on CUDA
    state: Any  # engine.TrainState
    run: "Run"  # its cfg, loss_cfg, device and out_dir
    class_names: Optional[List[str]] = None
    hooks: Sequence[Any] = ()  # hooks.HookBase: each non-empty state_dict is saved under its name


def hook_states(hooks: Sequence[Any]) -> Dict[str, Dict[str, Any]]:
    """{hook name: its state_dict} for the hooks that keep state (``--resume`` gives it back)."""
    return {h.name: sd for h in hooks if (sd := h.state_dict())}


def save_training_checkpoint(parts: TrainingParts, epoch: int, in_epoch: Optional[Dict[str, Any]] = None) -> None:
    """Every rank takes part (RNG states are gathered); rank 0 writes model_<epoch>.pth and checkpoint.pth.

    ``in_epoch`` (a save within epoch ``epoch + 1``: its ``epoch``, the ``iteration`` within it and the
    ``meter``'s partial sums) writes checkpoint.pth only; ``--resume`` continues from that iteration.
    """
    run = parts.run
    rng_all = distributed.all_gather(torch.get_rng_state())
    cuda_all = distributed.all_gather(torch.cuda.get_rng_state(run.device)) if run.device.type == "cuda" else []
    if not distributed.is_main() or not run.out_dir:
        return
    ckpt = {
        "format": FORMAT,
        "model": parts.net.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "lr_scheduler": _scheduler_state(parts.lr_scheduler),
        "warmup": parts.warmup.state_dict() if parts.warmup is not None else None,
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else {},
        "epoch": epoch,  # torchvision's key: the last finished epoch
        "state": parts.state.state_dict(),
        "config": json.loads(json.dumps(run.cfg.to_dict())),  # plain types: loads under weights_only=True
        "loss_cfg": run.loss_cfg.to_dict(),
        "rng": {"torch": rng_all, "cuda": cuda_all, "python": _py_state_to_list(random.getstate())},
        # What shapes the model beyond its weights (anchors, sizes, thresholds): --weights restores it.
        "model_settings": model_settings(parts.net, parts.class_names),
        "hooks": hook_states(parts.hooks),
    }
    if in_epoch is not None:
        ckpt["in_epoch"] = in_epoch
    else:
        atomic_save(ckpt, os.path.join(run.out_dir, f"model_{epoch}.pth"))
    atomic_save(ckpt, os.path.join(run.out_dir, "checkpoint.pth"))


# -- --resume against the command line ------------------------------------------------------------
def torchvision_args_config(args: Any) -> Dict[str, Any]:
    """The settings a torchvision reference checkpoint's ``args`` (argparse.Namespace) records, as a
    partial config tree of this recipe's schema (its flags keep torchvision's names and meanings)."""
    tree: Dict[str, Any] = {}
    for o in OPTIONS:
        dest = o.torchvision_args_name()
        if dest and hasattr(args, dest):
            value = getattr(args, dest)
            set_path(tree, o.path, list(value) if isinstance(value, tuple) else value)
    return tree


def torchvision_optimizer_state(sd: Dict[str, Any], groups: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A torchvision reference checkpoint's optimizer state in this recipe's group order. Under
    --norm-weight-decay torchvision's script builds the groups [normalization, other] and drops an empty
    one (a ResNet's FrozenBatchNorm2d has no parameters); run_model.param_groups builds [other,
    normalization] and keeps both. ``groups``: this run's optimizer.param_groups. Other layouts are
    returned as they are (load_state_dict names what does not fit)."""
    saved = sd.get("param_groups")
    if len(groups) != 2 or not isinstance(saved, list):
        return sd
    other, norm = (len(g["params"]) for g in groups)
    kinds = [k for k, size in (("norm", norm), ("other", other)) if size]  # torchvision's order, empties dropped
    if len(saved) != len(kinds) or [len(g["params"]) for g in saved] != [norm if k == "norm" else other for k in kinds]:
        return sd
    by_kind = dict(zip(kinds, saved))

    def empty(i: int) -> Dict[str, Any]:  # the dropped group: no parameters, this run's settings otherwise
        return {**{k: v for k, v in saved[0].items() if k != "params"}, "weight_decay": groups[i]["weight_decay"]}

    ordered = [by_kind.get("other") or {**empty(0), "params": []}, by_kind.get("norm") or {**empty(1), "params": []}]
    return dict(sd, param_groups=ordered)


def saved_config(ckpt: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], bool]:
    """(the config a checkpoint records, whether it is complete): ours, or torchvision's ``args``."""
    if isinstance(ckpt.get("config"), dict):
        return ckpt["config"], True
    if ckpt.get("args") is not None:
        return torchvision_args_config(ckpt["args"]), False
    return None, False


def reconcile(saved_cfg: Optional[Dict[str, Any]], cfg: TrainConfig, complete: bool = True):
    """Compare the checkpoint's config with this run's: returns (applied lines, refused lines). What a new
    value does is its key's Opt.resume (config_schema.py): refused (the checkpoint fixes it), applied
    (said how), or not compared (--resume itself). ``complete`` False (torchvision's ``args``): only the
    settings it records are compared."""
    if not saved_cfg:
        return [], []
    old, new = flatten(saved_cfg), flatten(cfg.to_dict())
    applied, refused = [], []
    for path in sorted(set(old) | set(new)):
        policy = on_resume(path)
        if not policy.compared or old.get(path) == new.get(path) or (not complete and path not in old):
            continue
        if path in BY_PATH and BY_PATH[path].kind is float and _same_number(old.get(path), new.get(path)):
            continue
        change = f"{path}: {old.get(path)!r} -> {new.get(path)!r}"
        reason = policy.refusal(old.get(path), new.get(path))
        if reason is not None:
            refused.append(f"{change} refused: {reason}")
        else:
            applied.append(f"{change} applied: {policy.applied}")
    return applied, refused


def _same_number(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)


def apply_to_optimizer(optimizer, lr_scheduler, saved_cfg: Dict[str, Any], cfg: TrainConfig) -> None:
    """Put the settings the schema says are applied (Opt.resume) into the restored optimizer and scheduler. Under
    --norm-weight-decay the last group holds the normalization layers (run_model.param_groups): --wd
    leaves it alone and --norm-weight-decay sets it."""
    t, old = cfg.training, flatten(saved_cfg)
    groups = optimizer.param_groups
    norm_group = groups[-1] if t.norm_weight_decay is not None and len(groups) == 2 else None
    for g in groups:
        if t.lr != old.get("training.lr", t.lr):
            factor = g["lr"] / g.get("initial_lr", g["lr"])  # where the schedule (and warmup) stands
            g["initial_lr"] = t.lr
            g["lr"] = t.lr * factor
        if "momentum" in g and t.momentum != old.get("training.momentum", t.momentum):
            g["momentum"] = t.momentum
        if g is norm_group:
            if t.norm_weight_decay != old.get("training.norm_weight_decay", t.norm_weight_decay):
                g["weight_decay"] = t.norm_weight_decay
        elif t.weight_decay != old.get("training.weight_decay", t.weight_decay):
            g["weight_decay"] = t.weight_decay
    lr_scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    if hasattr(lr_scheduler, "milestones"):
        lr_scheduler.milestones = collections.Counter(t.lr_steps)
        lr_scheduler.gamma = t.lr_gamma
    if hasattr(lr_scheduler, "T_max"):
        lr_scheduler.T_max = t.epochs
