"""Training throughput of every PE mode, and of timm's ViT, side by side: full training steps on data
already on the device, the models taking turns in one process.

    python tools/benchmark.py --model deit_small --batch-size 256 --compile   # the GPU targets
    python tools/benchmark.py --model deit_tiny --batch-size 16 --bench-steps 5 --bench-rounds 3 --bench-warmup 2
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py and mpvg.py, one folder up

import train
from mpvg import PE_MODES, Config, VisionTransformer
from train import (
    RECIPES,
    build_datasets,
    build_optimizer,
    make_loaders,
    model_config,
    train_step,
    use_device_data,
)


def flops_per_image(cfg: Config) -> float:
    """Forward FLOPs of one image, matmuls only (a multiply-add is 2). LayerNorms, softmax and the
    (1, N, D) PE path are left out: they are under 1% here. A training step is 3x this."""
    t, d, hidden = cfg.num_tokens, cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    patches = 2 * cfg.num_patches * d * cfg.in_chans * cfg.patch_size**2
    layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    return patches + cfg.depth * layer + 2 * d * cfg.num_classes


def timm_twin(cfg: Config):
    """timm's VisionTransformer built to the same configuration, or None without timm."""
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return None
    cls = cfg.pool == "cls"
    return TimmViT(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        embed_dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        class_token=cls, global_pool="token" if cls else "avg", fc_norm=False, drop_path_rate=cfg.drop_path,
        attn_drop_rate=cfg.attn_drop,
    )  # fmt: skip


def benchmark(args, device):
    cuda = device.type == "cuda"  # and so bf16 autocast
    base = model_config(args)
    modes = [args.pe] if args.pe else ["default", "lape", "pvg", "mpvg"]
    configs = {
        f"mpvg.py {m}": replace(
            base, pe=m, **{k: PE_MODES[m][k] for k in PE_MODES[m] if getattr(args, k) is None}
        )
        for m in modes
    }
    builders = {name: (lambda c=c: VisionTransformer(c)) for name, c in configs.items()}
    reference = configs[f"mpvg.py {modes[0]}"]  # timm's twin is built like the first row
    twin = timm_twin(reference)
    if twin is not None:
        builders[f"timm ViT ({reference.pool})"] = lambda: twin
    batch = args.batch_size
    img = torch.randn(batch, base.in_chans, base.img_size, base.img_size, device=device)
    target = torch.randint(base.num_classes, (batch,), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    steps, peak_mib, params = {}, {}, {}
    for name, build in builders.items():  # one at a time, so that each peak is its own
        model = build().to(device)
        params[name] = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(model, args, 1e-4, device)
        compiled = torch.compile(model) if args.compile else model

        def step(model=compiled, optimizer=optimizer):  # exactly the training loop's step
            train_step(model, optimizer, img, target, args.smoothing, amp=cuda)

        held = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.bench_warmup):
            step()
        sync()
        peak_mib[name] = (torch.cuda.max_memory_allocated(device) - held) / 2**20 if cuda else None
        steps[name] = step

    seconds = {name: [] for name in steps}
    for _ in range(args.bench_rounds):  # the models take turns, so drifts in clock or heat hit all alike
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.bench_steps):
                step()
            sync()
            seconds[name].append((time.perf_counter() - start) / args.bench_steps)

    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\nbenchmark: {args.model or RECIPES[args.recipe]['model']} ({base.dim}d x {base.depth}), batch {batch}, "
          f"{base.img_size} px, {'bf16' if cuda else 'fp32'} on {device_name}, compile {'on' if args.compile else 'off'}; "
          f"{args.bench_warmup} warm-up, then {args.bench_rounds} rounds of {args.bench_steps} steps, median of rounds")  # fmt: skip
    timm_name = next((n for n in steps if n.startswith("timm")), None)
    rows = {}
    print(
        f"{'model':<22}{'params':>12}{'img/s':>10}{'ms/step':>10}{'peak MiB':>10}{'MFU':>8}{'vs timm':>9}{'vs default':>11}"
    )
    for name in steps:
        ms = sorted(seconds[name])[len(seconds[name]) // 2] * 1e3
        rate = batch / ms * 1e3
        cfg = configs.get(name, reference)
        mfu = 3 * flops_per_image(cfg) * rate / (args.peak_tflops * 1e12) if cuda else None
        rows[name] = dict(
            params=params[name], images_per_sec=rate, ms_per_step=ms, peak_mib=peak_mib[name], mfu=mfu
        )
    for name, r in rows.items():
        vs_timm = f"{r['images_per_sec'] / rows[timm_name]['images_per_sec']:.3f}" if timm_name else "-"
        default = rows.get("mpvg.py default")
        vs_default = f"{r['images_per_sec'] / default['images_per_sec']:.3f}" if default else "-"
        memory = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{name:<22}{r['params']:>12,}{r['images_per_sec']:>10.1f}{r['ms_per_step']:>10.1f}{memory:>10}{mfu:>8}{vs_timm:>9}{vs_default:>11}"
        )
    rows["data loader"] = dict(images_per_sec=time_data_loader(args, base, device))
    return rows


def time_data_loader(args, cfg: Config, device, batches: int = 10) -> float:
    """Images/s that the training loader delivers with the recipe's augmentations, model aside."""
    train_set, val_set, _ = build_datasets(args, cfg.img_size, synthetic_classes=cfg.num_classes)
    loader, _, _ = make_loaders(args, train_set, val_set, cfg.img_size, args.batch_size, device)
    it = iter(loader)
    next(it)  # workers start, or the data set moves to the device
    start, seen = time.perf_counter(), 0
    for _, (img, _) in zip(range(batches), it):
        seen += len(img.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = seen / (time.perf_counter() - start)
    how = "on the device, batched" if use_device_data(args, device) else f"{args.workers} workers"
    print(f"data loader alone: {rate:.0f} img/s ({args.data}, {args.recipe} recipe augmentations, {how})")
    return rate


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=train.HelpFormatter)
    train.add_data_flags(p, default="synthetic")
    train.add_model_flags(p)
    train.add_recipe_flags(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--compile", action="store_true", help="torch.compile every model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bench-steps", type=int, default=10, help="timed steps per model per round")
    g.add_argument("--bench-rounds", type=int, default=3, help="rounds, the models taking turns")
    g.add_argument(
        "--bench-warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    g.add_argument(
        "--peak-tflops", type=float, default=989.4, help="the device's dense bf16 peak, for MFU (H100 SXM)"
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = train.resolve_recipe(build_parser().parse_args(argv))
    args.rank, args.world = 0, 1
    return args


def main(argv=None):
    return benchmark(parse_args(argv), train.pick_device())


if __name__ == "__main__":
    main()
