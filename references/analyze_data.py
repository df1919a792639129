r"""The data and anchor report as a command: the training script's flags and config in, the report
(data_report.py) printed, optionally its plot and the config with its advice merged in.

Objects per class and the imbalance, empty images, object sizes after the model's own resize, and
anchor coverage against the model's real anchors, at the IoU thresholds of its RPN matcher (the report
says which); when coverage is poor, the anchor setting that raises it without lowering a size bucket or
class; the input-scale rule and its cure (scale.py); from a 5:1 class imbalance on, the repeat-factor
threshold and a safe class_weight list. All of it is printed as one YAML config, which
``--write-config FILE`` merges into the config the report ran with and writes, for
``train.py --config FILE``.

    python references/analyze_data.py --config references/configs/shapes.yaml [--plot report.png]
    python references/analyze_data.py --config my.yaml --write-config my_advised.yaml

Takes the training script's flags and config; reads only the annotation JSON (no image is decoded).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from anchor_coverage import AnchorGeometry, Measured, Thresholds, measure  # noqa: E402
from data_report import data_report, model_view  # noqa: E402

if TYPE_CHECKING:
    from train_config import TrainConfig


# -- plot -------------------------------------------------------------------------------------------------
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # matplotlib picks the format from the suffix
PLOT_CLASSES = 12  # classes drawn in their own colour (the most frequent); the rest as one "other"


def _class_groups(cats: np.ndarray, names: Dict[int, str]) -> List[Tuple[str, np.ndarray]]:
    """(legend label, box mask) per class with boxes: the most frequent in their own colour, the tail as one."""
    present = sorted({int(c) for c in cats}, key=lambda c: (-int((cats == c).sum()), c))
    groups = [(names.get(c, str(c)), cats == c) for c in sorted(present[:PLOT_CLASSES])]  # in category order
    rest = present[PLOT_CLASSES:]
    if len(rest) == 1:
        groups.append((names.get(rest[0], str(rest[0])), cats == rest[0]))
    elif rest:
        groups.append((f"other ({len(rest)} classes)", np.isin(cats, rest)))
    return groups


def report_figure(found: Measured, names: Dict[int, str], thr: Thresholds):
    """The sizes histogram (stacked by class) and the coverage scatter (coloured by class), with legends
    and the RPN matcher's thresholds ``thr`` as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side, best = np.maximum(found.boxes.sides, 1e-3), found.best
    groups = _class_groups(found.boxes.labels, names)
    colors = [plt.get_cmap("tab20" if len(groups) > 10 else "tab10")(i) for i in range(len(groups))]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = np.geomspace(max(side.min(), 1), side.max() + 1, 40)
    axes[0].hist([side[m] for _, m in groups], bins=bins, stacked=True, color=colors, label=[n for n, _ in groups])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("object size after resize, sqrt(area) px")
    axes[0].set_ylabel("boxes")
    axes[0].set_title("object sizes, stacked by class")
    axes[0].legend(title="class", fontsize="small")
    for (name, m), color in zip(groups, colors):
        axes[1].scatter(side[m], best[m], s=4, alpha=0.5, color=color, label=name)
    # Black and grey: the class colours are the tab palettes'.
    axes[1].axhline(thr.fg, color="black", ls="--", lw=1, label=f"RPN foreground ({thr.fg:g})")
    axes[1].axhline(thr.bg, color="grey", ls=":", lw=1, label=f"RPN background ({thr.bg:g})")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("object size after resize, sqrt(area) px")
    axes[1].set_ylabel("best IoU with any anchor")
    axes[1].set_title("anchor coverage, by class")
    axes[1].legend(fontsize="small", markerscale=3)
    fig.tight_layout()
    return fig


def plot_report(found: Measured, path: str, names: Dict[int, str], thr: Thresholds) -> str:
    """Write :func:`report_figure` to ``path`` (checked by :func:`check_plot_path`); returns the path."""
    import matplotlib.pyplot as plt

    fig = report_figure(found, names, thr)
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def check_plot_path(path: str) -> List[str]:
    """One-line ConfigErrors for a --plot path that cannot be written; returns the folders to create."""
    from train_config import ConfigError

    if os.path.isdir(path):
        raise ConfigError(f"--plot {path}: is a folder; give a file name, e.g. {os.path.join(path, 'report.png')}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in PLOT_SUFFIXES:
        raise ConfigError(
            f"--plot {path}: the file name must end in one of {', '.join(PLOT_SUFFIXES)} (it sets the image format)"
        )
    missing, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--plot {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--plot {path}: {parent} is not writable")
    return missing[::-1]


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="references/analyze_data.py",
        description="The data and anchor report, from the training annotations alone (no image is decoded).",
        epilog="Every other flag (--config, --model, --dataset, --data-path, --train-ann, ...) is "
        "references/train.py's (python references/train.py --help lists them); of the data files, only the "
        "training annotations are read.",
    )
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help=f"also write the object sizes and the anchor coverage, coloured by class ({', '.join(PLOT_SUFFIXES)}); "
        "missing folders are created",
    )
    p.add_argument(
        "--write-config",
        metavar="FILE.yaml",
        default=None,
        help="write the config the report ran with (--config and flags), with all its advice merged in, as a "
        "config for train.py --config FILE.yaml",
    )
    return p


def check_config_path(path: str) -> None:
    """--write-config FILE: a one-line ConfigError when it cannot be written (before any data is read)."""
    from train_config import ConfigError

    if os.path.isdir(path):
        raise ConfigError(
            f"--write-config {path}: is a folder; give a file name, e.g. {os.path.join(path, 'advised.yaml')}"
        )
    if not path.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"--write-config {path}: the file name must end in .yaml or .yml")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--write-config {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--write-config {path}: {parent} is not writable")


def write_advised_config(cfg: TrainConfig, advice: Dict[str, Any], path: str) -> str:
    """The config with the advice merged in (validated as train.py validates it), written atomically."""
    from train_config import dump, finalize, flatten
    from training_checkpoint import atomic_write_text

    changes = flatten(advice)
    advised = cfg.replace(changes, source="the data report's advice")
    advised, loss_cfg = finalize(advised.to_dict(), source="the data report's advice", reads=("train_ann",))
    keys = ", ".join(changes) or "none"
    head = f"# the data report's advice (analyze_data.py --write-config), merged into the config it ran with: {keys}\n"
    atomic_write_text(head + dump(advised, loss_cfg), path)
    return keys


def _read_annotations(path: Optional[str]) -> Dict[str, Any]:
    import json

    from checks import DataError
    from train_config import ConfigError

    if not path or not os.path.isfile(path):
        raise ConfigError(f"the training annotations file is not found: {path} (--train-ann / --data-path)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a COCO JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DataError(f"{path}: a COCO file needs the lists 'images', 'annotations' and 'categories'")
    for a in data["annotations"]:  # the report reads every box: one without a usable one is named here
        box = a.get("bbox") if isinstance(a, dict) else None
        if not isinstance(box, list) or len(box) != 4 or not _finite_numbers(box):
            where = f"annotation {a.get('id')} (image {a.get('image_id')})" if isinstance(a, dict) else repr(a)[:40]
            raise DataError(f"{path}: {where}: bbox {box!r} is not 4 numbers [x, y, width, height]")
    return data


def _finite_numbers(values: List[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)


def main(argv: Optional[List[str]] = None) -> int:
    from run_data import dataset_files
    from train_config import dump, resolve

    args, rest = build_parser().parse_known_args(argv)
    new_dirs = check_plot_path(args.plot) if args.plot else []  # before the data pass, not after
    if args.write_config:
        check_config_path(args.write_config)
    cfg, loss_cfg, print_only = resolve(rest, reads=("train_ann",))
    if print_only:
        print(dump(cfg, loss_cfg), end="")
        return 0
    files = dataset_files(cfg)
    data = _read_annotations(files["train_ann"])
    # The training script's labels: COCO's own ids, else contiguous ones.
    by_id = files["label_mode"] == "category_id"
    label_to_cat = {c["id"]: c["id"] for c in data["categories"]} if by_id else None
    model = report_model(cfg, loss_cfg, data)
    report = data_report(None, model, label_to_cat=label_to_cat, dataset=data, cfg=cfg)
    print(report.text())
    if args.write_config:
        keys = write_advised_config(cfg, report.config, args.write_config)
        print(
            f"wrote {args.write_config}: the config with the advice ({keys}); train with --config {args.write_config}"
        )
    if args.plot:
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        thr = Thresholds.of(model)
        found = measure(model_view(data, cfg), AnchorGeometry(model), names, thr)  # the boxes the report measured
        if len(found.boxes) == 0:
            print(f"--plot {args.plot}: not written, the training annotations hold no boxes")
            return 0
        for d in new_dirs:
            os.makedirs(d, exist_ok=True)
        written = plot_report(found, args.plot, names, thr)
        print("wrote", written + (f" (created the folder {new_dirs[-1]})" if new_dirs else ""))
    return 0


def report_model(cfg: TrainConfig, loss_cfg: Any, data: Dict[str, Any]):
    """The model the config trains, without weights: what the report reads of it is its anchors, input
    sizes and RPN matcher. torchvision's own (stock) model with the config's model.kwargs, anchors and
    the loss config's rpn_head.pos_iou_thr / neg_iou_thr (tv_lossfix sets them on the same Matcher)."""
    from tv_lossfix.sampling import set_matcher

    from models import build_model, set_anchors

    m = cfg.model
    # The training script's class count: COCO's own ids (91 classes), else contiguous ones.
    coco_classes = {"coco": 91, "coco_kp": 2}.get(cfg.data.dataset)
    num_classes = m.num_classes or coco_classes or len(data["categories"]) + 1
    model, _ = build_model(name=m.name, num_classes=num_classes, stock=True, kwargs=m.kwargs)
    set_anchors(model, m.anchor_sizes, m.aspect_ratios)
    rpn, matcher = loss_cfg.rpn_head, model.rpn.proposal_matcher
    high = matcher.high_threshold if rpn.pos_iou_thr is None else rpn.pos_iou_thr
    low = matcher.low_threshold if rpn.neg_iou_thr is None else rpn.neg_iou_thr
    set_matcher(model.rpn, high, low)
    return model


if __name__ == "__main__":
    from errors import run_cli

    sys.exit(run_cli(main))
