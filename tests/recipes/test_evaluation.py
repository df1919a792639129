"""The per-class table printed and recorded at each evaluation of references/train.py."""

import pytest

import train
from helpers import records, tiny_config

pytestmark = pytest.mark.slow  # references/train.py end to end


def test_per_class_table_each_evaluation(tmp_path, capsys, data_root):
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=1, epochs=2)
    assert train.main(["--config", cfg, "--no-data-report"]) == 0
    assert capsys.readouterr().out.count("recall@0.05") == 2
    evals = records(tmp_path / "out", "eval")
    assert len(evals) == 2 and set(evals[0]["per_class"]) == {"square", "circle", "triangle", "star"}
    assert {"gt", "dets_per_image", "recall", "bbox_AP", "bbox_AP50", "segm_AP"} <= set(evals[0]["per_class"]["star"])
