"""The epoch's running numbers and the periodic log line (torchvision's ``MetricLogger``), and the
progress bar."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Dict

import torch

import tv_lossfix

import distributed
from step import StepResult


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricLogger:
    """Epoch means of the logged values, the window's speed, and the periodic log line."""

    def __init__(self, epoch: int, n_iters: int, print_freq: int):
        self.epoch, self.n_iters, self.print_freq = epoch, n_iters, print_freq
        self.sums: Dict[str, float] = defaultdict(float)
        self.count = 0
        self.grad_max = 0.0
        self.total_imgs = 0
        self.window_imgs = 0
        self.t0 = self.window_t0 = time.perf_counter()
        self.stat_sums: Dict[str, torch.Tensor] = {}
        self.stat_windows = 0
        self.start = 0  # iterations of the epoch done before this process (a mid-epoch resume)

    def state_dict(self) -> Dict[str, Any]:
        """The epoch's partial sums, for a mid-epoch checkpoint (the epoch means then come out the same)."""
        return {
            "sums": dict(self.sums),
            "count": self.count,
            "grad_max": self.grad_max,
            "total_imgs": self.total_imgs,
            "stat_sums": {k: v.detach().cpu() for k, v in self.stat_sums.items()},
            "stat_windows": self.stat_windows,
        }

    def load_state_dict(self, saved: Dict[str, Any], start: int, device: torch.device) -> None:
        self.sums.update(saved.get("sums", {}))
        self.count, self.grad_max = int(saved.get("count", 0)), float(saved.get("grad_max", 0.0))
        self.total_imgs, self.stat_windows = int(saved.get("total_imgs", 0)), int(saved.get("stat_windows", 0))
        self.stat_sums = {k: v.to(device) for k, v in saved.get("stat_sums", {}).items()}
        self.start = start

    def update(self, result: StepResult) -> None:
        for k, v in result.values.items():
            if math.isfinite(v):
                self.sums[k] += v
        if math.isfinite(result.values["grad_norm"]):
            self.grad_max = max(self.grad_max, result.values["grad_norm"])
        self.count += 1
        self.window_imgs += result.images
        self.total_imgs += result.images

    def due(self, done: int) -> bool:
        """A log line after ``done`` iterations of the epoch: every --print-freq, and after the last."""
        return done % self.print_freq == 0 or done == self.n_iters

    def emit(self, model, progress, writer) -> None:
        """The log line and ``train`` record after ``progress.done`` iterations (``progress``: engine.Progress)."""
        # The heads' statistics, sampled at the print points (the epoch mean is over these).
        stats = tv_lossfix.training_stats(model)
        for k, v in stats.items():
            self.stat_sums[k] = self.stat_sums[k] + v if k in self.stat_sums else v.clone()
        self.stat_windows += 1 if stats else 0
        now, done = time.perf_counter(), progress.done
        speed = self.window_imgs / max(now - self.window_t0, 1e-9)
        eta = (now - self.t0) / max(done - self.start, 1) * (self.n_iters - done)
        lr, result = progress.lr, progress.result
        names = list(stats)
        head_stats = dict(zip(names, torch.stack([stats[k] for k in names]).tolist())) if stats else {}
        values = result.values
        writer.record(
            {
                "type": "train",
                "epoch": self.epoch,
                "iter": progress.iteration,
                "lr": lr,
                **values,
                "img_per_s": speed,
                **head_stats,
            }
        )
        terms = " ".join(f"{k.replace('loss_', '')} {values[k]:.4f}" for k in result.loss_keys)
        writer.say(
            f"epoch {self.epoch} [{done:>{len(str(self.n_iters))}}/{self.n_iters}] eta {_fmt_eta(eta)} lr {lr:.5f} "
            f"loss {values['loss']:.4f} ({terms}) grad_norm {values['grad_norm']:.3f} {speed:.1f} img/s"
        )
        self.window_imgs, self.window_t0 = 0, now

    def summary(self, state) -> Dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out.update(
            grad_norm_max=self.grad_max,
            steps=self.count,
            skipped_steps=state.skipped,
            world_size=distributed.world(),
            epoch_time=time.perf_counter() - self.t0,
        )
        out["img_per_s"] = self.total_imgs / max(out["epoch_time"], 1e-9)
        if self.stat_sums and self.stat_windows:
            names = list(self.stat_sums)
            out.update(dict(zip(names, (torch.stack([self.stat_sums[k] for k in names]) / self.stat_windows).tolist())))
        return out


def progress_bar(n_iters: int, epoch: int, start: int = 0):
    """A tqdm bar on rank 0 when tqdm is installed (None otherwise), already at ``start``."""
    if not distributed.is_main():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=n_iters, desc=f"epoch {epoch}", disable=None, dynamic_ncols=True, leave=False)
    if start:
        bar.update(start)
    return bar
