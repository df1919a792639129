r"""Evidence for the rare-class levers: per-class AP of each configuration, over seeds, on sets made for it.

    python references/benchmarks/rare_classes.py                       # every configuration, seeds 0 1 2
    python references/benchmarks/rare_classes.py --configs default ohem --seeds 0 1 2 --datasets thin
    python references/benchmarks/rare_classes.py --quick --configs default   # smoke test, one seed, minutes
    python references/benchmarks/rare_classes.py --datasets small tiny thin --configs default old-advice advice

Writes three COCO-format sets with tiny_objects.write_split (noisy 160 px images, 1-4 objects each):
``tiny``, tiny_objects.py's own classes (ellipse, cross, ring drawn 20 : 5 : 1, 60% of objects 4-10
px), ``thin``, round blobs next to a rare class of thin bars (10 : 1; a bar's height / width is 0.15
or 6.7, outside the default anchors' 0.5-2), and ``small``: every object 4-10 px (dots, thin bars,
rings at 9 : 1 : 1.3), a quarter of the images empty, trained at maskrcnn_tiny's own 128 px input as
a new user would (tiny and thin at their native 160 px). Train and val are drawn separately (rng
seeds 0 and 1). Every configuration trains maskrcnn_tiny from scratch through ``train.main`` with
one budget: the same epochs and iterations per epoch (repeat-factor sampling repeats images within
that budget, it does not add steps), lr at the linear-scaling rule (0.02 x 4 / 16 = 0.005) with
warmup over the first epoch and gradient clipping at 10, one evaluation at the end. A configuration
is a YAML override of the model / data sections (CONFIGS); the data-driven ones are computed on
the training set: the repeat-factor threshold that data.suggest_repeat_threshold gives; ``advice``,
the config the data report's ``--write-config`` writes (the base config with all its advice merged
in, nothing else); and ``old-advice``, what the report printed at commit OLD_REF (before the scale
rule and the safe class weights: its YAML blocks and the ``--flag value`` it advised outside
warnings, as printed), run from that commit's references/ extracted with git archive. A
configuration the recipe refuses (a key not built yet) is reported as such and skipped.

Prints, per dataset, markdown tables of bbox AP and AP50 (overall and per class, mean ± std over
the seeds, sample std) and one line per configuration naming the classes where its mean AP differs
from the default's by more than one std (the larger of the two). Each run's record is kept in
OUT/<dataset>/<config>/seed_<s>/result.json with its config and reused by a later call with the same
config (--rerun to train again); a refused configuration is tried again each time.
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
import textwrap
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # references/
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import tiny_objects  # noqa: E402
import yaml  # noqa: E402

SIZE, BATCH, CLIP = 160, 4, 10.0
LR = 0.02 * BATCH / 16  # the linear-scaling rule from torchvision's 0.02 for 16 images per step
FULL = {"train": 200, "val": 150, "epochs": 5}
QUICK = {"train": 40, "val": 30, "epochs": 2}


# -- the data sets ------------------------------------------------------------------------------------
THIN_CLASSES, THIN_FREQ = ("blob", "bar"), (10, 1)


def thin_box(rng: np.random.Generator, cls: int, size: int) -> tuple:
    """Blobs: squares of 8-32 px. Bars: 20-60 px long, 0.15 of that wide (at least 2 px), either way."""
    if cls == 0:
        w = h = rng.uniform(8, 32)
    else:
        length = rng.uniform(20, 60)
        w, h = length, max(2.0, 0.15 * length)
        if rng.random() < 0.5:
            w, h = h, w
    x, y = rng.uniform(0, size - w - 1), rng.uniform(0, size - h - 1)
    return (x, y, x + w, y + h)


def thin_draw(draw, cls: int, box, color) -> None:
    (draw.ellipse if cls == 0 else draw.rectangle)(box, fill=color)


SMALL_CLASSES, SMALL_FREQ = ("dot", "bar", "ring"), (9, 1, 1.3)


def small_box(rng: np.random.Generator, cls: int, size: int) -> tuple:
    """Every object 4-10 px at native size: dots and rings square, bars 6-10 px long and a quarter as wide."""
    if cls == 1:
        length = rng.uniform(6, 10)
        w, h = length, max(2.0, 0.25 * length)
        if rng.random() < 0.5:
            w, h = h, w
    else:
        w = h = rng.uniform(4, 10)
    x, y = rng.uniform(0, size - w - 1), rng.uniform(0, size - h - 1)
    return (x, y, x + w, y + h)


def small_draw(draw, cls: int, box, color) -> None:
    if cls == 0:
        draw.ellipse(box, fill=color)
    elif cls == 1:
        draw.rectangle(box, fill=color)
    else:
        draw.ellipse(box, outline=color, width=max(int((box[2] - box[0]) / 4), 1))


DATASETS: Dict[str, Dict[str, Any]] = {
    "tiny": {},  # tiny_objects.write_split's defaults
    "thin": {"classes": THIN_CLASSES, "freq": THIN_FREQ, "draw_fn": thin_draw, "box_fn": thin_box},
    # objects 4-10 px in 160 px images, 9 : 1 : 1.3, a quarter of the images empty; trained at
    # maskrcnn_tiny's own input size (128), as a new user would
    "small": {
        "classes": SMALL_CLASSES,
        "freq": SMALL_FREQ,
        "draw_fn": small_draw,
        "box_fn": small_box,
        "empty_fraction": 0.25,
    },
}
# model.kwargs per set: tiny and thin at their native 160 px (the README's first tables), small at the model's default
MODEL_KWARGS: Dict[str, Dict[str, Any]] = {
    "tiny": {"min_size": SIZE, "max_size": SIZE},
    "thin": {"min_size": SIZE, "max_size": SIZE},
    "small": {},
}
# The report whose advice "old-advice" pastes: main before the scale rule and the safe class weights.
OLD_REF = "44d53e8"


def write_dataset(root: str, name: str, sizes: Dict[str, int]) -> Dict[str, str]:
    """Train / val of one set under root/name (written once); returns train.py's coco_json keys."""
    folder = os.path.join(root, f"{name}-{sizes['train']}-{sizes['val']}")
    if not os.path.exists(os.path.join(folder, "val.json")):
        for split, seed in (("train", 0), ("val", 1)):
            rng = np.random.default_rng(seed)
            tiny_objects.write_split(folder, split, sizes[split], SIZE, rng, **DATASETS[name])
    return {
        "train_ann": os.path.join(folder, "train.json"),
        "train_images": os.path.join(folder, "train"),
        "val_ann": os.path.join(folder, "val.json"),
        "val_images": os.path.join(folder, "val"),
    }


# -- the configurations -------------------------------------------------------------------------------
def repeat_threshold_override(files: Dict[str, str], base: Dict[str, Any], out: str) -> Optional[Dict[str, Any]]:
    from data import image_classes, suggest_repeat_threshold

    with open(files["train_ann"], encoding="utf-8") as f:
        coco = json.load(f)
    t = suggest_repeat_threshold(image_classes(coco["annotations"], [im["id"] for im in coco["images"]]))
    return None if t is None else {"data": {"repeat_factor_threshold": t}}


def advice_override(files: Dict[str, str], base: Dict[str, Any], out: str) -> Optional[Dict[str, Any]]:
    """The data report's advice as its --write-config file gives it: the whole config to train with."""
    import analyze_data
    from train_config import read_yaml

    path = write_config(base, os.path.join(out, "report.yaml"))
    written = os.path.join(out, "advised.yaml")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        analyze_data.main(["--config", path, "--write-config", written])
    with open(os.path.join(out, "report.txt"), "w", encoding="utf-8") as f:
        f.write(buf.getvalue())
    return read_yaml(written)


def old_advice_override(files: Dict[str, str], base: Dict[str, Any], out: str) -> Optional[Dict[str, Any]]:
    """The advice the report printed at OLD_REF (its YAML blocks and --flag values, as printed then):
    that commit's references/ is extracted from git and its analyze_data.py run on the same config."""
    import subprocess
    import tarfile

    root = os.path.dirname(os.path.dirname(HERE))
    old = os.path.join(out, f"references-{OLD_REF}")
    if not os.path.exists(os.path.join(old, "references", "analyze_data.py")):
        tar = os.path.join(out, f"{OLD_REF}.tar")
        subprocess.run(["git", "-C", root, "archive", "-o", tar, OLD_REF, "references"], check=True)
        with tarfile.open(tar) as t:
            t.extractall(old, filter="data")
    path = write_config(base, os.path.join(out, "report.yaml"))
    env = {**os.environ, "PYTHONPATH": root}
    text = subprocess.run(
        [sys.executable, os.path.join(old, "references", "analyze_data.py"), "--config", path],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    with open(os.path.join(out, "report.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    return merge(printed_yaml(text), printed_flags(text)) or None


def printed_flags(text: str) -> Dict[str, Any]:
    """The ``--flag value`` advice of a report (lines that are not warnings), as config keys."""
    from train_config import OPTIONS

    by_flag = {f: o.path for o in OPTIONS for f in o.flags}
    found: Dict[str, Any] = {}
    for line in text.splitlines():
        if "WARNING" in line:
            continue
        for flag, value in re.findall(r"(--[a-z][a-z0-9-]*)\s+([^\s,;()]+)", line):
            if flag in by_flag and not value.startswith("--"):
                node = found
                *parents, leaf = by_flag[flag].split(".")
                for key in parents:
                    node = node.setdefault(key, {})
                node[leaf] = yaml.safe_load(value)
    return found


def printed_yaml(text: str) -> Dict[str, Any]:
    """Every indented ``model:`` / ``data:`` / ``training:`` block of a report, parsed and merged."""
    lines, merged = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\s+)(model|data|training):\s*$", line)
        if not m:
            continue
        block = [line]
        for nxt in lines[i + 1 :]:
            if len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            block.append(nxt)
        merge(merged, yaml.safe_load(textwrap.dedent("\n".join(block))))
    return merged


# name -> a fixed override, or a function (train files, base config, folder) -> override (None: no effect)
CONFIGS: Dict[str, Any] = {
    "default": {},
    "repeat-factor": repeat_threshold_override,
    "ohem": {"model": {"roi_head": {"sampler": "ohem"}}},
    "neg_pos_ub-3": {"model": {"roi_head": {"neg_pos_ub": 3}}},
    "pos_fraction-0.5": {"model": {"roi_head": {"pos_fraction": 0.5}}},
    "focal-2": {"model": {"roi_head": {"cls_loss": "focal"}}},  # focal_gamma None -> 2.0
    "class_weight-auto": {"model": {"roi_head": {"class_weight": "auto"}}},
    "class-agnostic": {"model": {"class_agnostic_bbox": True, "class_agnostic_mask": True}},
    "advice": advice_override,
    "old-advice": old_advice_override,
}
LABELS = {
    "repeat-factor": "repeat-factor (suggested threshold)",
    "neg_pos_ub-3": "neg_pos_ub 3",
    "pos_fraction-0.5": "pos_fraction 0.5",
    "focal-2": "focal γ=2",
    "class_weight-auto": "class_weight auto",
    "advice": "advice as printed (--write-config)",
    "old-advice": f"old advice (as {OLD_REF} printed it)",
}


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def base_config(
    files: Dict[str, str], sizes: Dict[str, int], kwargs: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    iters = sizes["train"] // BATCH
    epochs = sizes["epochs"]
    return {
        "model": {
            "name": "maskrcnn_tiny",
            "kwargs": {"min_size": SIZE, "max_size": SIZE} if kwargs is None else kwargs,
        },
        "data": {**files, "dataset": "coco_json", "workers": 0, "aspect_ratio_group_factor": -1, "report": False},
        "training": {
            "device": "cpu",
            "batch_size": BATCH,
            "epochs": epochs,
            "iters_per_epoch": iters,  # repeat-factor sampling lengthens an epoch: same steps for all
            "lr": LR,
            "lr_steps": [epochs - 1],
            "warmup_iters": iters - 1,  # the whole first epoch (train.py caps warmup there)
            "gradient_clip": {"enabled": True, "max_norm": CLIP},
            "eval_every": epochs,
            "print_freq": 1000,
            "plots": False,
        },
    }


def write_config(cfg: Dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


# -- one run ----------------------------------------------------------------------------------------
def final_record(metrics_path: str) -> Optional[Dict[str, Any]]:
    last = None
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") == "eval" and "per_class" in rec:
                last = rec
    return last


def ap_or_zero(row: Dict[str, float], key: str) -> float:
    """A class with ground truth but no detection at all has no COCOeval entry (nan): its AP is 0."""
    v = row.get(key, float("nan"))
    return 0.0 if v != v and row.get("gt", 0) > 0 else v


def train_once(cfg: Dict[str, Any], folder: str, seed: int) -> Dict[str, Any]:
    """One training run in this process; its final AP per class, or the one-line error that stopped it."""
    import train
    from errors import USER_ERRORS

    # overwrite: the seed's folder is this script's; a rerun replaces the run before it.
    cfg = merge(json.loads(json.dumps(cfg)), {"training": {"seed": seed, "output_dir": folder, "overwrite": True}})
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)  # appended to by train.py: a rerun must not read the old records
    path = write_config(cfg, os.path.join(folder, "config.in.yaml"))
    buf, t0 = io.StringIO(), time.time()
    try:
        with contextlib.redirect_stdout(buf):
            code = train.main(["--config", path])
        error = None if code == 0 else f"train.main returned {code}"
    except USER_ERRORS as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    with open(os.path.join(folder, "train.log"), "w", encoding="utf-8") as f:
        f.write(buf.getvalue())
    rec = None if error else final_record(metrics)
    if rec is None:
        return {"error": error or "no evaluation record", "wall_s": time.time() - t0}
    per_class = {k: {m: ap_or_zero(v, m) for m in ("bbox_AP", "bbox_AP50")} for k, v in rec["per_class"].items()}
    return {
        "bbox_AP": rec["bbox_AP"],
        "bbox_AP50": rec.get("bbox_AP50"),
        "per_class": per_class,
        "wall_s": time.time() - t0,
    }


def cached(path: str, cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A kept result of this very configuration (the same YAML), else None."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    return res if _same_run(res.get("config"), json.loads(json.dumps(cfg))) else None


def _same_run(kept: Any, cfg: Dict[str, Any]) -> bool:
    """The same YAML up to where the data set was written and keys at their off value: the sets are
    drawn from a fixed seed and named by their sizes (``tiny-200-150/train.json``), so a run kept from
    another checkout, or from before a key was added, matches."""

    def where(tree: Any) -> Any:
        if not isinstance(tree, dict):
            return tree
        # A key a later version added, at its off value, matches a run recorded before it existed.
        tree = {k: where(v) for k, v in tree.items() if v is not None and v is not False}
        files = tree.get("data")
        if not isinstance(files, dict):
            return tree
        tail = {k: "/".join(str(v).split("/")[-2:]) for k, v in files.items() if k.endswith(("_ann", "_images"))}
        files = {**files, **tail}
        return {**tree, "data": files}

    return where(kept) == where(cfg)


def run_config(
    name: str, files, sizes, out: str, seeds: List[int], rerun: bool, threads=None, kwargs=None
) -> Dict[str, Any]:
    """All seeds of one configuration: {"override", "runs"} or {"skipped": why}."""
    base = merge(base_config(files, sizes, kwargs), {"training": {"num_threads": threads}})
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    spec = CONFIGS[name]
    override = spec(files, base, folder) if callable(spec) else spec
    if override is None:
        return {"skipped": "no effect on this set (nothing suggested)"}
    cfg = merge(json.loads(json.dumps(base)), override)
    runs = []
    for seed in seeds:
        cache = os.path.join(folder, f"seed_{seed}", "result.json")
        res = cached(cache, cfg) if not rerun else None
        if res is None:
            res = train_once(cfg, os.path.dirname(cache), seed)
            if "error" not in res:  # a refused key may be built later: only results are kept
                with open(cache, "w", encoding="utf-8") as f:
                    json.dump({**res, "config": cfg}, f)
        print(
            f"  {name} seed {seed}: "
            + (res.get("error") or f"bbox AP {res['bbox_AP']:.4f}")
            + f" ({res['wall_s']:.0f} s)",
            flush=True,
        )
        if "error" in res:
            return {"override": override, "skipped": res["error"]}
        runs.append(res)
    return {"override": override, "runs": runs}


# -- the tables -------------------------------------------------------------------------------------
def stats(values: List[float]) -> tuple:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def column_values(runs: List[Dict[str, Any]], cls: Optional[str], metric: str) -> List[float]:
    return [r[metric] if cls is None else r["per_class"][cls][metric] for r in runs]


def table(results: Dict[str, Dict[str, Any]], classes: List[str], metric: str) -> str:
    head = f"| configuration | {metric.replace('_', ' ')} (all) | " + " | ".join(classes) + " |"
    lines = [head, "|---" * (len(classes) + 2) + "|"]
    for name, res in results.items():
        if "runs" not in res:
            lines.append(f"| {LABELS.get(name, name)} | skipped: {res['skipped']} |" + " |" * len(classes))
            continue
        cells = [stats(column_values(res["runs"], c, metric)) for c in [None, *classes]]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells) + " |")
    return "\n".join(lines)


def verdicts(results: Dict[str, Dict[str, Any]], classes: List[str]) -> List[str]:
    """Per configuration: the classes where its mean bbox AP is off the default's by more than one std."""
    ref = results.get("default")
    if not ref or "runs" not in ref:
        return []
    out = []
    for name, res in results.items():
        if name == "default" or "runs" not in res:
            continue
        worse, better = [], []
        for c in [None, *classes]:
            (m, s), (m0, s0) = (
                stats(column_values(res["runs"], c, "bbox_AP")),
                stats(column_values(ref["runs"], c, "bbox_AP")),
            )
            label = c or "all"
            if m < m0 - max(s, s0):
                worse.append(f"{label} ({m - m0:+.3f})")
            elif m > m0 + max(s, s0):
                better.append(f"{label} ({m - m0:+.3f})")
        out.append(
            f"- {LABELS.get(name, name)}: worse than default by > 1 std: {', '.join(worse) or 'none'}; "
            f"better: {', '.join(better) or 'none'}"
        )
    return out


def dataset_section(name: str, results: Dict[str, Dict[str, Any]], n_seeds: int) -> str:
    done = [r for r in results.values() if "runs" in r]
    if not done:
        return f"### {name}\n\nno configuration ran"
    classes = list(done[0]["runs"][0]["per_class"])
    overrides = [
        f"- {LABELS.get(k, k)}: "
        + (f"`{json.dumps(r['override'])}`" if not callable(CONFIGS.get(k)) else "its report.txt")
        for k, r in results.items()
        if "override" in r
    ]
    parts = [
        f"### {name} ({n_seeds} seed(s); bbox AP, mean ± std)",
        table(results, classes, "bbox_AP"),
        "bbox AP50:",
        table(results, classes, "bbox_AP50"),
        *verdicts(results, classes),
        "overrides:",
        *overrides,
    ]
    return "\n\n".join(parts[:4]) + "\n\n" + "\n".join(parts[4:])


def print_tables(out: str, text: str) -> None:
    """The tables printed, and kept as ``out``/tables.md beside the runs they summarise."""
    print(text)
    with open(os.path.join(out, "tables.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument(
        "--epochs", type=int, default=None, help=f"default {FULL['epochs']} ({QUICK['epochs']} with --quick)"
    )
    p.add_argument("--out", default="runs/rare_classes")
    p.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK['train']} / {QUICK['val']} images, seed 0")
    p.add_argument("--rerun", action="store_true", help="train again even where a result.json exists")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    sizes = dict(QUICK if args.quick else FULL)
    sizes["epochs"] = args.epochs or sizes["epochs"]
    seeds = [args.seeds[0]] if args.quick else args.seeds
    out = os.path.join(args.out, "quick" if args.quick else f"e{sizes['epochs']}")
    sections = []
    for ds in args.datasets:
        files = write_dataset(os.path.join(args.out, "data"), ds, sizes)
        print(f"== {ds}: {files['train_ann']}", flush=True)
        results = {
            c: run_config(c, files, sizes, os.path.join(out, ds), seeds, args.rerun, args.num_threads, MODEL_KWARGS[ds])
            for c in args.configs
        }
        sections.append(dataset_section(ds, results, len(seeds)))
    print_tables(out, "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
