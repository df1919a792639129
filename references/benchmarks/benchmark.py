r"""What tv_lossfix costs against stock torchvision, measured side by side in one process.

    python references/benchmarks/benchmark.py --quick          # < 2 min on a 2-core CPU
    python references/benchmarks/benchmark.py                  # realistic sizes, longer
    python references/benchmarks/benchmark.py --device cuda    # GPU times + sync check

Stock and tv_lossfix run interleaved (A B A B ..., several rounds, medians) on the same weights
and inputs. Sections:
  1. the loss computation alone (forward + backward of RPN loss, box-head loss, mask loss) at
     512 sampled RoIs / 256 anchors per image, 80 classes, batch 2 and 8: stock, tv_lossfix at
     default settings, tv_lossfix with every option on, and the guide's way (per image, per level,
     .item() counts) to show what vectorizing buys;
  2. a full Mask R-CNN R50-FPN training step (forward + backward);
  3. peak memory of that step;
  4. host-sync operations per step (aten::_local_scalar_dense = .item()/float()/bool(), and
     aten::nonzero), counted with torch.profiler; on CUDA also torch.cuda.set_sync_debug_mode;
  5. images/s of references/train.py with tv_lossfix vs --stock on the shapes data;
  and what roi_head.sampler: ohem adds to a tv_lossfix training step (--skip losses step
  train_script runs this part alone).
Targets: loss ratio <= 1.0, step <= 1.02, memory <= 1.01, syncs <= stock, throughput >= 0.98.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # references/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.models import detection as tvdet  # noqa: E402
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss  # noqa: E402

import tv_lossfix  # noqa: E402

NUM_CLASSES = 81  # 80 COCO classes + background
ALL_ON = {
    "rpn_head": {
        "cls_pos_weight": 2.0,
        "loss_cls_weight": 1.5,
        "loss_bbox_weight": 2.0,
        "cls_avg_factor": "sampled_per_image",
        "bbox_avg_factor": "positive",
        "bbox_loss": "giou",
    },
    "roi_head": {
        "cls_pos_weight": 2.0,
        "class_weight": [0.5] + [1.0 + (i % 3) / 2 for i in range(80)],
        "loss_cls_weight": 1.5,
        "loss_bbox_weight": 2.0,
        "loss_mask_weight": 2.0,
        "bbox_avg_factor": "positive",
        "bbox_loss": "giou",
    },
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000


def interleave(variants: Dict[str, Callable[[], None]], rounds: int, device, warmup: int = 1) -> Dict[str, float]:
    """Median milliseconds of each variant, run A B C A B C ... so drift hits all alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


# -- synthetic head inputs at realistic sizes -------------------------------------------------------
def level_sizes(h: int, w: int) -> List[int]:
    # FPN P2..P6, 3 anchors per location (torchvision's R50-FPN).
    return [3 * math.ceil(h / s) * math.ceil(w / s) for s in (4, 8, 16, 32, 64)]


def rpn_inputs(batch: int, h: int, w: int, device, g):
    sizes = level_sizes(h, w)
    a = sum(sizes)
    xy = torch.rand(a, 2, generator=g) * torch.tensor([w, h])
    wh = 8 + torch.rand(a, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + wh], 1).to(device)
    labels, targets = [], []
    for _ in range(batch):
        r = torch.rand(a, generator=g)
        lab = torch.where(r < 0.001, 1.0, torch.where(r < 0.9, 0.0, -1.0))  # few positives, some ignored
        labels.append(lab.to(device))
        targets.append((torch.randn(a, 4, generator=g) * 0.3).to(device))
    obj = torch.randn(batch * a, 1, generator=g).to(device).requires_grad_(True)
    deltas = (torch.randn(batch * a, 4, generator=g) * 0.3).to(device).requires_grad_(True)
    return dict(objectness=obj, deltas=deltas, labels=labels, targets=targets, anchors=[anchors] * batch, sizes=sizes)


def roi_inputs(batch: int, rois: int, device, g):
    n = batch * rois
    labels = []
    for _ in range(batch):
        lab = torch.randint(1, NUM_CLASSES, (rois,), generator=g)
        lab[rois // 4 :] = 0  # 25% positives, torchvision's positive_fraction
        labels.append(lab.to(device))
    xy = torch.rand(n, 2, generator=g) * 400
    props = torch.cat([xy, xy + 16 + torch.rand(n, 2, generator=g) * 200], 1).to(device)
    return dict(
        logits=torch.randn(n, NUM_CLASSES, generator=g).to(device).requires_grad_(True),
        box=(torch.randn(n, NUM_CLASSES * 4, generator=g) * 0.3).to(device).requires_grad_(True),
        labels=labels,
        targets=[(torch.randn(rois, 4, generator=g) * 0.3).to(device) for _ in range(batch)],
        proposals=list(props.split(rois)),
    )


def mask_inputs(batch: int, pos: int, device, g, size: int = 512, n_gt: int = 12):
    boxes, idxs, masks, labels = [], [], [], []
    for _ in range(batch):
        xy = torch.rand(pos, 2, generator=g) * (size - 120)
        boxes.append(torch.cat([xy, xy + 16 + torch.rand(pos, 2, generator=g) * 100], 1).to(device))
        idxs.append(torch.randint(0, n_gt, (pos,), generator=g).to(device))
        masks.append((torch.rand(n_gt, size, size, generator=g) > 0.5).to(torch.uint8).to(device))
        labels.append(torch.randint(1, NUM_CLASSES, (n_gt,), generator=g).to(device))
    logits = torch.randn(batch * pos, NUM_CLASSES, 28, 28, generator=g).to(device).requires_grad_(True)
    return dict(logits=logits, boxes=boxes, idxs=idxs, masks=masks, labels=labels)


# -- the guide's way: per image, per level, .item() counts  -------------------
def guide_rpn_loss(sampler, inp, pos_weight: float = 1.0):
    pos_m, neg_m = sampler(inp["labels"])
    batch, sizes = len(pos_m), inp["sizes"]
    a = sum(sizes)
    total_pos = total_neg = 0
    for b in range(batch):
        for lvl in torch.split(torch.stack([pos_m[b], neg_m[b]]), sizes, dim=1):
            total_pos += lvl[0].sum().item()
            total_neg += lvl[1].sum().item()
    avg = max(total_pos + total_neg, 1.0)
    cls = bbox = inp["objectness"].new_zeros(())
    for b in range(batch):
        scores = inp["objectness"][b * a : (b + 1) * a, 0].split(sizes)
        deltas = inp["deltas"][b * a : (b + 1) * a].split(sizes)
        tgts = inp["targets"][b].split(sizes)
        pos_l, neg_l = pos_m[b].split(sizes), neg_m[b].split(sizes)
        for s, d, t, p, n in zip(scores, deltas, tgts, pos_l, neg_l):
            valid = (p | n).bool()
            if valid.any():
                target = p[valid].float()
                w = torch.ones_like(target)
                w[target == 1] = pos_weight
                cls = cls + F.binary_cross_entropy_with_logits(s[valid], target, weight=w, reduction="sum")
            pb = p.bool()
            if pb.any():
                bbox = bbox + F.smooth_l1_loss(d[pb], t[pb], beta=1 / 9, reduction="sum")
    return cls / (avg + 1e-6), bbox / (max(total_pos, 1.0) + 1e-6)


def guide_roi_loss(inp):
    labels = torch.cat(inp["labels"])
    avg = max(len(labels), 1.0)
    cls = F.cross_entropy(inp["logits"], labels, reduction="sum") / avg
    pos = labels > 0
    num_pos = max(pos.sum().item(), 1.0)
    bbox = inp["logits"].new_zeros(())
    if pos.any():
        idx = torch.where(pos)[0]
        pred = inp["box"].reshape(len(labels), -1, 4)[idx, labels[idx]]
        bbox = F.smooth_l1_loss(pred, torch.cat(inp["targets"])[idx], beta=1 / 9, reduction="sum") / num_pos
    return cls, bbox


# -- sections ------------------------------------------------------------------------------------------
def bench_losses(device, batches, rounds, image_hw, out):
    g = torch.Generator().manual_seed(0)
    stock = tvdet.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device)
    ours = tv_lossfix.patch_model(copy.deepcopy(stock))
    allon = tv_lossfix.patch_model(copy.deepcopy(stock), ALL_ON)
    rows = []
    for batch in batches:
        ri = rpn_inputs(batch, *image_hw, device, g)
        bi = roi_inputs(batch, 512, device, g)
        mi = mask_inputs(batch, 128, device, g)
        tg = [{"masks": m, "labels": lab} for m, lab in zip(mi["masks"], mi["labels"])]

        def run(fn):
            def f():
                torch.manual_seed(0)
                loss = sum(fn())
                loss.backward()

            return f

        sections = {
            "RPN loss": {
                "stock": run(
                    lambda: stock.rpn.compute_loss(ri["objectness"], ri["deltas"], ri["labels"], ri["targets"])
                ),
                "tv_lossfix": run(
                    lambda: ours.rpn.compute_loss(
                        ri["objectness"], ri["deltas"], ri["labels"], ri["targets"], ri["anchors"]
                    )
                ),
                "all options": run(
                    lambda: allon.rpn.compute_loss(
                        ri["objectness"], ri["deltas"], ri["labels"], ri["targets"], ri["anchors"]
                    )
                ),
                "guide-style": run(lambda: guide_rpn_loss(stock.rpn.fg_bg_sampler, ri)),
            },
            "box-head loss": {
                "stock": run(lambda: fastrcnn_loss(bi["logits"], bi["box"], bi["labels"], bi["targets"])),
                "tv_lossfix": run(
                    lambda: ours.roi_heads.box_losses(
                        bi["logits"], bi["box"], bi["labels"], bi["targets"], bi["proposals"]
                    )
                ),
                "all options": run(
                    lambda: allon.roi_heads.box_losses(
                        bi["logits"], bi["box"], bi["labels"], bi["targets"], bi["proposals"]
                    )
                ),
                "guide-style": run(lambda: guide_roi_loss(bi)),
            },
            "mask loss": {
                "stock": run(
                    lambda: (maskrcnn_loss(mi["logits"], mi["boxes"], mi["masks"], mi["labels"], mi["idxs"]),)
                ),
                "tv_lossfix": run(lambda: (ours.roi_heads.mask_losses(mi["logits"], mi["boxes"], mi["idxs"], tg),)),
                "all options": run(lambda: (allon.roi_heads.mask_losses(mi["logits"], mi["boxes"], mi["idxs"], tg),)),
            },
        }
        for name, variants in sections.items():
            ms = interleave(variants, rounds, device)
            row = {"section": name, "batch": batch, **{k: round(v, 3) for k, v in ms.items()}}
            row["ratio"] = round(ms["tv_lossfix"] / ms["stock"], 3)
            row["ratio all options"] = round(ms["all options"] / ms["stock"], 3)
            if "guide-style" in ms:
                row["ratio guide-style"] = round(ms["guide-style"] / ms["stock"], 3)
            rows.append(row)
            print(
                f"  {name:14s} batch {batch}: stock {ms['stock']:8.2f} ms | tv_lossfix {ms['tv_lossfix']:8.2f} ms "
                f"(x{row['ratio']:.3f}) | all options {ms['all options']:8.2f} ms (x{row['ratio all options']:.3f})"
                + (
                    f" | guide-style {ms['guide-style']:8.2f} ms (x{row['ratio guide-style']:.2f})"
                    if "guide-style" in ms
                    else ""
                ),
                flush=True,
            )
    out["losses"] = rows


def _step_models(device, size):
    torch.manual_seed(0)
    stock = tvdet.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size, max_size=size
    ).to(device)
    ours = tv_lossfix.patch_model(copy.deepcopy(stock))
    g = torch.Generator().manual_seed(1)
    images, targets = [], []
    for _ in range(2):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        n = 6
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        boxes = torch.cat([xy, xy + 20 + torch.rand(n, 2, generator=g) * size * 0.3], 1)
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for j, b in enumerate(boxes.long().tolist()):
            masks[j, b[1] : b[3], b[0] : b[2]] = 1
        targets.append(
            {
                "boxes": boxes.to(device),
                "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g).to(device),
                "masks": masks.to(device),
            }
        )
    return stock, ours, images, targets


def _cpu_peak_bytes(prof) -> int:
    """Peak of the running sum of allocations minus frees during the profiled step (CPU).

    The raw kineto events hold every allocation and free with its size; ``prof.events()``
    folds most of them into their ops.
    """
    try:
        raw = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        allocs = sorted((e.start_ns(), e.nbytes()) for e in raw)
    except AttributeError:  # older/newer torch without this API
        allocs = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]")
    running = peak = 0
    for _, nbytes in allocs:
        running += nbytes
        peak = max(peak, running)
    return peak


def _train_step(model, images, targets) -> Callable[[], None]:
    def f():
        model.train()
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        sum(model(images, targets).values()).backward()

    return f


def bench_step(device, size, rounds, out):
    stock, ours, images, targets = _step_models(device, size)

    def step(model):
        return _train_step(model, images, targets)

    ms = interleave({"stock": step(stock), "tv_lossfix": step(ours)}, rounds, device)
    ratio = ms["tv_lossfix"] / ms["stock"]
    print(
        f"  training step (Mask R-CNN R50-FPN, 2 images {size}x{size}): stock {ms['stock']:.1f} ms | "
        f"tv_lossfix {ms['tv_lossfix']:.1f} ms (x{ratio:.3f})",
        flush=True,
    )
    out["step"] = {"size": size, **{k: round(v, 2) for k, v in ms.items()}, "ratio": round(ratio, 4)}

    # Peak memory and host syncs of one step each.
    from torch.profiler import ProfilerActivity, profile

    mem, syncs = {}, {}
    for name, model in (("stock", stock), ("tv_lossfix", ours)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(model)()
            mem[name] = torch.cuda.max_memory_allocated() - base
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts, profile_memory=device.type == "cpu") as prof:
            step(model)()
        events = prof.events()
        syncs[name] = {
            "item": sum(1 for e in events if e.name == "aten::_local_scalar_dense"),
            "nonzero": sum(1 for e in events if e.name == "aten::nonzero"),
        }
        if device.type == "cpu":
            mem[name] = _cpu_peak_bytes(prof)
    mratio = mem["tv_lossfix"] / max(mem["stock"], 1)
    print(
        f"  peak memory of the step: stock {mem['stock'] / 2**20:.1f} MiB | "
        f"tv_lossfix {mem['tv_lossfix'] / 2**20:.1f} MiB "
        f"(x{mratio:.4f})",
        flush=True,
    )
    print(
        f"  host syncs per step: stock {syncs['stock']['item']} .item()-like + {syncs['stock']['nonzero']} nonzero | "
        f"tv_lossfix {syncs['tv_lossfix']['item']} + {syncs['tv_lossfix']['nonzero']}",
        flush=True,
    )
    out["memory"] = {k: v for k, v in mem.items()} | {"ratio": round(mratio, 4)}
    out["syncs"] = syncs


def bench_ohem(device, size, rounds, out):
    """What roi_head.sampler: ohem adds to a training step: the box head also scores every candidate RoI.

    Timed where OHEM acts, the RoI heads' training forward + backward on fixed backbone features
    and proposals (less noisy than whole steps), and put against a whole random-sampler step.
    """
    _, random_sampler, images, targets = _step_models(device, size)
    ohem = tv_lossfix.patch_model(copy.deepcopy(random_sampler), {"roi_head": {"sampler": "ohem"}})
    random_sampler.train()
    with torch.no_grad():
        image_list, tgts = random_sampler.transform(images, targets)
        feats = random_sampler.backbone(image_list.tensors)
        proposals, _ = random_sampler.rpn(image_list, feats, tgts)
    feats = {k: v.requires_grad_() for k, v in feats.items()}  # backward reaches them, as in a step

    def roi_step(model):
        def f():
            model.train()
            torch.manual_seed(0)
            model.zero_grad(set_to_none=True)
            for v in feats.values():
                v.grad = None
            sum(model.roi_heads(feats, proposals, image_list.image_sizes, tgts)[1].values()).backward()

        return f

    ms = interleave({"random": roi_step(random_sampler), "ohem": roi_step(ohem)}, rounds, device)
    step = interleave({"step": _train_step(random_sampler, images, targets)}, rounds, device)["step"]
    ratio, extra = ms["ohem"] / ms["random"], (ms["ohem"] - ms["random"]) / step
    print(
        f"  RoI heads fwd + bwd (Mask R-CNN R50-FPN, 2 images {size}x{size}, {sum(len(p) for p in proposals)} "
        f"proposals): random sampler {ms['random']:.1f} ms | OHEM {ms['ohem']:.1f} ms (x{ratio:.3f}); "
        f"+{100 * extra:.1f}% of a {step:.0f} ms random-sampler step",
        flush=True,
    )
    out["ohem"] = {"size": size, **{k: round(v, 2) for k, v in ms.items()}, "step": round(step, 2)}
    out["ohem"] |= {"ratio": round(ratio, 4), "step_increase": round(extra, 4)}


def bench_sync_debug(device, out):
    """CUDA only: count the syncs torch reports in each loss path (set_sync_debug_mode('warn'))."""
    g = torch.Generator().manual_seed(0)
    stock = tvdet.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES).to(device)
    ours = tv_lossfix.patch_model(copy.deepcopy(stock))
    ri = rpn_inputs(2, 800, 1088, device, g)
    bi = roi_inputs(2, 512, device, g)
    paths = {
        ("RPN loss", "stock"): lambda: stock.rpn.compute_loss(
            ri["objectness"], ri["deltas"], ri["labels"], ri["targets"]
        ),
        ("RPN loss", "tv_lossfix"): lambda: ours.rpn.compute_loss(
            ri["objectness"], ri["deltas"], ri["labels"], ri["targets"], ri["anchors"]
        ),
        ("box-head loss", "stock"): lambda: fastrcnn_loss(bi["logits"], bi["box"], bi["labels"], bi["targets"]),
        ("box-head loss", "tv_lossfix"): lambda: ours.roi_heads.box_losses(
            bi["logits"], bi["box"], bi["labels"], bi["targets"], bi["proposals"]
        ),
    }
    from gpu_check import _syncs  # the same counting as the CUDA check (this folder is on sys.path)

    res = {f"{sec} / {name}": sum(_syncs(fn).values()) for (sec, name), fn in paths.items()}
    for k, v in res.items():
        print(f"  cuda syncs reported, {k}: {v}", flush=True)
    out["cuda_sync_debug"] = res


def bench_train_script(rounds, iters, out):
    import train  # references/train.py, in-process

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.yaml")
    speeds: Dict[str, List[float]] = {"stock": [], "tv_lossfix": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in ("stock", "tv_lossfix"):
                od = os.path.join(tmp, f"{name}{r}")
                argv = [
                    "--config",
                    config,
                    "--epochs",
                    "1",
                    "--iters-per-epoch",
                    str(iters),
                    "--output-dir",
                    od,
                    "--no-plots",
                    "--gallery-images",
                    "0",
                    "--print-freq",
                    str(iters),
                    "--warmup-iters",
                    "0",
                    "--no-data-report",
                ]
                if name == "stock":
                    argv.append("--stock")
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    assert train.main(argv) == 0
                with open(os.path.join(od, "metrics.jsonl")) as f:
                    ev = [json.loads(line) for line in f if '"eval"' in line][-1]
                speeds[name].append(ev["img_per_s"])
    med = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = med["tv_lossfix"] / med["stock"]
    print(
        f"  references/train.py on shapes ({iters} iterations x {rounds} rounds): stock {med['stock']:.2f} img/s | "
        f"tv_lossfix {med['tv_lossfix']:.2f} img/s (x{ratio:.3f})",
        flush=True,
    )
    out["train_script"] = {k: round(v, 3) for k, v in med.items()} | {"ratio": round(ratio, 4), "runs": speeds}


def markdown(out: Dict) -> str:
    """The figures as the README's tables."""
    lines = []
    if "losses" in out:
        lines += [
            "| loss (fwd + bwd) | batch | stock ms | tv_lossfix ms | ratio | all options ratio | guide-style ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in out["losses"]:
            lines.append(
                f"| {r['section']} | {r['batch']} | {r['stock']:.2f} | {r['tv_lossfix']:.2f} | {r['ratio']:.3f} | "
                f"{r['ratio all options']:.3f} | "
                + (f"{r['ratio guide-style']:.2f}" if "ratio guide-style" in r else "—")
                + " |"
            )
        lines.append("")
    if "step" in out:
        st, mem, sy = out["step"], out["memory"], out["syncs"]
        lines += [
            "| full step (Mask R-CNN R50-FPN) | stock | tv_lossfix | ratio |",
            "|---|---|---|---|",
            f"| time, 2 images {st['size']}px | {st['stock']:.0f} ms | {st['tv_lossfix']:.0f} ms | {st['ratio']:.3f} |",
            f"| peak memory | {mem['stock'] / 2**20:.1f} MiB | {mem['tv_lossfix'] / 2**20:.1f} MiB "
            f"| {mem['ratio']:.4f} |",
            f"| host syncs (.item()-like + nonzero) | {sy['stock']['item']} + {sy['stock']['nonzero']} | "
            f"{sy['tv_lossfix']['item']} + {sy['tv_lossfix']['nonzero']} | |",
        ]
    if "train_script" in out:
        ts = out["train_script"]
        lines.append(
            f"| references/train.py throughput (shapes) | {ts['stock']:.2f} img/s | {ts['tv_lossfix']:.2f} img/s "
            f"| {ts['ratio']:.3f} |"
        )
    if "ohem" in out:
        oh = out["ohem"]
        lines += [
            "",
            f"| roi_head.sampler, 2 images {oh['size']}px | random | ohem | ratio |",
            "|---|---|---|---|",
            f"| RoI heads fwd + bwd | {oh['random']:.0f} ms | {oh['ohem']:.0f} ms | {oh['ratio']:.3f} |",
            f"| whole training step | {oh['step']:.0f} ms | +{100 * oh['step_increase']:.1f}% | |",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller images (< 2 min on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--skip", nargs="*", default=[], choices=["losses", "step", "ohem", "train_script"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.time()
    print(
        f"tv_lossfix benchmark on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True
    )
    if "losses" not in args.skip:
        print("1. loss computation alone (forward + backward), median ms:", flush=True)
        hw = (512, 512) if args.quick else (800, 1088)
        bench_losses(device, [2] if args.quick else [2, 8], 5 if args.quick else 15, hw, out)
    if "step" not in args.skip:
        print("2-4. full training step, peak memory, host syncs:", flush=True)
        bench_step(device, 320 if args.quick else (800 if device.type == "cuda" else 512), 3 if args.quick else 7, out)
        if device.type == "cuda":
            bench_sync_debug(device, out)
    if "ohem" not in args.skip:
        print("OHEM: the RoI head's hard-example sampler against the random one:", flush=True)
        bench_ohem(device, 320 if args.quick else (800 if device.type == "cuda" else 512), 3 if args.quick else 7, out)
    if "train_script" not in args.skip:
        print("5. references/train.py throughput:", flush=True)
        bench_train_script(2 if args.quick else 3, 20 if args.quick else 40, out)
    out["seconds"] = round(time.time() - t0, 1)
    print(f"done in {out['seconds']:.0f} s\n\n" + markdown(out), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
