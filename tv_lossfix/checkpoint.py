"""The one checkpoint reader, for ``weights=<path>`` and for the training script's ``--resume``.

Always ``torch.load(weights_only=True)``: no arbitrary object is ever unpickled. The one class
allowed beyond tensors and plain containers is ``argparse.Namespace``, because torchvision's own
reference script stores its arguments that way in every checkpoint it writes.
"""

import argparse
import contextlib
import os
from typing import Any, Dict

import torch

__all__ = ["CheckpointError", "CheckpointNotFoundError", "check_checkpoint_file", "read_checkpoint", "model_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No file at a checkpoint path; a FileNotFoundError too, so ``except FileNotFoundError`` still catches it."""


@contextlib.contextmanager
def _allow_namespace():
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):  # torch >= 2.5: scoped
        with ser.safe_globals([argparse.Namespace]):
            yield
    else:  # torch 2.4: process-wide, and harmless (a Namespace holds only what was pickled into it)
        ser.add_safe_globals([argparse.Namespace])
        yield


def check_checkpoint_file(path: Any, what: str = "checkpoint") -> str:
    """``path`` as a str if a file is there; the one "not found" / "is a folder" check of every entry point
    (``weights=<path>``, references/'s ``--weights`` and ``--resume``). ``what`` names the caller."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{what}: {path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{what}: checkpoint not found: {path}")
    return path


def read_checkpoint(path: Any, what: str = "checkpoint") -> Any:
    """Load ``path`` on the CPU under ``weights_only=True``; ``what`` names the caller in errors."""
    path = check_checkpoint_file(path, what)
    try:
        with _allow_namespace():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle of arbitrary objects, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what}: cannot read {path} (truncated, or not a PyTorch checkpoint): {first}") from None


def model_state_dict(obj: Any, path: Any, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The model ``state_dict`` in a loaded checkpoint: a bare state_dict, or the ``"model"`` entry of a
    training checkpoint (tv_lossfix's or torchvision's reference script's). DDP ``module.`` prefixes are
    stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{what}: {os.fspath(path)} holds no model state_dict (expected a dict of tensors or a 'model' entry)"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}
