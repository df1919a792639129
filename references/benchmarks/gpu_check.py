r"""The CUDA check: everything CUDA-specific in one run, with one summary file.

    bash references/gpu_check.sh                  # one CUDA GPU, under 8 minutes
    python references/benchmarks/gpu_check.py --device cpu --tiny   # its CPU parts (the test suite runs this)

Checks, each PASS / FAIL / SKIP with its numbers in gpu_check.json:
  amp_step      one step of Mask R-CNN R50-FPN with GradScaler: the logged grad_norm is the unscaled one
                (within 2x of the float32 step's, where a scaled one is ~65536x)
  amp_train     references/train.py --amp --clip-grad-norm on the shapes demo with torchvision's R50-FPN
                Mask R-CNN at reduced size: every logged loss finite, amp_overflows counted, grad_norm sane
  loss_syncs    every loss option through the pure loss functions under set_sync_debug_mode("error"), and
                through both heads under "warn" with each reported sync attributed to the file that made it
                (ours must be none but the RPN's one documented nonzero; torchvision's sampler is named)
  ddp_sync_bn   a 1-process nccl DDP training run with --sync-bn through references/train.py
  benchmark     references/benchmarks/benchmark.py --quick on this device (ratios against stock, memory)
Exits 1 if any check fails, naming it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REFS = os.path.dirname(HERE)
sys.path.insert(0, REFS)

import torch  # noqa: E402
from torchvision.models import detection as tvdet  # noqa: E402

import tv_lossfix  # noqa: E402
from tv_lossfix import losses as L  # noqa: E402

ALL_OPTIONS = {
    "rpn_head": {
        "cls_pos_weight": 2.0,
        "loss_cls_weight": 1.5,
        "loss_bbox_weight": 0.5,
        "cls_avg_factor": "sampled_per_image",
        "bbox_avg_factor": "positive",
        "bbox_loss": "giou",
    },
    "roi_head": {
        "cls_pos_weight": 3.0,
        "class_weight": [0.5, 1.0, 2.0, 1.0, 1.0],
        "loss_cls_weight": 2.0,
        "loss_bbox_weight": 0.5,
        "loss_mask_weight": 0.5,
        "bbox_avg_factor": "positive",
        "bbox_loss": "ciou",
    },
}


def _targets(device, n_images: int, size: int, num_classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n_images):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        n = 3
        xy = torch.rand(n, 2, generator=g) * size * 0.5
        wh = 16 + torch.rand(n, 2, generator=g) * size * 0.4
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for j, b in enumerate(boxes.long().tolist()):
            masks[j, b[1] : b[3], b[0] : b[2]] = 1
        targets.append(
            {
                "boxes": boxes.to(device),
                "labels": torch.randint(1, num_classes, (n,), generator=g).to(device),
                "masks": masks.to(device),
            }
        )
    return images, targets


def check_amp_step(device, size: int) -> Dict[str, Any]:
    import step
    from engine import TrainState

    if device.type != "cuda":
        return {"status": "SKIP", "why": "GradScaler needs CUDA"}
    torch.manual_seed(0)
    model = tv_lossfix.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=size, max_size=size
    ).to(device)
    images, targets = _targets(device, 2, size)
    norms = {}
    for name, scaler in (("float32", None), ("amp", torch.amp.GradScaler("cuda"))):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: every step sees the same weights
        ctx = step.StepContext(m, opt, device, scaler)
        # GradScaler starts at 2**16 and backs off on overflow: step until a step is not skipped.
        for attempt in range(30):  # noqa: B007 (reported below)
            torch.manual_seed(1)
            res = step.train_step(ctx, images, targets)
            step.optimizer_step(ctx, res, TrainState())
            if math.isfinite(res.values["grad_norm"]):
                break
        norms[name] = res.values["grad_norm"]
        if scaler is not None:
            norms["loss_scale"], norms["overflowed_steps"] = float(scaler.get_scale()), attempt
    ratio = norms["amp"] / norms["float32"]
    ok = math.isfinite(ratio) and 0.5 < ratio < 2.0
    return {
        "status": "PASS" if ok else "FAIL",
        **norms,
        "ratio": ratio,
        "why": "" if ok else "the logged AMP grad_norm is not the unscaled one",
    }


def _run_train(argv, out_dir) -> Dict[str, Any]:
    import train

    code = train.main(argv + ["--output-dir", out_dir, "--overwrite"])  # the check's own folder, rerun
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {"code": code, "records": recs}


MODEL = "maskrcnn_resnet50_fpn"  # --model; the CPU test of this script uses maskrcnn_tiny


def _train_argv(device, size: int, iters: int, epochs: int, data_root: str, tmp: str):
    """The shapes demo, trained with torchvision's R50-FPN Mask R-CNN at ``size`` px (from scratch)."""
    import yaml

    cfg = {
        "model": {"name": MODEL, "kwargs": {"min_size": size, "max_size": size}},
        "data": {
            "dataset": "shapes",
            "data_path": data_root,
            "workers": 2,
            "aspect_ratio_group_factor": -1,
            "shapes": {"num_train": 96, "num_val": 16, "image_size": 128},
        },
        "training": {
            "device": str(device),
            "batch_size": 4,
            "epochs": epochs,
            "iters_per_epoch": iters,
            "lr": 0.01,
            "lr_steps": [100],
            "warmup_iters": 20,
            "print_freq": 10,
            "plots": False,
            "gallery_images": 0,
        },
    }
    path = os.path.join(tmp, f"gpu_check_{size}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return ["--config", path]


def check_amp_train(device, size: int, iters: int, epochs: int, data_root: str, tmp: str) -> Dict[str, Any]:
    argv = _train_argv(device, size, iters, epochs, data_root, tmp) + ["--clip-grad-norm", "10"]
    if device.type == "cuda":
        argv.append("--amp")
    res = _run_train(argv, os.path.join(tmp, "amp_train"))
    train_recs = [r for r in res["records"] if r.get("type") == "train"]
    evals = [r for r in res["records"] if r.get("type") == "eval"]
    loss_keys = [k for k in train_recs[0] if k.startswith("loss")] if train_recs else []
    finite = all(math.isfinite(r[k]) for r in train_recs for k in loss_keys)
    norms = [r["grad_norm"] for r in train_recs if math.isfinite(r["grad_norm"])]
    overflows = evals[-1].get("amp_overflows", 0) if evals else None
    ok = res["code"] == 0 and finite and bool(norms) and max(norms) < 1e4
    return {
        "status": "PASS" if ok else "FAIL",
        "exit_code": res["code"],
        "losses_finite": finite,
        "amp": "--amp" in argv,
        "amp_overflows": overflows,
        "grad_norm_max": max(norms) if norms else None,
        "steps_logged": len(train_recs),
        "bbox_AP": evals[-1].get("bbox_AP") if evals else None,
        "img_per_s": evals[-1].get("img_per_s") if evals else None,
        "why": "" if ok else "non-finite loss, a scaled grad_norm, or the run failed",
    }


def _attribute(caught) -> Dict[str, int]:
    """Count the reported syncs by the source line that made them."""
    import linecache

    out: Dict[str, int] = {}
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where = w.filename.replace(os.sep, "/")
        key = "tv_lossfix" if "/tv_lossfix/" in where else "torchvision" if "/torchvision/" in where else "other"
        key += f": {os.path.basename(where)}:{w.lineno}: {linecache.getline(w.filename, w.lineno).strip()}"
        out[key] = out.get(key, 0) + 1
    return out


# Syncs of ours that stock makes too: the mask/keypoint branch selects the positive RoIs of each image
# (a data-dependent shape; stock: torch.where(labels[img_id] > 0) in RoIHeads.forward), and the RPN
# loss's one nonzero over the sampled anchors (stock makes two there, and one more in fastrcnn_loss).
EXPECTED_OURS = {"rpn.py": ("torch.where(pos | neg)", 1), "roi_heads.py": ("torch.where(lab > 0)", 2)}


def _syncs(fn: Callable[[], Any]) -> Dict[str, int]:
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return _attribute(caught)


def check_loss_syncs(device) -> Dict[str, Any]:
    if device.type != "cuda":
        return {"status": "SKIP", "why": "set_sync_debug_mode is CUDA-only"}
    g = torch.Generator().manual_seed(0)
    n = 4096
    is_pos = (torch.rand(n, generator=g) < 0.25).to(device)
    pred, target = torch.randn(n, 4, generator=g).to(device), torch.randn(n, 4, generator=g).to(device)
    ref = torch.tensor([[10.0, 10.0, 60.0, 80.0]]).repeat(n, 1).to(device)
    logits, labels = torch.randn(n, 5, generator=g).to(device), torch.randint(0, 5, (n,), generator=g).to(device)
    cw = torch.tensor([0.5, 1.0, 2.0, 1.0, 1.0], device=device)
    pure = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        avg = L.count(is_pos)
        w = L.sample_weights(is_pos, 2.0, labels, cw)
        pure.append(L.classification_loss(logits, labels, avg, w))
        pure.append(
            L.objectness_loss(
                logits[:, 0],
                is_pos,
                L.per_image_count(is_pos.view(4, -1), ~is_pos.view(4, -1)),
                L.sample_weights(is_pos, 2.0),
            )
        )
        for kind in ("smooth_l1", "l1", "giou", "diou", "ciou"):
            pure.append(L.box_regression_loss(pred, target, is_pos, avg, kind, 1 / 9, ref, (10.0, 10.0, 5.0, 5.0)))
        pure.append(
            L.mask_loss(torch.randn(64, 5, 28, 28, device=device), labels[:64], torch.rand(64, 28, 28, device=device))
        )
        pure += _long_tail_losses(logits, labels, avg, w)
        pure_error = ""
    except RuntimeError as e:
        pure_error = f"{e} at {traceback.format_exc().splitlines()[-3].strip()}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    heads = _head_syncs(device)
    ours = {k: v for h in heads.values() for k, v in h.items() if k.startswith("tv_lossfix")}
    unexpected = {
        k: v
        for k, v in ours.items()
        if not any(f in k and code in k and v <= n for f, (code, n) in EXPECTED_OURS.items())
    }
    ok = not pure_error and not unexpected
    totals = {name: sum(h.values()) for name, h in heads.items()}
    why = "" if ok else f"unexpected syncs in tv_lossfix: {unexpected} {pure_error}"
    return {
        "status": "PASS" if ok else "FAIL",
        "pure_losses_error": pure_error,
        "heads": heads,
        "totals": totals,
        "unexpected": unexpected,
        "why": why,
    }


def _long_tail_losses(logits, labels, avg, w) -> List[torch.Tensor]:
    """Each long-tail criterion's loss (with its statistics update), OHEM ranking and inference scores."""
    out = []
    for name, extra in (
        ("sigmoid", {}),
        ("federated", {"fed_image_counts": [10, 5, 2, 1]}),
        ("seesaw", {}),
        ("eqlv2", {}),
    ):
        settings = tv_lossfix.RoILossConfig(cls_loss=name, **extra).to_dict()
        crit = tv_lossfix.cls_losses.build_criterion("roi_head", settings, logits.shape[1]).to(logits.device)
        x = torch.cat([logits, logits[:, :1]], 1) if name == "seesaw" else logits
        out += [crit(x, labels, avg, w), crit.ranking(x, labels).sum(), crit.scores(x).sum()]
    return out


def _head_syncs(device) -> Dict[str, Dict[str, int]]:
    torch.manual_seed(0)
    stock = tvdet.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=320, max_size=320
    ).to(device)
    ours = tv_lossfix.patch_model(copy.deepcopy(stock), ALL_OPTIONS)
    images, targets = _targets(device, 2, 320)
    out = {}
    for name, model in (("stock", stock), ("tv_lossfix all options", ours)):
        model.train()
        out[name] = _syncs(lambda m=model: m(images, targets))
    return out


def check_ddp_sync_bn(device, size: int, data_root: str, tmp: str) -> Dict[str, Any]:
    if device.type != "cuda":
        return {"status": "SKIP", "why": "nccl and SyncBatchNorm need CUDA"}
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)  # train.main joins it and tears it down
    argv = _train_argv(device, size, 10, 1, data_root, tmp) + ["--sync-bn", "--clip-grad-norm", "10"]
    res = _run_train(argv, os.path.join(tmp, "ddp"))
    train_recs = [r for r in res["records"] if r.get("type") == "train"]
    ok = res["code"] == 0 and bool(train_recs) and all(math.isfinite(r["loss"]) for r in train_recs)
    if dist.is_initialized():
        dist.destroy_process_group()
    return {
        "status": "PASS" if ok else "FAIL",
        "exit_code": res["code"],
        "steps_logged": len(train_recs),
        "why": "" if ok else "the nccl / SyncBN run failed",
    }


def check_benchmark(device, tmp: str, tiny: bool) -> Dict[str, Any]:
    out = os.path.join(tmp, "benchmark.json")
    cmd = [sys.executable, os.path.join(HERE, "benchmark.py"), "--quick", "--device", str(device), "--out", out]
    if tiny:
        cmd += ["--skip", "losses", "step", "train_script"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    figures = json.load(open(out)) if os.path.exists(out) else {}
    return {
        "status": "PASS" if proc.returncode == 0 else "FAIL",
        "figures": figures,
        "output_tail": proc.stdout[-3000:] + proc.stderr[-2000:],
        "why": "" if proc.returncode == 0 else "exit",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the smallest sizes (the CPU test of this script)")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--model", default=MODEL, help="the model the training checks use")
    args = p.parse_args(argv)
    globals()["MODEL"] = args.model
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    size, iters, epochs = (128, 3, 1) if args.tiny else (384, 100, 2)
    summary: Dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_root = os.path.join(tmp, "data")
        checks = {
            "amp_step": lambda: check_amp_step(device, size),
            "amp_train": lambda: check_amp_train(device, size, iters, epochs, data_root, tmp),
            "loss_syncs": lambda: check_loss_syncs(device),
            "ddp_sync_bn": lambda: check_ddp_sync_bn(device, size, data_root, tmp),
            "benchmark": lambda: check_benchmark(device, tmp, args.tiny),
        }
        for name, fn in checks.items():
            if args.only and name not in args.only:
                continue
            t0 = time.time()
            try:
                summary[name] = fn()
            except Exception as e:  # a check that crashes is a failed check, and the others still run
                summary[name] = {
                    "status": "FAIL",
                    "why": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc()[-3000:],
                }
            summary[name]["seconds"] = round(time.time() - t0, 1)
            print(
                f"{name}: {summary[name]['status']} ({summary[name]['seconds']} s) {summary[name].get('why', '')}",
                flush=True,
            )
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    failed = [k for k, v in summary.items() if isinstance(v, dict) and v.get("status") == "FAIL"]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed or skipped", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
