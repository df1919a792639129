"""references/train.py end to end on tiny data: runs, resume, DDP, config precedence, NaN policy."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import helpers
import run_model
import train
import training_checkpoint
from helpers import raises_naming, records, tiny_config


@pytest.mark.slow
def test_end_to_end_run_writes_everything(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root, data={"lsj_size": 64}, plots=True, gallery_images=2)
    assert train.main(["--config", cfg, "--clip-grad-norm", "10", "--use-copypaste", "--data-augmentation", "lsj"]) == 0
    out = tmp_path / "out"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoint.pth",
        "model_0.pth",
        "training_curves.png",
        "eval_curves.png",
        "gallery.png",
    ):
        assert (out / name).exists(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["gradient_clip"] == {"enabled": True, "max_norm": 10.0, "norm_type": 2.0}
    assert saved["model"]["roi_head"]["cls_pos_weight"] == 1.0
    train_recs = records(out, "train")
    assert train_recs and all(r["grad_norm"] >= 0 and "loss_mask" in r and "roi/fg_prob" in r for r in train_recs)
    ev = records(out, "eval")[-1]
    for key in ("bbox_AP", "segm_AP", "dets_per_image", "score_p90", "max_score"):
        assert key in ev
    data = records(out, "data")
    assert {d["split"] for d in data} == {"train", "val"} and all("negatives" in d for d in data)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["config"]["training"]["batch_size"] == 2


@pytest.mark.slow
def test_eval_every_evaluates_every_n_epochs_and_after_the_last_and_plots_those(tmp_path, data_root):
    # The demo evaluates every 3 epochs: the skipped epochs' records hold their training summary only,
    # and the end-of-run plots must draw the evaluated epochs (they raised KeyError on the others).
    cfg = tiny_config(tmp_path, data_root, epochs=3, iters_per_epoch=1, eval_every=2, plots=True)
    assert train.main(["--config", cfg]) == 0
    out = tmp_path / "out"
    assert [r["epoch"] for r in records(out, "eval") if "bbox_AP" in r] == [1, 2]
    assert [r["epoch"] for r in records(out, "eval")] == [0, 1, 2]  # every epoch's training summary
    assert (out / "eval_curves.png").exists() and (out / "training_curves.png").exists()


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, data_root):
    straight = tmp_path / "a"
    straight.mkdir()
    cfg_a = tiny_config(straight, data_root, epochs=2, iters_per_epoch=3)
    assert train.main(["--config", cfg_a]) == 0
    split = tmp_path / "b"
    split.mkdir()
    cfg_b = tiny_config(split, data_root, epochs=2, iters_per_epoch=3)
    assert train.main(["--config", cfg_b, "--epochs", "1"]) == 0
    assert train.main(["--config", cfg_b, "--resume", str(split / "out" / "checkpoint.pth")]) == 0
    a = torch.load(straight / "out" / "checkpoint.pth", weights_only=True)
    b = torch.load(split / "out" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["state"]["iteration"] == b["state"]["iteration"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_bad_resume_checkpoints(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root)
    trunc = tmp_path / "trunc.pth"
    torch.save({"format": training_checkpoint.FORMAT, "model": {"w": torch.zeros(1000)}}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with raises_naming(train.CheckpointError, "--resume", str(trunc), "cannot read"):
        train.main(["--config", cfg, "--resume", str(trunc)])
    bare = tmp_path / "bare.pth"
    torch.save({"w": torch.zeros(1)}, bare)
    with raises_naming(train.CheckpointError, f"--resume: {bare}", "--weights"):  # what it is, and the flag for it
        train.main(["--config", cfg, "--resume", str(bare)])
    with raises_naming(train.CheckpointError, "--resume: ", str(tmp_path / "nope.pth"), "not found"):
        train.main(["--config", cfg, "--resume", str(tmp_path / "nope.pth")])


def _nan_model(monkeypatch, bad_iters, term="loss_classifier"):
    """Wrap the built model so that chosen training iterations return a NaN loss term."""
    real = run_model.build_model

    def build(*a, **k):
        model, replaced = real(*a, **k)
        forward = model.forward
        calls = {"n": 0}

        def patched(images, targets=None):
            out = forward(images, targets)
            if model.training:
                if calls["n"] in bad_iters or "all" in bad_iters:
                    out[term] = out[term] * float("nan")
                calls["n"] += 1
            return out

        model.forward = patched
        return model, replaced

    monkeypatch.setattr(run_model, "build_model", build)


@pytest.mark.slow
def test_nan_policy_stop_names_term_and_iteration(tmp_path, data_root, monkeypatch, capsys):
    _nan_model(monkeypatch, {2})
    cfg = tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg]) == 2
    stopped = records(tmp_path / "out", "stopped")
    assert (
        len(stopped) == 1
        and "non-finite loss_classifier" in stopped[0]["reason"]
        and "iteration 2" in stopped[0]["reason"]
    )
    assert "non-finite loss_classifier" in capsys.readouterr().out
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.slow
def test_nan_policy_skip_keeps_weights_finite(tmp_path, data_root, monkeypatch):
    _nan_model(monkeypatch, {1, 2}, term="loss_box_reg")
    cfg = tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg, "--nan-policy", "skip"]) == 0
    ev = records(tmp_path / "out", "eval")[-1]
    assert ev["skipped_steps"] == 2
    skipped = records(tmp_path / "out", "nonfinite")
    assert [r["iter"] for r in skipped] == [1, 2] and all(r["terms"] == ["loss_box_reg", "grad_norm"] for r in skipped)
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nan_policy_skip_stops_after_consecutive_skips(tmp_path, data_root, monkeypatch):
    _nan_model(monkeypatch, {"all"})
    cfg = tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg, "--nan-policy", "skip", "--max-consecutive-skips", "3"]) == 2
    (stopped,) = records(tmp_path / "out", "stopped")
    assert "3 consecutive steps skipped" in stopped["reason"] and "loss_classifier" in stopped["reason"]


@pytest.mark.slow
def test_test_only_evaluates_a_checkpoint(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg]) == 0
    ckpt = str(tmp_path / "out" / "checkpoint.pth")
    out2 = str(tmp_path / "eval")
    assert train.main(["--config", cfg, "--test-only", "--resume", ckpt, "--output-dir", out2]) == 0
    (ev,) = records(out2, "eval")
    assert "bbox_AP" in ev and "segm_AP" in ev


@pytest.mark.slow
def test_stock_flag_builds_torchvision_model(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root)
    assert train.main(["--config", cfg, "--stock", "--iters-per-epoch", "2"]) == 0
    assert "roi/fg_prob" not in records(tmp_path / "out", "train")[-1]


# Run as torchrun's entry point: records every rank's tv_lossfix.training_stats (only rank 0 writes
# metrics.jsonl), then runs train.py as its own command line would.
_STATS_SPY = """
import json, os, runpy, sys

import tv_lossfix

real = tv_lossfix.training_stats


def spy(model):
    stats = real(model)
    with open(os.path.join(os.environ["STATS_DIR"], "rank" + os.environ["RANK"] + ".jsonl"), "a") as f:
        f.write(json.dumps({k: float(v) for k, v in stats.items()}) + "\\n")
    return stats


tv_lossfix.training_stats = spy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _own_normalizers(stats, images):
    """What a rank divides by without the sync: its sampled count (cls) and its positives (bbox, "positive")."""
    out = {}
    for head in ("rpn", "roi"):
        pos, neg = stats[f"{head}/pos_per_image"] * images, stats[f"{head}/neg_per_image"] * images
        out[f"{head}/cls_avg_factor"], out[f"{head}/bbox_avg_factor"] = pos + neg, pos
    return out


@pytest.mark.slow
def test_two_process_gloo_run_averages_the_normalizers_over_ranks(tmp_path, data_root):
    data = yaml.safe_load(open(tiny_config(tmp_path, data_root, iters_per_epoch=2)))
    data["model"]["rpn_head"] = {"bbox_avg_factor": "positive"}  # a count that differs between ranks
    data["model"]["roi_head"] = {"bbox_avg_factor": "positive"}
    cfg = tmp_path / "positive.yaml"
    cfg.write_text(yaml.safe_dump(data))
    spy = tmp_path / "spy.py"
    spy.write_text(_STATS_SPY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(spy)]
    cmd += [os.path.join(helpers.REFS, "train.py"), "--config", str(cfg), "--sync-avg-factor"]
    env = helpers.child_env(STATS_DIR=str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    recs = records(tmp_path / "out")
    assert len(records(tmp_path / "out", "eval")) == 1  # rank 0 alone writes
    train_recs = [r for r in recs if r["type"] == "train"]
    assert len(train_recs) == 2 and train_recs[-1]["img_per_s"] > 0
    ranks = [[json.loads(line) for line in open(tmp_path / f"rank{r}.jsonl")] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    differ = False
    for logged, mine, other in zip(train_recs, *ranks):
        assert logged == {**logged, **mine}  # rank 0's statistics are what metrics.jsonl records
        own = [_own_normalizers(s, images=2) for s in (mine, other)]
        for key in own[0]:
            # sync_avg_factor: every rank divides by max(mean over ranks of its own count, 1).
            expected = max((own[0][key] + own[1][key]) / 2, 1.0)
            assert mine[key] == other[key] == pytest.approx(expected), key
            differ |= own[0][key] != own[1][key]
    assert differ  # the ranks' own counts differ somewhere: the mean is not rank 0's own count
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["model"]["sync_avg_factor"] is True
