"""What the steps of a training run share: its resolved config, device, writer and output folder."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from tv_lossfix import LossConfig

from train_config import TrainConfig
from writers import EventWriter


@dataclass
class Run:
    """What the steps of ``train.main`` share."""

    cfg: TrainConfig  # replaced, never changed in place, as the run learns what it runs
    loss_cfg: LossConfig
    device: torch.device
    rank: int
    writer: EventWriter
    out_dir: str
    resume_ckpt: Optional[Dict[str, Any]] = None
    t_start: float = field(default_factory=time.time)
    in_epoch: Optional[Dict[str, Any]] = None  # where a mid-epoch --resume checkpoint stopped
    lock: Optional[str] = None  # the --output-dir lock file this process holds (train.py releases it)

    @property
    def config_path(self) -> str:
        """Where this run's resolved config is saved; a resumed run's original config.yaml is never overwritten."""
        name = "config.yaml"
        if self.resume_ckpt is not None:
            name = f"config.resume-epoch{self.resume_ckpt.get('epoch', 0) + 1}.yaml"
            pos = self.resume_ckpt.get("in_epoch")
            if isinstance(pos, dict):
                name = f"config.resume-epoch{pos['epoch']}-iter{pos['iteration']}.yaml"
        return os.path.join(self.out_dir, name)
