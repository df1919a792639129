"""The run's outputs: console lines, metrics.jsonl records and TensorBoard scalars.

Each output is a small writer; :class:`EventWriter` is the one object the recipe passes around
(``say`` a line, ``record`` a dict) and fans out to them, on rank 0 only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List

from tv_lossfix.checkpoint import CheckpointError


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (recursively): metrics.jsonl stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if hasattr(value, "item") and not isinstance(value, float):  # 0-d tensors, numpy scalars
        return json_safe(value.item())
    value = float(value)
    return value if math.isfinite(value) else None


class ConsoleWriter:
    """Console lines, through tqdm when it is installed (a progress bar then stays below them)."""

    def say(self, msg: str) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(msg)
        except ImportError:
            print(msg, flush=True)
        sys.stdout.flush()

    def record(self, rec: Dict[str, Any]) -> None:
        pass


class SayWriter:
    """A writer over a ``say`` callable (Lightning's ``print``): lines only, no records."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def record(self, rec: Dict[str, Any]) -> None:
        pass


class JsonlWriter:
    """metrics.jsonl: one strict-JSON record per line, appended and flushed, earlier lines never rewritten
    (a crash loses at most the line being written)."""

    def __init__(self, path: str):
        self.path = path

    def record(self, rec: Dict[str, Any]) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        except OSError as e:  # a full or read-only filesystem: one line, not a traceback
            raise CheckpointError(
                f"could not append to {self.path}: {e.strerror or e} (its earlier lines are intact)"
            ) from None


class TensorBoardWriter:
    """A record's numbers as TensorBoard scalars ``<type>/<key>`` at its iteration (else its epoch)."""

    def __init__(self, summary_writer):
        self.tb = summary_writer

    @classmethod
    def create(cls, log_dir: str):
        """The writer, or None where tensorboard is not installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter

            return cls(SummaryWriter(log_dir))
        except Exception:  # tensorboard not installed
            return None

    def record(self, rec: Dict[str, Any]) -> None:
        step = rec.get("iter", rec.get("epoch", 0))
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "epoch", "time"):
                self.tb.add_scalar(f"{rec.get('type', 'misc')}/{k}", v, step)

    def close(self) -> None:
        self.tb.close()


class EventWriter:
    """Rank-0 output: console lines, metrics.jsonl, TensorBoard (where installed).

    With ``--output-dir ""`` (torchvision's "save nothing") only the console is written; off rank 0
    nothing. Every record carries its time and this run's id (``run``: start time and process id), so
    that the records of a run that was killed and resumed can be told apart.
    """

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        self.path = os.path.join(out_dir, "metrics.jsonl") if out_dir else None
        self.console = ConsoleWriter() if enabled else None
        self.files: List[Any] = []  # the record writers, in order: metrics.jsonl, then TensorBoard
        if enabled and out_dir:
            self.files.append(JsonlWriter(self.path))
            tb = TensorBoardWriter.create(os.path.join(out_dir, "tensorboard"))
            if tb is not None:
                self.files.append(tb)

    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.say(msg)

    def record(self, rec: Dict[str, Any]) -> None:
        if not self.files:
            return
        rec = json_safe({"time": round(time.time(), 3), "run": self.run_id, **rec})
        for w in self.files:
            w.record(rec)

    def close(self) -> None:
        for w in self.files:
            if hasattr(w, "close"):
                w.close()
