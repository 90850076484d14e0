"""Train MPVG models with plain DDP: CIFAR-100, ImageNet (any ImageFolder) or a built-in task.

    python train.py --data synthetic --dim 64 --depth 4                # one process: a CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet \
        --model deit_small --pe mpvg                                   # the paper's Table 1 recipe
    python train.py --resume auto --output-dir runs/default            # go on where a run stopped
    python train.py --eval-only --resume runs/default/best.pt          # top-1 / top-5 of a checkpoint

run() tells the story: the flags (a resume's from its checkpoint); the processes; the data; the model, its
weights and their EMA; an evaluation, or the optimiser and the epochs, each saved whole. What every program
needs lives in training/: flags.py (every flag and recipe value: --help), data.py, engine.py (the model,
the step, the epoch, the evaluation), checkpoint.py (saving, reading, resuming, interrupts).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from training import checkpoint, data, engine, flags, say
from training.mixing import Mixing

MASTER = os.environ.get("RANK", "0") == "0"  # rank 0 of torchrun's processes, or the single process


def run(argv: list[str], rank: int, world: int, where: dict) -> dict:
    args, resumed = flags.parse(argv)
    path, ckpt = resumed or (None, None)
    out = where["out"] = path.parent if path else Path(args.output_dir)
    device = engine.join(args, world)
    cfg = engine.model_config(args, resumed)
    del resumed  # run() alone holds the checkpoint, so that it is freed once applied
    train_set, val_set, described = data.load(args, cfg.img_size, ckpt)
    cfg = replace(cfg, num_classes=len(described["classes"]))
    model, ema = engine.build_model(args, cfg, path, ckpt, device)
    batch = args.batch_size // (world * args.accum_steps)  # each process's, each micro-batch's
    loaders = data.make_loaders(args, train_set, val_set, cfg.img_size, batch, device, rank, world)
    train_loader, val_loader = loaders
    compiled = engine.compile_model(model, args.compile)
    static = batch if args.compile else None  # one shape for the compiled graph
    judged = ema.module if args.eval_ema else compiled  # what evaluation, and so best.pt, reads
    if args.eval_only:
        metrics = engine.evaluate(judged, val_loader, device, static)
        return say(f"{path}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), metrics)

    optimizer, start, history = engine.build_optimizer(model, args, device), 0, []
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history = ckpt["epoch"] + 1, ckpt["history"]
        del ckpt  # applied: its weights and optimizer state are not held for the rest of the run
    if MASTER:
        checkpoint.claim(out, resuming=start > 0)
    params, chance = sum(p.numel() for p in model.parameters()), data.chance(train_set, val_set)
    say(
        f"{args.recipe} recipe, {cfg.pe} ({cfg.pool}), {params:,} parameters, {world} process(es) on "
        f"{device.type}, {len(train_set)} training images; chance: {chance:.2f}%"
    )
    state = dict(model=model, ema=ema, optimizer=optimizer, history=history, data=described, cfg=cfg)
    ddp = (
        DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else compiled
    )
    mixing = Mixing(args.mixup, args.cutmix, cfg.num_classes) if args.mixup > 0 or args.cutmix > 0 else None
    for epoch in range(start, args.epochs):
        torch.manual_seed(data.seed_of(args.seed, epoch, rank))  # dropout, drop path, Mixup: no RNG to keep
        train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = engine.lr_at(epoch, args, group["lr_scale"])
        begin = time.perf_counter()
        loss, rate = engine.train_one_epoch(
            ddp, train_loader, optimizer, mixing, ema, args, epoch, device, world
        )
        metrics = dict(epoch=epoch + 1, train_loss=loss) | engine.evaluate(judged, val_loader, device, static)
        if not math.isfinite(loss := loss + metrics["val_loss"]):
            raise FloatingPointError(f"the loss became {loss} in epoch {epoch + 1}")
        metrics.update(lr=engine.lr_at(epoch, args), images_per_sec=rate, seconds=time.perf_counter() - begin)
        history.append(metrics)  # on every process: each returns the best epoch
        if MASTER:
            checkpoint.save_epoch(out, args, state, epoch)
        say("  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    best = max(history, key=lambda m: m["val_top1"])
    return say(f"best val_top1 {best['val_top1']:.2f} at epoch {best['epoch']}: {out}/best.pt", best)


def main(argv=None):
    """train.py's command line; an interrupt (Ctrl-C, or SIGTERM to the process or its group) ends it with
    exit 130 and one line that says what is saved and the command that goes on; an error, with one line."""
    return checkpoint.command("train.py", run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    main()
