r"""The experiment behind tv_lossfix's claim: stock torchvision vs tv_lossfix configurations in a
setting where stock training degrades, several seeds each, same data and budget.

    python references/benchmarks/collapse_study.py --quick        # < 15 min on a 2-core CPU
    python references/benchmarks/collapse_study.py                # more seeds / iterations

Setting (documented in the README): Mask R-CNN trained from scratch (maskrcnn_tiny) on a hard
shapes set (few and tiny objects, 4:1 class imbalance step, 40% empty images) at a learning rate
above the linear-scaling rule with no warmup, the situation fine-tuners land in when they copy
torchvision's reference lr to a small batch. Every run uses references/train.py with
--nan-policy stop, so a divergence ends the run and is recorded.

Writes to --out-dir: collapse_study.md (the table), collapse_study.json, collapse_study.png
(detections per image and bbox AP over training), and each run's own output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # references/

import yaml  # noqa: E402

HARD_SHAPES = {
    "num_train": 160,
    "num_val": 32,
    "image_size": 96,
    "min_size": 10,
    "max_size": 28,
    "min_objects": 1,
    "max_objects": 2,
    "empty_fraction": 0.4,
    "class_imbalance": 0.25,
    "tiny_fraction": 0.3,
    "seed": 7,
}

# name -> (flags, loss config). "stock" is torchvision's own model and training step without clipping.
CONFIGS: Dict[str, Any] = {
    "stock torchvision": (["--stock"], {}),
    "tv_lossfix defaults (= stock)": ([], {}),
    "+ grad clip 10": (["--clip-grad-norm", "10"], {}),
    "+ clip + cls_pos_weight": (
        ["--clip-grad-norm", "10"],
        {"rpn_head": {"cls_pos_weight": 2.0}, "roi_head": {"cls_pos_weight": 3.0}},
    ),
    "+ clip + positive norm": (
        ["--clip-grad-norm", "10"],
        {"rpn_head": {"bbox_avg_factor": "positive"}, "roi_head": {"bbox_avg_factor": "positive"}},
    ),
    "+ clip + loss weights": (
        ["--clip-grad-norm", "10"],
        {"rpn_head": {"loss_bbox_weight": 0.5}, "roi_head": {"loss_cls_weight": 2.0, "loss_mask_weight": 0.5}},
    ),
}
QUICK = ["stock torchvision", "+ grad clip 10", "+ clip + cls_pos_weight", "+ clip + positive norm"]


def run_one(
    out_dir: str, data_root: str, name: str, seed: int, lr: float, epochs: int, iters: int, batch: int
) -> Dict[str, Any]:
    import train

    flags, loss = CONFIGS[name]
    cfg = {
        "model": {
            "name": "maskrcnn_tiny",
            "kwargs": {"min_size": HARD_SHAPES["image_size"], "max_size": HARD_SHAPES["image_size"]},
            **loss,
        },
        "data": {
            "dataset": "shapes",
            "data_path": data_root,
            "shapes": HARD_SHAPES,
            "workers": 0,
            "aspect_ratio_group_factor": -1,
        },
        "training": {
            "device": "cpu",
            "batch_size": batch,
            "epochs": epochs,
            "iters_per_epoch": iters,
            "lr": lr,
            "lr_steps": [10 * epochs],
            "warmup_iters": 0,
            "seed": seed,
            "print_freq": iters,
            "plots": False,
            "gallery_images": 0,
            "nan_policy": "stop",
            "output_dir": out_dir,
            "overwrite": True,  # the study's own folder: a rerun replaces the run before it
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "study.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train.main(["--config", path, *flags])
    recs = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    evals = [r for r in recs if r["type"] == "eval" and "dets_per_image" in r]
    stopped = [r for r in recs if r["type"] == "stopped"]
    curve = [((r["epoch"] + 1) * iters, r["dets_per_image"], r.get("bbox_AP", 0.0)) for r in evals]
    first_dets = next((it for it, d, _ in curve if d > 0), None)
    first_ap = next((it for it, _, ap in curve if ap >= 0.05), None)
    last = evals[-1] if evals else {}
    return {
        "config": name,
        "seed": seed,
        "rc": rc,
        "diverged": bool(stopped),
        "stopped_at": stopped[0]["iter"] if stopped else None,
        "reason": stopped[0]["reason"][:160] if stopped else None,
        "bbox_AP": last.get("bbox_AP", 0.0) if not stopped else 0.0,
        "segm_AP": last.get("segm_AP", 0.0) if not stopped else 0.0,
        "dets_per_image": last.get("dets_per_image", 0.0) if not stopped else 0.0,
        "min_dets_after_first": min((d for _, d, _ in curve[1:]), default=None),
        "iters_to_first_dets": first_dets,
        "iters_to_ap_0.05": first_ap,
        "curve": curve,
        "seconds": round(time.time() - t0, 1),
    }


def _fmt(values: List[float], digits: int = 3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "never"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.pstdev(vals):.{digits}f}"


def table(results: List[Dict[str, Any]], names: List[str], seeds: List[int]) -> str:
    lines = [
        "| configuration | bbox AP | segm AP | detections / image | diverged | iterations to first detections "
        "| iterations to bbox AP >= 0.05 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [r for r in results if r["config"] == name]
        div = sum(r["diverged"] for r in rs)
        firsts = [r["iters_to_first_dets"] for r in rs]
        aps = [r["iters_to_ap_0.05"] for r in rs]
        lines.append(
            f"| {name} | {_fmt([r['bbox_AP'] for r in rs])} | {_fmt([r['segm_AP'] for r in rs])} | "
            f"{_fmt([r['dets_per_image'] for r in rs], 2)} | {div}/{len(rs)} | "
            f"{_fmt([float(f) for f in firsts if f is not None], 0)} ({sum(f is None for f in firsts)} never) | "
            f"{_fmt([float(a) for a in aps if a is not None], 0)} ({sum(a is None for a in aps)} never) |"
        )
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], names: List[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, name in zip(colours, names):
        for k, r in enumerate(r for r in results if r["config"] == name):
            if not r["curve"]:
                continue
            its, dets, aps = zip(*r["curve"])
            label = name if k == 0 else None
            axes[0].plot(its, dets, color=c, alpha=0.8, label=label, marker="x" if r["diverged"] else None)
            axes[1].plot(its, aps, color=c, alpha=0.8, label=label)
            if r["diverged"]:
                axes[0].axvline(r["stopped_at"], color=c, ls=":", alpha=0.6)
    axes[0].set_yscale("symlog", linthresh=1)
    axes[0].set_title("detections per image (score >= 0.05); dotted: diverged")
    axes[1].set_title("bbox AP")
    for ax in axes:
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 configurations x 3 seeds, short runs (< 15 min on 2 cores)")
    p.add_argument("--out-dir", default="runs/collapse_study")
    p.add_argument("--data-path", default="data")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--lr", type=float, default=0.04, help="learning rate of every run (batch 4, no warmup)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="evaluations per run (an 'epoch' is --iters iterations)")
    p.add_argument("--iters", type=int, default=25, help="iterations between evaluations")
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    args = p.parse_args(argv)
    names = args.configs or (QUICK if args.quick else list(CONFIGS))
    seeds = args.seeds or ([0, 1, 2] if args.quick else [0, 1, 2, 3, 4])
    epochs = args.epochs or (8 if args.quick else 16)
    os.makedirs(args.out_dir, exist_ok=True)
    import torch

    print(
        f"collapse study: {len(names)} configurations x {len(seeds)} seeds, {epochs * args.iters} iterations each, "
        f"lr {args.lr}, batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    results = []
    t0 = time.time()
    for seed in seeds:  # seed-major: a cut-short study still has every configuration
        for name in names:
            r = run_one(
                os.path.join(
                    args.out_dir,
                    f"{re.sub(r'[^A-Za-z0-9_]', '', name.replace(' ', '_').replace('+', 'p'))}_s{seed}",
                ),
                args.data_path,
                name,
                seed,
                args.lr,
                epochs,
                args.iters,
                args.batch_size,
            )
            results.append(r)
            print(
                f"  {name:32s} seed {seed}: bbox AP {r['bbox_AP']:.3f} segm AP {r['segm_AP']:.3f} "
                f"dets/img {r['dets_per_image']:.2f} "
                + (f"DIVERGED at iter {r['stopped_at']} " if r["diverged"] else "")
                + f"({r['seconds']:.0f} s)",
                flush=True,
            )
    md = table(results, names, seeds)
    header = (
        f"Collapse study: maskrcnn_tiny from scratch on hard shapes {HARD_SHAPES}, lr {args.lr}, batch "
        f"{args.batch_size}, no warmup, {epochs * args.iters} iterations, seeds {seeds}; mean ± std over seeds.\n\n"
    )
    print("\n" + md, flush=True)
    with open(os.path.join(args.out_dir, "collapse_study.md"), "w") as f:
        f.write(header + md + "\n")
    with open(os.path.join(args.out_dir, "collapse_study.json"), "w") as f:
        json.dump({"args": vars(args), "shapes": HARD_SHAPES, "results": results}, f, indent=1)
    plot(results, names, os.path.join(args.out_dir, "collapse_study.png"))
    print(f"done in {time.time() - t0:.0f} s; wrote {args.out_dir}/collapse_study.{{md,json,png}}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
