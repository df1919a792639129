"""Preemption-safe training and checkpoints that carry their model: stop signals, mid-epoch resume,
periodic checkpoints, model settings restored from --weights / --resume / weights=path."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator

import tv_lossfix
from tv_lossfix.model_settings import ModelSettingsWarning

import checks
import engine
import helpers
import models
import preemption
import train
import training_checkpoint
from helpers import assert_names, raises_naming, records, tiny_config, train_loads

QUIET = ["--no-data-report"]


def _signal_at(monkeypatch, step_index: int, sig=signal.SIGTERM):
    """Deliver ``sig`` to this process during training step ``step_index`` (0-based), as a scheduler would."""
    real = engine.train_step
    calls = {"n": 0}

    def step(ctx, images, targets):
        if calls["n"] == step_index:
            os.kill(os.getpid(), sig)
        calls["n"] += 1
        return real(ctx, images, targets)

    monkeypatch.setattr(engine, "train_step", step)
    return calls


def _ckpt(out_dir, name="checkpoint.pth"):
    return torch.load(os.path.join(out_dir, name), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["shuffle", "repeat_factor"])
def test_mid_epoch_resume_matches_uninterrupted_run(tmp_path, data_root, monkeypatch, sampler):
    extra = {"repeat_factor_threshold": 0.9} if sampler == "repeat_factor" else {}

    def config(sub):
        (tmp_path / sub).mkdir()
        path = tiny_config(tmp_path / sub, data_root, iters_per_epoch=6, batch_size=1)
        if extra:  # a data: key, next to the tiny config's own
            import yaml

            cfg = yaml.safe_load(open(path))
            cfg["data"].update(extra)
            open(path, "w").write(yaml.safe_dump(cfg))
        return path

    loaded = train_loads(monkeypatch)
    cfg_a = config("a")
    assert train.main(["--config", cfg_a, *QUIET]) == 0
    straight_loads = list(loaded)
    cfg_b = config("b")
    loaded.clear()
    _signal_at(monkeypatch, 2)  # the signal arrives during step 2: the run stops after it, 3 steps done
    assert train.main(["--config", cfg_b, *QUIET]) == 143
    stopped = _ckpt(tmp_path / "b" / "out")
    assert stopped["in_epoch"]["epoch"] == 0 and stopped["in_epoch"]["iteration"] == 3
    assert stopped["state"]["iteration"] == 3 and stopped["epoch"] == -1  # torchvision's "last finished epoch"
    assert not (tmp_path / "b" / "out" / "model_0.pth").exists()
    monkeypatch.undo()
    loaded = train_loads(monkeypatch)
    assert train.main(["--config", cfg_b, *QUIET, "--resume", str(tmp_path / "b" / "out" / "checkpoint.pth")]) == 0
    # The resumed run loaded exactly the images of batches 3..5 of the same epoch order, no others.
    assert loaded == straight_loads[3:] and len(straight_loads) - len(loaded) == 3
    a, b = _ckpt(tmp_path / "a" / "out"), _ckpt(tmp_path / "b" / "out")
    assert a["state"]["iteration"] == b["state"]["iteration"] == 6 and "in_epoch" not in b
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # The epoch means are over all 6 steps in both runs (the meter's partial sums were restored).
    ev_a, ev_b = records(tmp_path / "a" / "out", "eval")[-1], records(tmp_path / "b" / "out", "eval")[-1]
    assert ev_a["train_loss"] == ev_b["train_loss"] and ev_a["bbox_AP"] == ev_b["bbox_AP"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_stop_signal_exits_nonzero_with_the_resume_line(tmp_path, data_root, monkeypatch, capsys, sig, code):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    _signal_at(monkeypatch, 1, sig)
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=3)
    assert train.cli(["--config", cfg, *QUIET]) == code  # no KeyboardInterrupt for SIGINT
    path = os.path.abspath(tmp_path / "out" / "checkpoint.pth")
    out = capsys.readouterr().out
    assert (
        f"stopped by {sig.name} at epoch 0, iteration 2/3 of the epoch (2 in all): saved {path}; "
        f"to resume, run the same command with --resume {path}"
    ) in out
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    ckpt = training_checkpoint.load_training_checkpoint(path)
    assert ckpt["in_epoch"]["iteration"] == 2
    (stopped,) = records(tmp_path / "out", "stopped")
    assert stopped["reason"] == sig.name and stopped["checkpoint"] == path


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,code,start", [(signal.SIGINT, 130, "spawn"), (signal.SIGUSR1, 138, "fork")], ids=["ctrl-c", "slurm-signal"]
)
def test_signal_to_the_process_group_stops_without_traceback(tmp_path, data_root, sig, code, start):
    cfg = tiny_config(tmp_path, data_root, epochs=50)
    # Two loader workers: Ctrl-C and SLURM's --signal reach every process, the workers must outlive it
    # (SIGUSR1's default action would kill them, and torch would raise at once in the main process).
    # Spawned workers start with the default handlers (forked ones inherit the main process's; spawn is
    # macOS's default start method, forkserver Linux's from Python 3.14). Python's own resource tracker,
    # which spawn starts, ignores SIGINT but not SIGUSR1: SIGUSR1 goes with fork here.
    script = tmp_path / "spawned_workers.py"
    script.write_text(
        "import multiprocessing, sys\nimport train\n"
        f"if __name__ == '__main__':\n    multiprocessing.set_start_method({start!r})\n    sys.exit(train.cli())\n"
    )
    cmd = [sys.executable, str(script), "--config", cfg, *QUIET, "-j", "2"]
    proc = subprocess.Popen(
        cmd, env=helpers.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines = []
    for line in proc.stdout:  # wait until both workers delivered a batch, then signal the process group
        lines.append(line)
        if line.startswith("epoch 0 [2/4]"):
            os.killpg(proc.pid, sig)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, "".join(lines) + out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in err and "worker" not in err
    assert f"stopped by {sig.name} at " in out and "--resume " + os.path.abspath(tmp_path / "out") in out
    ckpt = training_checkpoint.load_training_checkpoint(str(tmp_path / "out" / "checkpoint.pth"))
    assert ckpt["state"]["iteration"] >= 2


class _SignalsItself(torch.utils.data.Dataset):
    """Each item sends its worker a stop signal, as a signal to the whole process group would."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        os.kill(os.getpid(), signal.SIGUSR1 if i % 2 == 0 else signal.SIGINT)
        return torch.tensor(i)


@pytest.mark.slow
@pytest.mark.parametrize("ignore", [True, False], ids=["with-init", "torch-default"])
def test_spawned_loader_workers_survive_the_stop_signals(ignore):
    from torch.utils.data import DataLoader

    init = preemption.ignore_stop_signals if ignore else None
    loader = DataLoader(
        _SignalsItself(), batch_size=1, num_workers=1, multiprocessing_context="spawn", worker_init_fn=init
    )
    if ignore:
        assert [int(b) for b in loader] == [0, 1, 2, 3]
    else:  # what the init prevents: SIGUSR1 kills the worker, and torch raises
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            list(loader)


@pytest.mark.slow
def test_checkpoint_every_iters_writes_at_the_period(tmp_path, data_root, monkeypatch):
    real = engine.train_step
    calls = {"n": 0}

    def crash_at_step_3(ctx, images, targets):  # as kill -9 would: no handler, no last save
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        return real(ctx, images, targets)

    monkeypatch.setattr(engine, "train_step", crash_at_step_3)
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(["--config", cfg, *QUIET, "--checkpoint-every-iters", "2"])
    ckpt = training_checkpoint.load_training_checkpoint(str(tmp_path / "out" / "checkpoint.pth"))
    assert ckpt["in_epoch"]["iteration"] == 2 and ckpt["state"]["iteration"] == 2  # at most 2 iterations lost
    assert ckpt["model_settings"]["anchor_sizes"] == [[12], [24], [48], [96]]


def test_checkpoint_every_iters_is_validated(tmp_path, data_root):
    cfg = tiny_config(tmp_path, data_root)
    with raises_naming(train.ConfigError, "training.checkpoint_every_iters", "--checkpoint-every-iters"):
        train.main(["--config", cfg, "--checkpoint-every-iters", "0"])


@pytest.mark.slow
def test_resume_mid_epoch_refuses_another_batch_size(tmp_path, data_root, monkeypatch):
    _signal_at(monkeypatch, 0)
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=3)
    assert train.main(["--config", cfg, *QUIET]) == 143
    monkeypatch.undo()
    resume = str(tmp_path / "out" / "checkpoint.pth")
    with raises_naming(
        train.CheckpointError, f"--resume {resume}", "training.batch_size: 2 -> 4 refused", "iteration 1 of epoch 0",
        one_line=False,
    ):  # fmt: skip
        train.main(["--config", cfg, *QUIET, "--resume", resume, "-b", "4"])


# -- 2 ranks ---------------------------------------------------------------------------------------
_RANK_SCRIPT = """
import os, signal, sys
import engine, train

real, steps = engine.train_step, {"n": 0}

def step(ctx, images, targets):
    if int(os.environ["RANK"]) == 1 and steps["n"] == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # one rank only, as a node-local signal would be
    steps["n"] += 1
    return real(ctx, images, targets)

engine.train_step = step
code = train.cli()
print(f"rank {os.environ['RANK']}: {steps['n']} steps, exit {code}", flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_signal_on_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, data_root):
    script = tmp_path / "run_ranks.py"
    script.write_text(textwrap.dedent(_RANK_SCRIPT))
    cfg = tiny_config(tmp_path, data_root, iters_per_epoch=4, batch_size=1)
    env = helpers.child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd + ["--config", cfg, *QUIET], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode != 0, out[-3000:] + proc.stderr[-3000:]
    # Rank 1 got the signal during step 1; every rank finished that step and stopped there.
    assert "rank 0: 2 steps, exit 138" in out and "rank 1: 2 steps, exit 138" in out, out[-3000:] + proc.stderr[-3000:]
    assert out.count("stopped by SIGUSR1 at epoch 0, iteration 2/4") == 1  # rank 0 alone speaks
    ckpt = training_checkpoint.load_training_checkpoint(str(tmp_path / "out" / "checkpoint.pth"))
    assert ckpt["in_epoch"]["iteration"] == 2 and len(ckpt["rng"]["torch"]) == 2  # both ranks' RNG states
    assert sorted(os.listdir(tmp_path / "out")).count("checkpoint.pth") == 1
    assert not any(n.startswith("model_") for n in os.listdir(tmp_path / "out"))


# -- checkpoints carry the model they trained -----------------------------------------------------
ANCHORS = [[8], [16], [32], [64]]


def _anchor_config(tmp_path, data_root, **model):
    import yaml

    path = tiny_config(tmp_path, data_root, iters_per_epoch=2)
    cfg = yaml.safe_load(open(path))
    cfg["model"].update(model)
    open(path, "w").write(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_trained_anchors_come_back_with_weights_and_test_only(tmp_path, data_root, capsys):
    cfg = _anchor_config(tmp_path, data_root, anchor_sizes=ANCHORS)
    assert train.main(["--config", cfg, *QUIET]) == 0
    trained = records(tmp_path / "out", "eval")[-1]
    weights = str(tmp_path / "out" / "model_0.pth")
    settings = _ckpt(tmp_path / "out", "model_0.pth")["model_settings"]
    assert settings["anchor_sizes"] == ANCHORS and settings["class_names"] == ["square", "circle", "triangle", "star"]
    # A config without model.anchor_sizes: the checkpoint's anchors are restored, the predictions equal.
    plain = tiny_config(tmp_path / "out", data_root)
    capsys.readouterr()
    for flag in ("--weights", "--resume"):
        out_dir = str(tmp_path / f"eval{flag}")
        assert train.main(["--config", plain, *QUIET, "--test-only", flag, weights, "--output-dir", out_dir]) == 0
        (ev,) = records(out_dir, "eval")
        for key in ("bbox_AP", "segm_AP", "dets_per_image", "max_score", "score_p90"):
            assert ev[key] == trained[key], (flag, key)
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"{flag} {weights}: anchors"))
        assert_names(line, "checkpoint", f"sizes {ANCHORS}")
    net, _ = models.build_model(name="maskrcnn_tiny", num_classes=5, weights=weights)
    assert net.rpn.anchor_generator.sizes == tuple(tuple(s) for s in ANCHORS)


@pytest.mark.slow
def test_explicit_values_over_a_checkpoint_are_named_or_refused(tmp_path, data_root, capsys):
    cfg = _anchor_config(tmp_path, data_root, anchor_sizes=ANCHORS)
    assert train.main(["--config", cfg, *QUIET]) == 0
    weights = str(tmp_path / "out" / "model_0.pth")
    other = [[10], [20], [40], [80]]
    given = _anchor_config(tmp_path / "out", data_root, anchor_sizes=other, kwargs={"min_size": 48, "max_size": 64})
    capsys.readouterr()
    args = ["--config", given, *QUIET, "--test-only", "--weights", weights, "--output-dir", str(tmp_path / "e")]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert f"--weights {weights}: min_size: checkpoint [64], given [48] -> [48]" in out
    assert f"--weights {weights}: anchor_sizes: checkpoint {ANCHORS}, given {other} -> {other}" in out
    two_per_map = _anchor_config(tmp_path / "e", data_root, anchor_sizes=[[8, 12], [16, 24], [32, 48], [64, 96]])
    args[1] = two_per_map
    with raises_naming(train.CheckpointError, "anchor_sizes [[8, 12], [16, 24], [32, 48], [64, 96]]", "[6]", "for 3"):
        train.main(args)


def _library_checkpoint(path):
    """A fasterrcnn_resnet50_fpn with 2 anchors per location (torchvision's default gives 3) and other sizes."""
    torch.manual_seed(0)
    gen = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 2.0),) * 5)
    model = tv_lossfix.fasterrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=96,
        rpn_anchor_generator=gen,
        box_score_thresh=0.0,
        rpn_post_nms_top_n_test=50,
        loss_cfg={"roi_head": {"cls_pos_weight": 2.0}},
    )
    settings = tv_lossfix.model_settings(model, ["bg", "a", "b"])
    torch.save({"model": model.state_dict(), "model_settings": settings}, path)
    return model


def test_library_builder_restores_a_checkpoints_model(tmp_path):
    path = str(tmp_path / "trained.pth")
    trained = _library_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelSettingsWarning)  # nothing was given: nothing to name
        rebuilt = tv_lossfix.fasterrcnn_resnet50_fpn(weights=path)
    assert rebuilt.rpn.anchor_generator.aspect_ratios == ((0.5, 2.0),) * 5
    assert rebuilt.transform.min_size == (64,) and rebuilt.rpn._post_nms_top_n["testing"] == 50
    assert tv_lossfix.get_loss_cfg(rebuilt).roi_head.cls_pos_weight == 2.0
    settings = tv_lossfix.model_settings(trained, ["bg", "a", "b"])
    assert tv_lossfix.model_settings(rebuilt, ["bg", "a", "b"]) == settings
    image = [torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(1))]
    trained.eval(), rebuilt.eval()
    with torch.no_grad():
        a, b = trained(image)[0], rebuilt(image)[0]
    assert a["boxes"].shape[0] > 0 and all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    with pytest.warns(ModelSettingsWarning, match=r"min_size: checkpoint \[64\], given \[80\] -> \[80\]"):
        given = tv_lossfix.fasterrcnn_resnet50_fpn(weights=path, min_size=80)
    assert given.transform.min_size == (80,)
    three = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    with raises_naming(tv_lossfix.checkpoint.CheckpointError, "rpn_anchor_generator", "gives 3", path, "for 2"):
        tv_lossfix.fasterrcnn_resnet50_fpn(weights=path, rpn_anchor_generator=three)


def test_builder_keyword_wins_over_the_checkpoints_loss_cfg_sampler_key(tmp_path):
    torch.manual_seed(0)
    trained = tv_lossfix.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, loss_cfg={"roi_head": {"num": 256, "neg_pos_ub": 3}}
    )
    path = str(tmp_path / "sampler.pth")
    torch.save({"model": trained.state_dict(), "model_settings": tv_lossfix.model_settings(trained)}, path)
    with pytest.warns(ModelSettingsWarning) as record:
        given = tv_lossfix.fasterrcnn_resnet50_fpn(weights=path, box_batch_size_per_image=512)
    # The keyword wins over the checkpoint's roi_head.num (which the user never gave): named once, not refused.
    assert len(record) == 1
    assert_names(record[0].message, "box_batch_size_per_image", "checkpoint 256", "given 512 -> 512", one_line=True)
    assert record[0].filename == __file__  # the warning points at the builder call
    assert given.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    cfg = tv_lossfix.get_loss_cfg(given).roi_head
    assert (cfg.num, cfg.neg_pos_ub) == (None, 3)  # the rest of the checkpoint's loss config is kept
    assert tv_lossfix.fasterrcnn_resnet50_fpn(weights=path).roi_heads.fg_bg_sampler.batch_size_per_image == 256
    # A loss_cfg given with the same keyword is the user's own contradiction: refused naming both.
    with raises_naming(tv_lossfix.LossConfigError, "box_batch_size_per_image=512", "roi_head.num=128"):
        tv_lossfix.fasterrcnn_resnet50_fpn(
            weights=path, box_batch_size_per_image=512, loss_cfg={"roi_head": {"num": 128}}
        )


def test_apply_model_settings_names_and_refuses():
    from helpers import tiny_model

    trained = tiny_model("faster")
    trained.transform.min_size = (48,)
    settings = {**tv_lossfix.model_settings(trained), "rpn_fg_iou_thresh": 0.6, "box_batch_size_per_image": 32}
    fresh = tiny_model("faster")
    lines = tv_lossfix.apply_model_settings(fresh, settings, explicit={"box_score_thresh": 0.3})
    assert "min_size: [64] -> [48]" in lines and "box_score_thresh: checkpoint 0.05, given 0.3 -> 0.3" in lines
    assert fresh.transform.min_size == (48,) and fresh.roi_heads.score_thresh == 0.3
    matcher = fresh.rpn.proposal_matcher  # a new Matcher, the RPN's low-quality rule kept
    assert (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches) == (0.6, 0.3, True)
    assert fresh.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    assert tv_lossfix.model_settings(fresh) == {**settings, "box_score_thresh": 0.3}
    with raises_naming(tv_lossfix.checkpoint.CheckpointError, "aspect_ratios [[0.5, 2.0]]", "[6]", "for 9"):
        tv_lossfix.apply_model_settings(fresh, settings, explicit={"aspect_ratios": [[0.5, 2.0]]})
    with raises_naming(tv_lossfix.checkpoint.CheckpointError, "model_settings", "unknown", "min_sizes"):
        tv_lossfix.apply_model_settings(fresh, {"min_sizes": [1]})


# -- --weights checks before the data ---------------------------------------------------------------
def _missing_data_config(tmp_path, data_root):
    import yaml

    path = tiny_config(tmp_path, data_root)
    cfg = yaml.safe_load(open(path))
    missing = str(tmp_path / "no_such_data")
    del cfg["data"]["shapes"]  # the demo's knobs: refused with another dataset
    cfg["data"].update(
        dataset="coco_json",
        train_ann=f"{missing}/train.json",
        train_images=missing,
        val_ann=f"{missing}/val.json",
        val_images=missing,
    )
    open(path, "w").write(yaml.safe_dump(cfg))
    return path


def test_weights_of_another_model_fail_before_the_data(tmp_path, data_root):
    cfg = _missing_data_config(tmp_path, data_root)
    named = tmp_path / "faster.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"model": {"name": "fasterrcnn_resnet50_fpn"}}}, named)
    with raises_naming(models.ModelError, f"--weights {named}", "fasterrcnn_resnet50_fpn", "--model maskrcnn_tiny"):
        train.main(["--config", cfg, "--weights", str(named)])
    from helpers import tiny_model

    bare = tmp_path / "bare.pth"
    torch.save(tiny_model("faster").state_dict(), bare)
    with raises_naming(models.ModelError, f"--weights {bare}", "maskrcnn_tiny"):
        train.main(["--config", cfg, "--weights", str(bare)])
    assert not (tmp_path / "out").exists()  # stopped before the run made its output folder
    with pytest.raises(checks.DataError):  # the same config does reach the (missing) data without --weights
        train.main(["--config", cfg])


def test_weights_of_a_folder(tmp_path, data_root):
    cfg = _missing_data_config(tmp_path, data_root)
    # One check (tv_lossfix.checkpoint.check_checkpoint_file) behind both entry points, named by each.
    with raises_naming(train.CheckpointError, f"--weights: {tmp_path}", "folder") as e:
        train.main(["--config", cfg, "--weights", str(tmp_path)])
    assert str(e.value).startswith("--weights: ")
    with raises_naming(tv_lossfix.checkpoint.CheckpointError, f"weights: {tmp_path}", "folder") as e:
        tv_lossfix.fasterrcnn_resnet50_fpn(weights=str(tmp_path))
    assert str(e.value).startswith("weights: ")
