r"""The step-time cost of the scale cure: maskrcnn_tiny training steps at each input size, side by side.

    python references/benchmarks/scale_cost.py --sizes 128 224 [--rounds 15] [--num-threads 2]

The models (same seed) train on the same batches of 4 noisy 160 px images with 1-4 objects of
4-10 px each (the ``small`` set's kind; masks too), resized by each model's own transform to its
min_size / max_size. Steps alternate between the sizes round by round (so the machine's drift falls
on all of them alike); after 3 warm-up rounds the median of ``--rounds`` steps is printed per size,
with its ratio to the first size and the input-pixel ratio the data report states.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # references/

import torch  # noqa: E402

from models import maskrcnn_tiny  # noqa: E402


def batch(seed: int, n: int = 4, size: int = 160):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g))
        k = int(torch.randint(1, 5, (1,), generator=g))
        wh = 4 + 6 * torch.rand(k, 2, generator=g)
        xy = torch.rand(k, 2, generator=g) * (size - 11)
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[i, y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (k,), generator=g), "masks": masks})
    return images, targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    models, opts = [], []
    for s in args.sizes:
        torch.manual_seed(0)
        m = maskrcnn_tiny(4, min_size=s, max_size=s).train()
        models.append(m)
        opts.append(torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9))
    times = [[] for _ in args.sizes]
    for r in range(3 + args.rounds):
        images, targets = batch(r)
        for k, (m, opt) in enumerate(zip(models, opts)):
            t0 = time.perf_counter()
            loss = sum(m(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if r >= 3:
                times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times[0])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| min_size = max_size | input pixels vs first | step ms (median) | step time vs first |")
    print("|---|---|---|---|")
    for s, t in zip(args.sizes, times):
        med = statistics.median(t)
        print(f"| {s} | x{(s / args.sizes[0]) ** 2:.2f} | {med * 1000:.0f} | x{med / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
