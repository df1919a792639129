r"""How much the demo's final AP moves with the seed: the demo config, trained once per seed.

    python references/benchmarks/demo_stability.py [--seeds 0 1 2] [--epochs N] [--out runs/demo_stability]
    # any further flag goes to references/train.py unchanged, e.g. a candidate setting:
    python references/benchmarks/demo_stability.py --out /tmp/cand -- --lr 0.01 --warmup-iters 59

Each seed trains ``references/configs/shapes.yaml`` in its own process (``--seed S --output-dir
OUT/seed_S --no-plots``; the dataset keeps its own ``data.shapes.seed``, so every seed sees the same
images) and the final evaluation record of its ``metrics.jsonl`` is read back. Prints a markdown
table (seed, bbox AP, segm AP, detections/image, wall time) with mean ± std (sample std, n - 1),
then each class's bbox AP per seed and its mean ± std, under a line naming the machine.
Wall times depend on the machine and on whatever else runs on it; AP does not depend on load, but
its last digits depend on the CPU (its kernels round differently), as they do on the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REFS = os.path.dirname(HERE)
CONFIG = os.path.join(REFS, "configs", "shapes.yaml")
COLUMNS = {"bbox_AP": 4, "segm_AP": 4, "dets_per_image": 2, "wall_s": 0}  # -> decimals shown


def final_eval(metrics_path: str) -> Dict[str, float]:
    """The last ``"type": "eval"`` record of a run's metrics.jsonl that holds an AP."""
    last = None
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") == "eval" and "bbox_AP" in rec:
                last = rec
    if last is None:
        raise RuntimeError(f"{metrics_path}: no evaluation record (did the run stop early?)")
    return last


def per_class_ap(rec: Dict) -> Dict[str, float]:
    return {c: v["bbox_AP"] for c, v in rec.get("per_class", {}).items()}


def train_seed(seed: int, out: str, epochs: Optional[int], extra: List[str], config: str) -> Dict[str, float]:
    """Train one seed in a fresh process; returns its final AP, detections/image and wall time.

    The result is kept in OUT/seed_S/result.json with its command line and config text, and reused
    by a later call with the same command and config (delete the file to train again).
    """
    out_dir = os.path.join(out, f"seed_{seed}")
    cmd = [sys.executable, os.path.join(REFS, "train.py"), "--config", config, "--seed", str(seed)]
    # --overwrite: the seed's folder is this script's, and a run here replaces the one before it.
    cmd += (
        ["--output-dir", out_dir, "--overwrite", "--no-plots"] + (["--epochs", str(epochs)] if epochs else []) + extra
    )
    with open(config, encoding="utf-8") as f:
        config_text = f.read()
    cache = os.path.join(out_dir, "result.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("cmd") == cmd and saved.get("config_text") == config_text:
            print(f"seed {seed}: reusing {cache}", flush=True)
            if "per_class_bbox_AP" not in saved:  # saved before the per-class table was printed
                saved["per_class_bbox_AP"] = per_class_ap(final_eval(os.path.join(out_dir, "metrics.jsonl")))
            return saved
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)  # metrics.jsonl is appended to: a rerun must not read the old one
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(os.path.join(out, f"seed_{seed}.log"), "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if code != 0:
        raise RuntimeError(f"seed {seed}: train.py exited with {code}; see {out}/seed_{seed}.log")
    rec = final_eval(metrics)
    result = {
        "seed": seed,
        "bbox_AP": rec["bbox_AP"],
        "segm_AP": rec.get("segm_AP", float("nan")),
        "dets_per_image": rec["dets_per_image"],
        "per_class_bbox_AP": per_class_ap(rec),
        "wall_s": wall,
        "cmd": cmd,
        "config_text": config_text,
    }
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def mean_std(values: List[float], digits: int) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(rows: List[Dict[str, float]]) -> str:
    """Markdown: one row per seed, then mean ± std and the spread (max - min) of each column."""
    lines = ["| seed | bbox AP | segm AP | detections/image | wall time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['bbox_AP']:.4f} | {r['segm_AP']:.4f} | {r['dets_per_image']:.2f} | {r['wall_s']:.0f} |"
        )
    cols = [([r[c] for r in rows], digits) for c, digits in COLUMNS.items()]
    lines.append("| mean ± std | " + " | ".join(mean_std(v, n) for v, n in cols) + " |")
    lines.append("| max - min | " + " | ".join(f"{max(v) - min(v):.{n}f}" for v, n in cols) + " |")
    per_class = [r.get("per_class_bbox_AP", {}) for r in rows]
    classes = [c for c in per_class[0] if all(c in p for p in per_class)]
    if classes:  # a class the seeds agree on overall may still move alone
        lines += ["", "| class | bbox AP per seed | mean ± std |", "|---|---|---|"]
        for c in classes:
            v = [p[c] for p in per_class]
            lines.append(f"| {c} | {', '.join(f'{x:.3f}' for x in v)} | {mean_std(v, 3)} |")
    return "\n".join(lines)


def machine(extra: List[str]) -> str:
    """The CPU model and core count, for the wall times (they depend on it; AP only in its last digits)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = extra[extra.index("--num-threads") + 1] if "--num-threads" in extra[:-1] else torch.get_num_threads()
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} torch threads"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--out", default="runs/demo_stability")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("extra", nargs="*", help="flags passed to train.py (after --)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = [train_seed(s, args.out, args.epochs, args.extra, args.config) for s in args.seeds]
    text = f"machine: {machine(args.extra)}\n\n" + table(rows)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
