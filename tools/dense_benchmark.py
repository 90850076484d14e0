"""One training step of each dense head, its time and peak memory, and the share of the plain-PyTorch
deformable attention in it: dense.train's model, optimizer and step (train_steps) on a batch already built,
each head in a process of its own so that each peak is its own.

    python -m tools.dense_benchmark                              # both heads, full width, 256 px, batch 2
    python -m tools.dense_benchmark --size 512 --batch-size 8 --steps 10     # on a GPU

Every dense.train flag may follow (--pe, --window-attn, --head-width, --dim ...). The batch: noise images
of --size x --size, each with three boxes and their masks (coco) or a label map of 150 classes (ade20k). The
deformable attention's share: every call of dense.adapter.deform_attn in a step replayed alone, forward and
backward, on the same inputs, its time over the step's.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dense import adapter as dense_adapter
from dense import train as dense_train
from training import UserError, engine


def rss_mib() -> float:
    """This process's resident memory now (Linux), MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def batch(task: str, size: int, n: int, classes: int, g: torch.Generator):
    """Noise images and their targets as the task's loader gives them."""
    images = torch.randn(n, 3, size, size, generator=g)
    if task == "ade20k":
        return images, torch.randint(classes, (n, size, size), generator=g)
    targets = []
    for _ in range(n):
        xy = torch.randint(size // 2, (3, 2), generator=g)
        boxes = torch.cat([xy, xy + torch.randint(8, size // 2, (3, 2), generator=g)], 1).float()
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append(
            dict(boxes=boxes, labels=torch.randint(1, classes + 1, (3,), generator=g), masks=masks)
        )
    return list(images), targets


def measure(task: str, size: int, steps: int, flags: list[str]) -> dict:
    """The median step time of `steps` after one untimed, the peak memory, and the deformable share."""
    args, _ = dense_train.parse(["--task", task, "--crop", str(size), *flags])
    device = engine.join(args, 1)
    classes = [str(k) for k in range(80 if task == "coco" else 150)]
    model = dense_train.build_model(args, classes, None).to(device)
    optimizer = torch.optim.AdamW(dense_train.param_groups(model, args), lr=args.lr)
    data = batch(task, size, args.batch_size, len(classes), torch.Generator().manual_seed(0))
    built, calls = rss_mib(), []
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def deform_attn(*inputs):  # the real one, its inputs kept for the replay
        calls.append([x.detach() if isinstance(x, torch.Tensor) else x for x in inputs])
        return original(*inputs)

    original, dense_adapter.deform_attn = dense_adapter.deform_attn, deform_attn
    times, shares = [], []
    for step in range(steps + 1):
        calls.clear()
        sync()
        begin = time.perf_counter()
        dense_train.train_steps(
            model, [data], optimizer, args, range(step, step + 1), lambda s: args.lr, device, 1
        )
        sync()
        times.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        for value, shapes, locations, weights in calls:
            grads = [x.clone().requires_grad_() for x in (value, locations, weights)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = original(grads[0], shapes, *grads[1:])
            out.backward(torch.ones_like(out))
        sync()
        shares.append((time.perf_counter() - begin) / times[-1])
    dense_adapter.deform_attn = original
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        memory = dict(peak_mib=round(peak), what="torch.cuda.max_memory_allocated")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        memory = dict(peak_mib=round(peak), above_model_mib=round(peak - built), what="peak resident memory")
    params = sum(p.numel() for p in model.parameters())
    return dict(
        task=task,
        model=args.model,
        parameters=params,
        size=size,
        batch=args.batch_size,
        device=device.type,
        step_s=round(statistics.median(times[1:]), 3),
        deform_share=round(statistics.median(shares[1:]), 3),
        **memory,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools.dense_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["coco", "ade20k"], help="one head (default: both, one process each)")
    p.add_argument("--size", type=int, default=256, help="image side, a multiple of 32 [256]")
    p.add_argument("--batch-size", type=int, default=2, help="images a step [2]")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one untimed [3]")
    return p


def main(argv=None):
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.size % 32 or args.size < 64 or args.batch_size < 1 or args.steps < 1:
        p.error("--size: a multiple of 32, 64 or more; --batch-size and --steps: 1 or more")
    if args.task != "coco" and args.batch_size < 2:
        p.error("--batch-size 2 or more: UperNet's pyramid pooling normalises a 1 x 1 map over the batch")
    if args.task is None:  # each head in a fresh process: its own peak memory
        for task in ("coco", "ade20k"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tools.dense_benchmark",
                    "--task",
                    task,
                    *(sys.argv[1:] if argv is None else argv),
                ],
                check=True,
            )
        return
    torch.manual_seed(0)
    flags = ["--batch-size", str(args.batch_size), "--log-every", str(10**9), *rest]
    try:
        row = measure(args.task, args.size, args.steps, flags)
    except UserError as e:  # a dense.train flag out of its range
        raise SystemExit(f"tools.dense_benchmark: error: {e}") from None
    threads = (
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {torch.get_num_threads()} threads"
    )
    print(json.dumps(row | dict(torch=torch.__version__, threads=threads)))


if __name__ == "__main__":
    main()
