"""references/analyze_data.py as a command: its own --help, the training annotations alone suffice,
each mistake is one line, and the plot is written where it says, coloured by class with a legend."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import analyze_data as A
from helpers import REFS, TINY_SHAPES, assert_names, tiny_config
from shapes import ShapesSpec, ensure_shapes
from train_config import ConfigError


@pytest.fixture
def train_json(data_root):
    return ensure_shapes(data_root, ShapesSpec(**TINY_SHAPES))["train_ann"]


def _class_counts(path):
    with open(path) as f:
        data = json.load(f)
    anns = [a for a in data["annotations"] if not a.get("iscrowd", 0)]
    counts = {
        c["name"]: sum(a["category_id"] == c["id"] for a in anns)
        for c in sorted(data["categories"], key=lambda c: c["id"])
    }
    return {k: n for k, n in counts.items() if n}, len(data["images"])  # classes with boxes, in id order


def test_help_is_its_own_and_shows_plot(capsys):
    with pytest.raises(SystemExit) as e:
        A.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: references/analyze_data.py")
    assert "--plot FILE.png" in out
    assert "references/train.py's" in out  # says where the other flags come from


@pytest.mark.slow
def test_the_training_annotations_alone_suffice(train_json, capsys):
    # No --train-images, --val-ann, --val-images: the report reads only the training JSON.
    assert A.main(["--dataset", "coco_json", "--train-ann", train_json, "--model", "maskrcnn_tiny"]) == 0
    counts, images = _class_counts(train_json)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"data report: {images} images")
    for name, n in counts.items():
        assert f"{name} {n}" in first


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--dataset", "coco_json"], ["--train-ann", "data.train_ann"]),
        (["--dataset", "coco_json", "--train-ann", "{tmp}/none.json"], ["{tmp}/none.json", "--train-ann"]),
        (["--dataset", "coco", "--data-path", "{tmp}"], ["{tmp}", "--data-path"]),
    ],
)
def test_missing_annotations_are_one_line_naming_the_file_and_flag(tmp_path, argv, named):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(ConfigError) as e:
        A.main(argv)
    assert all(n.format(tmp=tmp_path) in str(e.value) for n in named)
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_json_is_one_line(tmp_path):
    from checks import DataError

    bad = tmp_path / "train.json"
    bad.write_text("{not json")
    with pytest.raises(DataError) as e:
        A.main(["--dataset", "coco_json", "--train-ann", str(bad)])
    assert str(e.value).startswith(f"{bad}: ") and "JSONDecodeError" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "plot, culprit",
    [
        ("{tmp}", "{tmp}/report.png"),  # a folder: the example file name in it
        ("{tmp}/cfg.yaml/report.png", "{tmp}/cfg.yaml"),  # the file in the way
        ("{tmp}/cfg.yaml/a/b/report.png", "{tmp}/cfg.yaml"),
        ("{tmp}/report.txt", ".png"),  # the suffixes that set the format
        ("{tmp}/report", ".png"),
    ],
)
def test_bad_plot_paths_are_one_line_before_any_data_is_read(tmp_path, plot, culprit):
    (tmp_path / "cfg.yaml").write_text("model: {name: maskrcnn_tiny}\n")
    plot, culprit = plot.format(tmp=tmp_path), culprit.format(tmp=tmp_path)
    missing = str(tmp_path / "never")  # data_path: reading the data would fail differently
    with pytest.raises(ConfigError) as e:
        A.main(["--dataset", "shapes", "--data-path", missing, "--plot", plot])
    assert str(e.value).startswith(f"--plot {plot}: ") and culprit in str(e.value)
    assert "\n" not in str(e.value)
    assert not os.path.exists(missing)
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml"]  # nothing written, no folder.png


@pytest.mark.parametrize(
    "path, culprit",
    [
        ("{tmp}", "{tmp}/advised.yaml"),  # a folder: the example file name in it
        ("{tmp}/x.txt", ".yaml"),
        ("{tmp}/no/x.yaml", "{tmp}/no"),  # the missing folder
    ],
)
def test_a_bad_write_config_path_is_one_line_before_any_data_is_read(tmp_path, path, culprit):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name: maskrcnn_tiny}\ndata: {dataset: coco_json, train_ann: /nonexistent.json}\n")
    path, culprit = path.format(tmp=tmp_path), culprit.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as e:  # not the missing annotations: the path is checked first
        A.main(["--config", str(cfg), "--write-config", path])
    assert str(e.value).startswith(f"--write-config {path}: ") and culprit in str(e.value)
    assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path)) == ["cfg.yaml"]


@pytest.mark.slow
def test_plot_is_written_where_said_with_a_legend_of_the_classes(tmp_path, data_root, train_json, capsys, monkeypatch):
    figures = []
    real = A.report_figure
    monkeypatch.setattr(A, "report_figure", lambda *a: figures.append(real(*a)) or figures[-1])
    path = tmp_path / "new" / "sub" / "report.png"
    assert A.main(["--config", tiny_config(tmp_path, data_root), "--plot", str(path)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]  # the file, and the folder it had to create
    assert last.startswith(f"wrote {path} ") and last.endswith(f"{path.parent})")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    counts, _ = _class_counts(train_json)
    (fig,) = figures
    hist, scatter = fig.axes
    assert [t.get_text() for t in hist.get_legend().get_texts()] == list(counts)
    assert [t.get_text() for t in scatter.get_legend().get_texts()] == list(counts) + [
        "RPN foreground (0.7)",
        "RPN background (0.3)",
    ]
    # One stacked bar series and one scatter series per class, each holding that class's boxes.
    assert [int(sum(p.get_height() for p in c)) for c in hist.containers] == list(counts.values())
    assert [len(c.get_offsets()) for c in scatter.collections] == list(counts.values())


def _small_coco_json(tmp_path):
    """Eight 128 px images, four boxes each between two of maskrcnn_tiny's anchor sizes (no image file)."""
    images = [{"id": i + 1, "width": 128, "height": 128, "file_name": f"{i}.png"} for i in range(8)]
    anns = [
        {"id": 4 * i + k + 1, "image_id": i + 1, "category_id": 1 + k % 2, "bbox": [10.0 + 25 * k, 20.0, s, s]}
        for i in range(8)
        for k, s in enumerate((17.0, 18.0, 30.0, 45.0))
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}))
    return str(path)


@pytest.mark.parametrize(
    "model",
    [
        {"kwargs": {"min_size": 128, "max_size": 128, "rpn_fg_iou_thresh": 0.6, "rpn_bg_iou_thresh": 0.45}},
        {"kwargs": {"min_size": 128, "max_size": 128}, "rpn_head": {"pos_iou_thr": 0.6, "neg_iou_thr": 0.45}},
    ],
    ids=["model.kwargs", "model.rpn_head"],
)
def test_the_report_uses_the_rpn_thresholds_the_config_sets(tmp_path, capsys, model):
    import yaml

    cfg = tmp_path / "cfg.yaml"
    data = {"dataset": "coco_json", "train_ann": _small_coco_json(tmp_path)}
    cfg.write_text(yaml.safe_dump({"model": {"name": "maskrcnn_tiny", **model}, "data": data}))
    assert A.main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert_names(
        next(x for x in out.splitlines() if "anchor coverage" in x), ">= 0.6", ">= 0.45", "rpn.proposal_matcher"
    )
    assert "0.7" not in out.split("anchor coverage")[1].split("\n")[0]
    assert "anchor coverage (best IoU >= 0.7 / >= 0.3" in _default_report(tmp_path, capsys)


def test_under_tiles_the_plot_shows_the_boxes_the_report_measured(tmp_path, monkeypatch):
    """data.tile_size: the model trains on 64 px tiles resized to 128, so the objects are twice as large
    for it; the plot's sizes and coverage are those of the report, not of the whole images."""
    import matplotlib.pyplot as plt
    import yaml

    figures, reports, real = [], [], A.data_report
    monkeypatch.setattr(A, "report_figure", lambda found, *a: figures.append(found) or plt.figure())
    monkeypatch.setattr(A, "data_report", lambda *a, **k: reports.append(real(*a, **k)) or reports[-1])
    cfg = tmp_path / "cfg.yaml"
    data = {"dataset": "coco_json", "train_ann": _small_coco_json(tmp_path), "tile_size": 64, "tile_overlap": 16}
    model = {"name": "maskrcnn_tiny", "kwargs": {"min_size": 128, "max_size": 128}}
    cfg.write_text(yaml.safe_dump({"model": model, "data": data}))
    assert A.main(["--config", str(cfg), "--plot", str(tmp_path / "r.png")]) == 0
    (found,), (report,) = figures, reports
    p50 = float(np.percentile(found.boxes.sides, 50))
    assert p50 == pytest.approx(report.size_quantiles["p50"]) and p50 == pytest.approx(2 * 24.0)  # 18 / 30 px x 2
    assert (found.best >= 0.7).mean() == pytest.approx(report.coverage["all"]["fg"])


def _default_report(tmp_path, capsys):
    A.main(["--dataset", "coco_json", "--train-ann", str(tmp_path / "train.json"), "--model", "maskrcnn_tiny"])
    return capsys.readouterr().out


def test_many_classes_keep_the_frequent_ones_and_merge_the_tail():
    cats = np.repeat(np.arange(1, 16), np.arange(15, 0, -1))  # class 1 most frequent ... 15 least
    names = {c: f"c{c}" for c in range(1, 16)}
    groups = A._class_groups(cats, names)
    assert [n for n, _ in groups] == [f"c{c}" for c in range(1, A.PLOT_CLASSES + 1)] + ["other (3 classes)"]
    assert int(groups[-1][1].sum()) == 3 + 2 + 1
    assert sum(int(m.sum()) for _, m in groups) == len(cats)


@pytest.mark.slow
def test_the_command_prints_one_line_not_a_traceback(tmp_path):
    script = os.path.join(REFS, "analyze_data.py")
    out = subprocess.run(
        [sys.executable, script, "--dataset", "shapes", "--plot", str(tmp_path / "r.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: --plot {tmp_path / 'r.txt'}: ") and ".png" in line
