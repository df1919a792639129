"""The CUDA check's CPU parts, so the GPU run is never the first run of its code."""

import importlib.util
import json
import os
import warnings

import pytest

import helpers

# benchmarks/ is a folder of scripts, not on pytest's pythonpath: load the one tested by its path.
_spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(helpers.REFS, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_parts_and_writes_the_summary(tmp_path):
    out = tmp_path / "gc"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--model", "maskrcnn_tiny", "--out", str(out)])
    summary = json.load(open(out / "gpu_check.json"))
    assert code == 0
    assert summary["amp_train"]["status"] == "PASS" and summary["amp_train"]["losses_finite"]
    assert summary["amp_train"]["steps_logged"] >= 1 and summary["amp_train"]["amp"] is False
    assert summary["benchmark"]["status"] == "PASS"
    for name in ("amp_step", "loss_syncs", "ddp_sync_bn"):
        assert summary[name]["status"] == "SKIP" and summary[name]["why"]


def test_sync_attribution_by_source_line():
    def warn(path, line):
        return warnings.WarningMessage("called a synchronizing CUDA operation", UserWarning, path, line)

    ours = os.path.join(helpers.ROOT, "tv_lossfix", "rpn.py")
    theirs = "/x/site-packages/torchvision/models/detection/rpn.py"
    counts = gpu_check._attribute(
        [warn(ours, 1), warn(ours, 1), warn(theirs, 315), warnings.WarningMessage("other", UserWarning, theirs, 1)]
    )
    assert sum(counts.values()) == 3
    assert [k.split(":")[0] for k in counts] == ["tv_lossfix", "torchvision"]
    assert counts[next(k for k in counts if k.startswith("tv_lossfix"))] == 2
