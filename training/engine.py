"""What every program does with a model: build it from the flags, its optimiser and schedule, one training
step, one epoch, and the evaluation (DeiT's engine.py and timm's train.py are the anchors)."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import models
from mpvg import Config
from training import UserError, checkpoint, say
from training.checkpoint import MODEL_FLAGS
from training.finetune import load_pretrained

TIMEOUT = timedelta(minutes=5)  # the longest a process waits for another: a hung one, or rank 0's save


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


def model_config(args, resumed: tuple[Path, dict] | None = None) -> Config:
    """The model the flags ask for (the preset, its knobs set by --pe, then the model flags given), or
    the one a resumed checkpoint recorded."""
    if resumed:
        path, saved = resumed[0], dict(resumed[1]["model_config"])
        try:
            return models.config(saved.pop("model"), **saved)
        except (TypeError, ValueError) as e:  # a checkpoint of another mpvg.py
            raise UserError(f"{path}'s model_config does not fit this mpvg.py ({e})") from None
    knobs = dict(pe=args.pe, drop_path=args.drop_path, attn_drop=args.attn_drop)
    knobs |= {k: getattr(args, k) for k in MODEL_FLAGS if hasattr(args, k)}  # the model flags given
    try:
        return models.config(args.model, **knobs)
    except ValueError as e:  # the architecture's own checks, said in one line as for any flag
        raise UserError(str(e)) from None


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
        say(f"--finetune {args.finetune}: loaded" + "".join(f"; {n}" for n in notes))
    if args.eval_ema and not args.model_ema:
        raise UserError("--eval-ema evaluates the EMA of --model-ema: give its decay too")
    if not args.model_ema or (args.eval_only and not args.eval_ema):
        return model, None
    if ckpt and ckpt["ema"] is None:
        raise UserError(f"{path} holds no EMA of the weights: drop --model-ema and --eval-ema")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema), use_buffers=True)
    ema.load_state_dict(ckpt["ema"]) if ckpt else ema.update_parameters(model)
    return model, ema


def build_optimizer(model, args, device: torch.device):
    """AdamW (or SGD with momentum 0.9), no weight decay on biases and norms (all 1-D parameters, as timm's
    optimizer factory), nor on model.no_weight_decay() (DeiT: pos_embed, cls_token) unless
    --decay-pos-embed. Each group's lr_scale: 1 for the head, --backbone-lr for the rest."""
    skip = {n for n, p in model.named_parameters() if p.ndim <= 1}
    skip |= set() if args.decay_pos_embed else model.no_weight_decay()
    named, groups = list(model.named_parameters()), []
    for decayed, head in itertools.product((True, False), (False, True)):
        params = [p for n, p in named if (n not in skip) == decayed and n.startswith("head.") == head]
        scale = 1.0 if head else args.backbone_lr
        groups += (
            [dict(params=params, weight_decay=args.weight_decay * decayed, lr_scale=scale)] if params else []
        )
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr_at(0, args), momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr_at(0, args), eps=1e-8, fused=device.type == "cuda")


def lr_at(epoch: int, args, scale: float = 1.0) -> float:
    """timm's per-epoch cosine schedule, as DeiT and Compact Transformers use it: linear warmup from
    warmup_lr, cosine from the peak to min_lr over epochs - cooldown_epochs (or, with --warmup-prefix as
    Swin's, over the epochs after the warmup), then min_lr. The peak is --lr, scaled by batch /
    --lr-batch-scale unless that is 0 (DeiT: 5e-4 x batch / 512), and by a parameter group's `scale`;
    warmup_lr and min_lr hold for every group alike, as in timm's schedulers and torch's
    CosineAnnealingLR(eta_min) (T2T-ViT's transfer: the head 0.05 and the backbone 5e-4 both to 2e-4)."""
    peak = scale * args.lr * (args.batch_size / args.lr_batch_scale if args.lr_batch_scale else 1)
    start = args.warmup_epochs if args.warmup_prefix else 0  # the cosine's first epoch
    cosine_epochs = args.epochs - args.cooldown_epochs - start
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (peak - args.warmup_lr) / args.warmup_epochs
    if epoch - start >= cosine_epochs:
        return args.min_lr
    return args.min_lr + 0.5 * (peak - args.min_lr) * (
        1 + math.cos(math.pi * (epoch - start) / cosine_epochs)
    )


def compile_model(model, mode: str | None):
    """torch.compile with static shapes (the CUDA graphs of reduce-overhead replay one shape)."""
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False) if mode else model


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, loader, device, batch: int | None = None) -> dict:
    """Loss, top-1 and top-5 over every validation image of every process. With `batch`, a short last batch
    is padded to that size and the padding ignored, so a compiled model sees one shape."""
    model.eval()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, count
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        n = len(target)
        if batch and n < batch:
            img = torch.cat([img, img[:1].expand(batch - n, *img.shape[1:])])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(img)[:n]
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == target[:, None]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        counts = [loss, hits[:, 0].sum(), hits.any(-1).sum(), torch.tensor(n, device=device)]
        sums += torch.stack([c.to(torch.float64) for c in counts])  # all on the device: no sync per batch
    loss, top1, top5, n = all_reduce(sums).tolist()
    return dict(val_loss=loss / max(n, 1), val_top1=100 * top1 / max(n, 1), val_top5=100 * top5 / max(n, 1))


def train_step(model, optimizer, micro_batches, smoothing: float, clip: float = 0.0) -> torch.Tensor:
    """One optimizer step over one or more micro-batches [(img, target)]: the gradient of their mean loss,
    exactly as one batch of them all (no BatchNorm here); DDP syncs gradients on the last one only.
    Targets are class ids (B,) or Mixup's soft targets (B, C): cross_entropy smooths either as timm."""
    total = 0.0
    for i, (img, target) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=img.is_cuda):  # bf16 on a GPU
                logits = model(img)
            logits = logits.float() if img.is_cuda else logits  # the loss in float32 at least
            loss = F.cross_entropy(logits, target, label_smoothing=smoothing) / len(micro_batches)
            loss.backward()
        total = total + loss.detach()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train_one_epoch(model, loader, optimizer, mixing, ema, args, epoch: int, device, world: int):
    """One epoch (the EMA, if any, updated after each step); returns its mean training loss over every
    process, and images per second. On a terminal a bar shows the epoch's progress and time left; a line
    every --log-every steps, anywhere. A loss that is not finite at such a line: FloatingPointError."""
    model.train()
    loss_sum, seen, start = torch.zeros((), device=device, dtype=torch.float64), 0, time.perf_counter()
    batches, step, steps = [], 0, len(loader) // args.accum_steps
    master = os.environ.get("RANK", "0") == "0"
    bar = tqdm(
        total=steps, desc=f"epoch {epoch + 1}", leave=False, disable=None if master else True
    )  # on a terminal
    for img, target in loader:
        img, target = img.to(device, non_blocking=True), target.to(device, non_blocking=True)
        batches.append((img, target))
        if len(batches) < args.accum_steps:
            continue
        img, target = (torch.cat(t) for t in zip(*batches))  # the step's batch, mixed whole as without accum
        img, target = mixing(img, target) if mixing else (img, target)
        batches = list(zip(img.chunk(args.accum_steps), target.chunk(args.accum_steps)))
        loss, n = train_step(model, optimizer, batches, args.smoothing, args.clip_grad), len(img)
        if ema:
            ema.update_parameters(model)
        loss_sum, seen, batches, step = loss_sum + loss * n, seen + n * world, [], step + 1
        bar.update()
        if step % args.log_every == 0:  # the loop's only waits for the device
            current = all_reduce(loss.clone()).item() / world
            if not math.isfinite(current):
                raise FloatingPointError(f"the loss became {current} in epoch {epoch + 1}, step {step}")
            if master:
                rate = seen / (time.perf_counter() - start)
                bar.write(
                    f"epoch {epoch + 1} step {step}/{steps}  loss {current:.4f}  {rate:.0f} img/s", sys.stdout
                )
    bar.close()
    count = torch.tensor(seen / world, device=device, dtype=torch.float64)
    total = all_reduce(torch.stack([loss_sum, count]))
    return (total[0] / total[1].clamp(min=1)).item(), seen / (time.perf_counter() - start)
