"""Train MPVG models with plain DDP: CIFAR-100, ImageNet (any ImageFolder) or a built-in task.

    python train.py --data synthetic --dim 64 --depth 4                # one process: a CPU or one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data imagenet --data-path /data/imagenet \
        --model deit_small --pe mpvg                                   # the paper's Table 1 recipe
    python train.py --resume auto --output-dir runs/default            # go on where a run stopped
    python train.py --eval-only --resume runs/default/best.pt          # top-1 / top-5 of a checkpoint

run() tells the story: the flags (a resume's from its checkpoint); the processes; the data; the model, its
weights and their EMA; an evaluation, or the optimiser and the epochs, each saved whole. Each part it calls
is defined above it. What every program needs lives in training/: flags.py (every flag and recipe value:
--help), data.py, engine.py (the step, the epoch, the evaluation), checkpoint.py (saving, reading,
resuming, interrupts).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import models
from training import UserError, checkpoint, flags
from training.data import DataError, build_datasets, chance, make_loaders, seed_of
from training.engine import build_optimizer, compile_model, evaluate, lr_at, model_config, train_one_epoch
from training.finetune import load_pretrained
from training.mixing import Mixing

TIMEOUT = timedelta(minutes=5)  # the longest a process waits for another: a hung one, or rank 0's save
MASTER = os.environ.get("RANK", "0") == "0"  # rank 0 of torchrun's processes, or the single process


def fail(message: str, every_rank: bool = False):
    """A user's error: one line, no traceback, from rank 0 alone unless only this rank met it."""
    raise SystemExit(f"train.py: error: {message}" if every_rank or MASTER else 1)


def say(line: str, result=None):
    """Print a line from rank 0 alone; return result."""
    if MASTER:
        print(line)
    return result


def join(args, world: int) -> torch.device:
    """This process's device, and its place among torchrun's processes (none: a single process)."""
    if args.batch_size % (world * args.accum_steps):
        raise UserError(
            f"--batch-size {args.batch_size} does not split evenly over {world} process(es) x --accum-steps"
        )
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def load_data(args, path: Path | None, ckpt: dict | None):
    """The model's config (the flags', or the checkpoint's), the training and validation sets, and what a
    checkpoint records of them: their sizes and class names (which are the label ids)."""
    try:
        saved = dict(ckpt["model_config"]) if ckpt else {}
        cfg = models.config(saved.pop("model"), **saved) if ckpt else model_config(args)
    except (TypeError, ValueError) as e:  # a checkpoint of another mpvg.py
        raise UserError(f"{path}'s model_config does not fit this mpvg.py ({e})") from None
    train_set, val_set = build_datasets(args, cfg.img_size)
    data = dict(train=len(train_set), val=len(val_set), classes=list(train_set.classes))
    compared = ["classes"] if args.eval_only else list(data)  # an evaluation may take another split
    if ckpt and (differ := [k for k in compared if ckpt["data"][k] != data[k]]):
        raise UserError(
            f"the data's {' and '.join(differ)} differ from the checkpoint's: use the data it trained on"
        )
    return replace(cfg, num_classes=len(data["classes"])), train_set, val_set, data


def build_model(args, cfg, path: Path | None, ckpt: dict | None, device):
    """The model with its first weights: the checkpoint's, --finetune's, or new (the same in every
    process); and the EMA of --model-ema, timm's ModelEmaV2 (BatchNorm's buffers averaged too)."""
    torch.manual_seed(args.seed)
    model = models.ARCHITECTURES[args.model][0](cfg).to(device)
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:  # weights that do not fit their own config: a damaged or hand-edited file
            raise UserError(
                f"{path}'s weights do not fit its model_config ({str(e).strip().splitlines()[-1]})"
            ) from None
    elif args.finetune:
        try:
            notes = load_pretrained(model, checkpoint.read(args.finetune, of_a_run=False))
        except ValueError as e:  # weights of another model
            raise UserError(f"--finetune {args.finetune} {e}") from None
        if MASTER:
            print(f"--finetune {args.finetune}: loaded" + "".join(f"; {n}" for n in notes))
    if args.eval_ema and not args.model_ema:
        raise UserError("--eval-ema evaluates the EMA of --model-ema: give its decay too")
    if not args.model_ema or (args.eval_only and not args.eval_ema):
        return model, None
    if ckpt and ckpt["ema"] is None:
        raise UserError(f"{path} holds no EMA of the weights: drop --model-ema and --eval-ema")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema), use_buffers=True)
    ema.load_state_dict(ckpt["ema"]) if ckpt else ema.update_parameters(model)
    return model, ema


def claim(out: Path, resuming: bool):
    """The run's folder, made and seen to be writable before any training; a new run takes no folder that
    holds a run's files."""
    if not resuming and any((out / name).exists() for name in (*checkpoint.NAMES, "metrics.jsonl")):
        raise UserError(
            f"{out} holds a run's files: continue it with --resume auto, or choose another --output-dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UserError(
            f"cannot write into --output-dir {out} ({e.strerror}): choose a folder you can write"
        ) from None


def save(args, state: dict, epoch: int, metrics: dict, out: Path):
    """The epoch's checkpoint (and best.pt, if its top-1 is the best yet: first, so that checkpoint.pt never
    names a best epoch whose file is not there), then metrics.jsonl, each written whole."""
    history = state["history"]
    is_best = metrics["val_top1"] > max((m["val_top1"] for m in history), default=-1.0)
    history.append(metrics)
    model, ema, optimizer, cfg = state["model"], state["ema"], state["optimizer"], state["cfg"]
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, data=state["data"])
    ckpt |= dict(ema=ema.state_dict() if ema else None, args=vars(args), history=history)
    ckpt |= dict(model_config=dict(model=args.model, **asdict(cfg)))
    for name in ("best.pt", "checkpoint.pt") if is_best else ("checkpoint.pt",):
        checkpoint.save(out / name, ckpt)
    checkpoint.save(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode())


def command(world: int, argv: list[str]) -> str:
    """train.py's command with these flags, on as many processes a node as now."""
    local = os.environ.get("LOCAL_WORLD_SIZE", world)  # the launcher's node flags are the user's to add
    return f"{'python' if world == 1 else f'torchrun --nproc_per_node={local}'} train.py {shlex.join(argv)}"


def go_on(out: Path, world: int) -> str:
    return command(world, ["--resume", "auto", "--output-dir", str(out)])


def interrupted(out: Path | None, argv: list[str], world: int) -> str:
    """What an interrupted run has saved, and the command that goes on from there (or starts it again)."""
    if not (found := out and checkpoint.newest(out)):
        return f"interrupted before its first checkpoint. Start again: {command(world, argv)}"
    return f"interrupted; {found[0]} holds epoch {found[1] + 1}. Go on: {go_on(out, world)}"


def run(argv: list[str], rank: int, world: int, where: dict) -> dict:
    args, resumed = flags.parse(argv)
    path, ckpt = resumed or (None, None)
    del resumed  # run() alone holds the checkpoint, so that it is freed once applied
    out = where["out"] = path.parent if path else Path(args.output_dir)
    device = join(args, world)
    cfg, train_set, val_set, data = load_data(args, path, ckpt)
    model, ema = build_model(args, cfg, path, ckpt, device)
    batch = args.batch_size // (world * args.accum_steps)  # each process's, each micro-batch's
    loaders = make_loaders(args, train_set, val_set, cfg.img_size, batch, device, rank, world)
    train_loader, val_loader = loaders
    compiled = compile_model(model, args.compile)
    static = batch if args.compile else None  # one shape for the compiled graph
    judged = ema.module if args.eval_ema else compiled  # what evaluation, and so best.pt, reads
    if args.eval_only:
        metrics = evaluate(judged, val_loader, device, static)
        return say(f"{path}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), metrics)

    if len(train_loader) < args.accum_steps:
        raise UserError(
            f"{len(train_loader.sampler)} training images a process make no step: lower --batch-size"
        )
    optimizer, start, history = build_optimizer(model, args, device), 0, []
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history = ckpt["epoch"] + 1, ckpt["history"]
        del ckpt  # applied: its weights and optimizer state are not held for the rest of the run
        if start >= args.epochs:
            raise UserError(
                f"nothing to train: the checkpoint holds epoch {start} of --epochs {args.epochs}; give more"
            )
    if MASTER:
        claim(out, resuming=start > 0)
    params, chance_top1 = sum(p.numel() for p in model.parameters()), chance(train_set, val_set)
    say(
        f"{args.recipe} recipe, {cfg.pe} ({cfg.pool}), {params:,} parameters, {world} process(es) on "
        f"{device.type}, {len(train_set)} training images; chance: {chance_top1:.2f}%"
    )
    state = dict(model=model, ema=ema, optimizer=optimizer, history=history, data=data, cfg=cfg)
    ddp = (
        DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else compiled
    )
    mixing = Mixing(args.mixup, args.cutmix, cfg.num_classes) if args.mixup > 0 or args.cutmix > 0 else None
    for epoch in range(start, args.epochs):
        torch.manual_seed(seed_of(args.seed, epoch, rank))  # dropout, drop path, Mixup: no RNG state to keep
        train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args) * group["lr_scale"]
        begin = time.perf_counter()
        loss, rate = train_one_epoch(ddp, train_loader, optimizer, mixing, ema, args, epoch, device, world)
        metrics = dict(epoch=epoch + 1, train_loss=loss) | evaluate(judged, val_loader, device, static)
        if not math.isfinite(loss := loss + metrics["val_loss"]):
            raise FloatingPointError(f"the loss became {loss} in epoch {epoch + 1}")
        metrics.update(lr=lr_at(epoch, args), images_per_sec=rate, seconds=time.perf_counter() - begin)
        if MASTER:
            save(args, state, epoch, metrics, out)
        say("  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    best = max(history, key=lambda m: m["val_top1"])
    return say(f"best val_top1 {best['val_top1']:.2f} at epoch {best['epoch']}: {out}/best.pt", best)


def main(argv=None):
    """Run train.py's command line; an interrupt (Ctrl-C, or SIGTERM to the process or its group) ends it
    with exit 130 and one line that says what is saved and the command that goes on."""
    argv = sys.argv[1:] if argv is None else list(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    where = {}  # the run's folder, once run() knows it: the interrupt line names its newest checkpoint
    with checkpoint.interrupts():
        try:
            return run(argv, int(os.environ.get("RANK", 0)), world, where)
        except KeyboardInterrupt:
            if MASTER:
                print(f"\ntrain.py: {interrupted(where.get('out'), argv, world)}", file=sys.stderr)
            raise SystemExit(130) from None
        except FloatingPointError as e:  # stopped before saving it: the last checkpoint goes on
            lower = f"{go_on(where['out'], world)} --lr LOWER"
            fail(f"{e}; stopped before saving it. Go on from the last checkpoint with a lower lr: {lower}")
        except UserError as e:
            fail(str(e))
        except DataError as e:  # from a loader worker, whose traceback's last line is the error itself
            fail(str(e).strip().splitlines()[-1].split("DataError: ")[-1], every_rank=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
