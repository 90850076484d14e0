"""Train Mask R-CNN on COCO (paper Table 3) or UperNet on ADE20K (Table 4), each on ViT-Adapter-Ti over
mpvg.py's ViT in any PE mode, with the recipes of Tables 8-9 as ViT-Adapter's configs give them.

    python -m dense.train --task coco --data synthetic       # a tiny COCO, written and read: a minute
    python -m dense.train --task ade20k --data synthetic     # a tiny ADE20K alike
    torchrun --standalone --nproc_per_node=8 -m dense.train --task coco --data-path data/coco \\
        --finetune runs/mpvg/best.pt --pe mpvg --output-dir runs/coco-mpvg       # Table 3's recipe
    python -m dense.train --task coco --resume auto --output-dir runs/coco-mpvg  # go on where it stopped
    python -m dense.train --task coco --eval-only --resume runs/coco-mpvg/best.pt   # its box and mask AP

A run is a number of optimizer steps (coco: --epochs of its data; ade20k: --iters), evaluated and saved every
--eval-every steps (coco: each epoch). run() tells the story; training/ keeps the checkpoints whole, reads a
resume by its rules, and turns an interrupt or an error into one line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import mpvg
from dense import data, detection, evaluate, segmentation
from dense.adapter import build_adapter, load_backbone
from training import UserError, checkpoint, engine, flags, say
from training.data import seed_of
from training.flags import COUNT, FRACTION, LR, NATURAL, NON_NEGATIVE, RATE, SEED, Parser, boolean, path

MASTER = os.environ.get("RANK", "0") == "0"  # rank 0 of torchrun's processes, or the single process
RECIPES = {  # Table 8 (ViT-Adapter's mask_rcnn_deit_adapter_tiny_fpn_3x_coco.py, MMDetection's schedule_3x)
    "coco": dict(
        model="mask_rcnn",
        output_dir="runs/coco",
        data_path="data/coco",
        epochs=36,
        iters=None,
        eval_every=None,
        batch_size=8,  # Table 8's (the paper's 4 GPUs x 2 images; ViT-Adapter's config: 8 x 2)
        lr=1e-4,
        weight_decay=0.05,
        no_decay="names",
        layer_decay=1.0,
        schedule="step",
        lr_steps=[27, 33],
        warmup_iters=500,
        warmup_ratio=1e-3,
        crop=1024,
        drop_path=0.1,
        window_attn=True,
        add_vit_feature="last",  # the detection code's: the last tokens added to all four levels
    ),  # Table 9 (ViT-Adapter's upernet_deit_adapter_tiny_512_160k_ade20k.py)
    "ade20k": dict(
        model="upernet",
        output_dir="runs/ade20k",
        data_path="data/ade/ADEChallengeData2016",
        epochs=None,
        iters=160_000,
        eval_every=16_000,
        batch_size=8,  # Table 9's (4 GPUs x 2; ViT-Adapter's config: 8 x 2)
        lr=12e-5,
        weight_decay=0.01,
        no_decay="1d",
        layer_decay=0.95,
        schedule="poly",
        lr_steps=[],
        warmup_iters=1500,
        warmup_ratio=1e-6,
        crop=512,
        drop_path=0.1,
        window_attn=False,
        add_vit_feature="each",  # the segmentation code's: interaction i's tokens added to level i
    ),
}
SYNTHETIC = dict(epochs=2, iters=None, eval_every=None, batch_size=2, warmup_iters=4, crop=128)  # CPU: 1
SCORES = {"coco": "box_ap", "ade20k": "miou"}  # what picks best.pt
DEFAULTS = dict(
    data="folder",
    synthetic_size=16,
    pe="mpvg",
    finetune=None,
    dim=192,
    depth=12,
    heads=3,
    head_width=256,
    seed=0,
    resume=None,
    eval_only=False,
    workers=min(8, os.cpu_count() or 1),
    log_every=50,
    accum_steps=1,  # engine.join's: one micro-batch a step
)
MAY_CHANGE = {*"resume eval_only output_dir epochs iters lr data_path workers log_every".split()}
MODEL_FLAGS = "dim depth heads window_attn add_vit_feature head_width crop".split()  # an evaluation's too
CROP = flags.typed(
    int, lambda v: v >= 32 and v % 32 == 0, "a multiple of 32"
)  # the adapter's coarsest stride


def build_parser() -> argparse.ArgumentParser:
    anew = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(MAY_CHANGE - {"resume"}))
    about = f"[...]: the default, or each task's value. A resume keeps every flag but {anew}."
    p = Parser("dense.train", description=about, argument_default=argparse.SUPPRESS, allow_abbrev=False)

    def add(name: str, help: str, **kw):  # the help ends in the default, or in each task's value
        key = name[2:].replace("-", "_")
        shown = "; ".join(f"{t}: {r[key]}" for t, r in RECIPES.items()) if key in RECIPES["coco"] else None
        shown = shown or DEFAULTS.get(key)
        p.add_argument(name, help=f"{help} [{shown}]" if shown is not None else help, **kw)

    add("--task", "coco: Mask R-CNN, box AP; ade20k: UperNet, mIoU", choices=list(RECIPES), required=True)
    tiny = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SYNTHETIC.items())
    add(
        "--data",
        f"folder: --data-path; synthetic: a tiny set of its format ({tiny})",
        choices=["folder", "synthetic"],
    )
    add("--data-path", "the task's standard folder", type=path)
    add("--synthetic-size", "--data synthetic's training images (a quarter as many to score)", type=COUNT)
    add("--pe", "the ViT's PE mode", choices=list(mpvg.PE_MODES))
    add("--finetune", "the ViT's weights: train.py's (of --pe's mode), DeiT's or timm's", type=path)
    add("--dim", "ViT-Adapter-Ti's width (a test's: smaller)", type=COUNT)
    add("--depth", "its blocks", type=COUNT)
    add("--heads", "its attention heads", type=COUNT)
    add("--window-attn", "14 x 14 window attention in 8 of the 12 blocks", type=boolean)
    add("--add-vit-feature", "the ViT's tokens added into the pyramid", choices=["last", "each", "none"])
    add("--drop-path", "the ViT's stochastic depth", type=RATE)
    add("--head-width", "FPN and mask head (box MLP: 4x; UperNet: 2x, its FCN: 1x)", type=COUNT)
    add("--epochs", "the run's length in passes over the training set, unless --iters", type=COUNT)
    add("--iters", "the run's length in optimizer steps", type=COUNT)
    add("--eval-every", "steps between evaluations, each saved (None: an epoch's)", type=COUNT)
    add("--batch-size", "global batch, split over the processes", type=COUNT)
    add("--lr", "peak learning rate", type=LR)
    add("--weight-decay", "AdamW's", type=NON_NEGATIVE)
    add(
        "--no-decay",
        "what AdamW does not decay: names (with level_embed, pos_embed, norm or bias: MMCV's custom_keys, "
        "the detection config) or 1d (every 1-D weight: BEiT's rule, the segmentation config)",
        choices=["names", "1d"],
    )
    add("--layer-decay", "block i's lr x this ** (depth - i), the embeddings' one power more", type=FRACTION)
    add("--warmup-iters", "linear warmup steps", type=NATURAL)
    add("--crop", "training crop side; every resize and window scales with it", type=CROP)
    add("--seed", "initialisation, data order and augmentation", type=SEED)
    add("--output-dir", "the run's checkpoints and metrics.jsonl", type=path)
    add("--resume", "go on with a run: auto (the newest in --output-dir) or PATH", type=path)
    add("--eval-only", "score the --resume checkpoint on the validation set and stop", action="store_true")
    add("--workers", "loader workers per process", type=NATURAL)
    add("--log-every", "steps between progress lines", type=COUNT)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, tuple[Path, dict] | None]:
    """The run's flags: the defaults, the task's recipe (on a resume: the checkpoint's flags), the command
    line's; and on a resume the checkpoint it goes on from, and its path."""
    given = vars(build_parser().parse_args(argv))
    if "finetune" in given and given.get("resume", "auto") != "auto":
        raise UserError("--resume PATH goes on with a run and --finetune starts a new one: give one of them")
    out = Path(given.get("output_dir", RECIPES[given["task"]]["output_dir"]))
    # read as either task's (each step of its history holds "iter"), then refused if of the other task
    resumed = given.get("resume") and checkpoint.resume(
        given, out, MAY_CHANGE | {"task"}, score="iter", model_flags=MODEL_FLAGS
    )
    if resumed:
        path, saved = resumed[0], resumed[1]["args"]
        if (task := saved.get("task")) != given["task"]:
            raise UserError(f"{path} is a checkpoint of --task {task}: give --task {task}")
        if missing := sorted((set(DEFAULTS) | set(RECIPES["coco"])) - set(saved)):
            raise UserError(f"{path}'s flags lack --{missing[0].replace('_', '-')}: an older dense.train's")
        return argparse.Namespace(**saved | given), resumed
    if given.get("eval_only"):
        raise UserError(
            "--eval-only needs a checkpoint: --resume PATH, or --resume auto with one in --output-dir"
        )
    if given.get("resume"):
        say(f"--resume auto: no checkpoint in {out}, starting a new run")
    recipe = RECIPES[given["task"]] | (SYNTHETIC if given.get("data") == "synthetic" else {})
    return argparse.Namespace(**DEFAULTS | recipe | given | dict(resume=None)), None


def param_groups(model, args) -> list[dict]:
    """AdamW's parameter groups. Weight decay as each config's optimizer constructor gives it: --no-decay
    names (MMCV's custom_keys, matched in the parameter's name: LayerScale's and the injectors' gammas and the
    spatial prior's BatchNorm weights decay) or 1d (BEiT's: every 1-D weight exempt; pos_embed and
    level_embed decay, as the rule misses their prefixed names). Layer-wise lr decay as BEiT's and
    ViT-Adapter's (num_layers = depth + 2): the ViT's embeddings are layer 0, its block i layer i + 1, all
    else (adapter, heads) layer depth + 1, and layer k's lr is --lr x layer_decay ** (depth + 1 - k)."""
    vit = next(m for m in model.modules() if isinstance(m, mpvg.VisionTransformer))
    depth, groups = len(vit.blocks), {}
    layer = {p: i + 1 for i, block in enumerate(vit.blocks) for p in block.parameters()}
    layer |= {p: 0 for p in [*vit.patch_embed.parameters(), vit.pos_embed, vit.cls_token] if p is not None}
    for name, p in model.named_parameters():
        if args.no_decay == "names":
            decayed = not any(key in name for key in ("level_embed", "pos_embed", "norm", "bias"))
        else:
            decayed = p.ndim > 1
        k = layer.get(p, depth + 1)
        scales = dict(weight_decay=args.weight_decay * decayed, lr_scale=args.layer_decay ** (depth + 1 - k))
        groups.setdefault((k, decayed), dict(params=[], **scales))["params"].append(p)
    return list(groups.values())


def lr_at(step: int, args, total: int, per_epoch: int) -> float:
    """MMCV's schedules by step: "step" (x 0.1 from each epoch of lr_steps on) or "poly" (power 1, to 0 at the
    last step), each times a linear warmup over --warmup-iters steps from warmup_ratio."""
    if args.schedule == "step":
        lr = args.lr * 0.1 ** sum(step >= epoch * per_epoch for epoch in args.lr_steps)
    else:
        lr = args.lr * (1 - step / total)
    if step < args.warmup_iters:
        lr *= 1 - (1 - step / args.warmup_iters) * (1 - args.warmup_ratio)
    return lr


def to(device, batch):
    """A batch's tensors on the device: a stack (ade20k), or lists of images and of target dicts (coco)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to(device, v) for k, v in batch.items()}
    return [to(device, x) for x in batch]


def train_steps(model, loader, optimizer, args, steps: range, schedule, device, world: int) -> float:
    """The optimizer steps of `steps` (loader: their batches), their mean loss over every process. A bar
    on a terminal, a line every --log-every steps; a loss that is not finite there: FloatingPointError."""
    model.train()
    total, start = torch.zeros((), device=device, dtype=torch.float64), time.perf_counter()
    bar = tqdm(total=len(steps), desc=f"steps to {steps.stop}", leave=False, disable=None if MASTER else True)
    for step, (images, targets) in zip(steps, loader):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step) * group["lr_scale"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = model(to(device, images), to(device, targets))  # the head's losses, weighted
        loss = sum(losses.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total, _ = total + loss.detach(), bar.update()
        if (step + 1) % args.log_every == 0:  # the loop's only waits for the device
            current = engine.all_reduce(loss.detach().clone()).item() / world
            if not math.isfinite(current):
                raise FloatingPointError(f"the loss became {current} at step {step + 1}")
            parts = "  ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
            rate = (step + 1 - steps.start) * args.batch_size / (time.perf_counter() - start)
            if MASTER:
                bar.write(f"step {step + 1}  loss {current:.4f} ({parts})  {rate:.1f} img/s", sys.stdout)
    bar.close()
    return engine.all_reduce(total).item() / (world * len(steps))


TRAINED = (  # the ViT's fields that a checkpoint's model_config sets: its shape and its PE mode's knobs
    *"patch_size in_chans dim depth heads mlp_ratio qkv_bias norm_eps".split(),
    *"pe_input pe_layers pe_hierarchical last_pe pool".split(),
)


def build_model(args, classes: list[str], ckpt: dict | None):
    """The task's model on ViT-Adapter (the same in every process), with the checkpoint's weights, or the
    ViT's from --finetune. The ViT is built as the checkpoint's (or --finetune's) model_config has it, else
    (timm's weights) as the flags say; --dim, --depth and --heads must then agree with it."""
    torch.manual_seed(args.seed)
    weights = checkpoint.read(args.finetune, of_a_run=False) if args.finetune and not ckpt else None
    trained = (ckpt or weights or {}).get("model_config") or {}
    config = dict(dim=args.dim, depth=args.depth, heads=args.heads)
    if any(trained.get(k, v) != v for k, v in config.items()) or trained.get("pe", args.pe) != args.pe:
        asked = " ".join(f"--{k} {trained.get(k, getattr(args, k))}" for k in (*config, "pe"))
        raise UserError(f"--finetune {args.finetune} is a ViT of {asked}: give those")
    config |= {k: trained[k] for k in TRAINED if k in trained}
    try:
        adapter = build_adapter(
            args.pe,
            args.window_attn,
            add_vit_feature=args.add_vit_feature,
            drop_path=args.drop_path,
            **config,
        )
        notes = weights and load_backbone(adapter, weights)
    except ValueError as e:  # a width the deformable heads do not divide; weights of another model
        raise UserError(f"--finetune {args.finetune} {e}" if weights else str(e)) from None
    if weights:
        say(f"--finetune {args.finetune}: loaded" + "".join(f"; {n}" for n in notes))
    if args.task == "coco":
        model = detection.build_mask_rcnn(adapter, len(classes) + 1, args.crop, args.head_width)
    else:
        model = segmentation.Segmenter(adapter, len(classes), 2 * args.head_width, args.head_width)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    return model


def load_data(args, scratch: Path):
    """The task's training and validation sets, class names and COCO API (ade20k: None), read from
    --data-path, or from a tiny set of the task's format written into scratch (--data synthetic)."""
    root = scratch if args.data == "synthetic" else Path(args.data_path)
    if args.data == "synthetic":
        sizes = (args.synthetic_size, max(args.synthetic_size // 4, 1))
        (data.write_coco if args.task == "coco" else data.write_ade20k)(root, sizes, args.crop, args.seed)
    return (data.load_coco if args.task == "coco" else data.load_ade20k)(root, args.crop, args.seed)


def run(argv: list[str], rank: int, world: int, where: dict, scratch: Path) -> dict:
    args, resumed = parse(argv)
    path, ckpt = resumed or (None, None)
    del resumed  # run() alone holds the checkpoint, so that it is freed once applied
    where["keep"] = ("--task", args.task)  # in the command that goes on, from the first moment
    out = where["out"] = path.parent if path else Path(args.output_dir)
    device = engine.join(args, world)
    synced = world > 1 and device.type == "cuda"  # SyncBatchNorm: over every process's images
    if args.task == "ade20k" and not args.eval_only and args.batch_size < 2 * world and not synced:
        raise UserError(
            f"UperNet's pyramid pooling normalises a 1 x 1 map over a process's batch: give --batch-size "
            f"{2 * world} or more"
        )
    train_set, val_set, classes, coco = load_data(args, scratch)
    described = dict(train=len(train_set), val=len(val_set), classes=classes)
    if ckpt and (differ := [k for k in described if ckpt["data"][k] != described[k]]):
        raise UserError(f"the data's {' and '.join(differ)} differ from the checkpoint's: use its data")
    model = build_model(args, classes, ckpt)
    if synced:  # MMCV's SyncBN (torch's is for GPUs)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    kw = dict(num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
    kw |= dict(collate_fn=data.as_lists if args.task == "coco" else None)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), 1, **kw)
    if args.task == "coco":
        evaluate_model = partial(evaluate.evaluate_coco, model, val_loader, device, coco)
    else:
        evaluate_model = partial(evaluate.evaluate_ade20k, model, val_loader, device, len(classes), args.crop)
    if args.eval_only:
        scores = evaluate_model()
        return say(f"{path}: " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()), scores)

    per_epoch, history = len(train_set) // args.batch_size, ckpt["history"] if ckpt else []
    if per_epoch == 0:
        raise UserError(f"{len(train_set)} training images make no step of --batch-size {args.batch_size}")
    total, every = args.iters or args.epochs * per_epoch, args.eval_every or per_epoch
    if (step := history[-1]["iter"] if history else 0) >= total:
        raise UserError(f"nothing to train: the checkpoint holds step {step} of {total}; give more")
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr, fused=device.type == "cuda")
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        del ckpt  # applied: not held for the rest of the run
    if MASTER:
        checkpoint.claim(out, resuming=bool(history))
    batch = args.batch_size // world
    sampler = data.Stream(len(train_set), batch, rank, world, args.seed)
    train_loader = DataLoader(train_set, batch, sampler=sampler, **kw)
    params = sum(p.numel() for p in model.parameters())
    say(
        f"{args.task}: {args.model} on ViT-Adapter ({args.pe}), {params:,} parameters, {world} process(es) "
        f"on {device.type}, {len(train_set)} training images; steps {step + 1}-{total}, {args.batch_size} "
        "images each"
    )
    state = dict(model=model, ema=None, optimizer=optimizer, history=history, data=described)
    state["cfg"] = next(m for m in model.modules() if isinstance(m, mpvg.VisionTransformer)).cfg
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    schedule, score = (lambda s: lr_at(s, args, total, per_epoch)), SCORES[args.task]
    while step < total:  # rounds of steps up to the next multiple of `every`, each evaluated and saved
        steps, begin = range(step, min((step // every + 1) * every, total)), time.perf_counter()
        torch.manual_seed(seed_of(args.seed, step, rank))  # drop path, the heads' sampling: no RNG to keep
        sampler.steps = steps
        loss = train_steps(ddp, train_loader, optimizer, args, steps, schedule, device, world)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} by step {steps.stop}")
        scores, step = evaluate_model(), steps.stop
        history.append(dict(epoch=len(history) + 1, iter=step, train_loss=loss, **scores))
        history[-1].update(lr=schedule(step - 1), seconds=time.perf_counter() - begin)
        if MASTER:
            checkpoint.save_epoch(out, args, state, len(history) - 1, score)
        say("  ".join(f"{k} {v:.4g}" for k, v in history[-1].items()))
    best = max(history, key=lambda m: m[score])
    return say(f"best {score} {best[score]:.2f} at step {best['iter']}: {out}/best.pt", best)


def main(argv=None):
    """The command line; an interrupt (Ctrl-C, or SIGTERM to the process or its group) ends it with exit 130
    and one line that says what is saved and the command that goes on; an error, with one line."""
    if not torch.cuda.is_available():  # DDP's one harmless warning on a CPU: a depthwise convolution's weight
        # gradient whose stride differs from its bucket's on a dimension of size 1, the same layout in memory
        warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides")
    with tempfile.TemporaryDirectory() as scratch:  # where --data synthetic goes
        argv = sys.argv[1:] if argv is None else list(argv)
        return checkpoint.command("-m dense.train", partial(run, scratch=Path(scratch)), argv, "evaluation")


if __name__ == "__main__":
    main()
