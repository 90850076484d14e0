"""Training throughput of every PE mode, and of timm's ViT, side by side: full training steps on data
already on the device, the models taking turns in one process.

    python tools/benchmark.py --model deit_small --batch-size 256 --compile   # the GPU targets
    python tools/benchmark.py --model deit_tiny --batch-size 16 --bench-steps 5 --bench-rounds 3 --bench-warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train.py and mpvg.py, one folder up

import train
from mpvg import PE_MODES, Config, VisionTransformer
from tools import flags
from tools.device_data import DeviceLoader
from tools.flags import HelpFormatter, boolean, fail, out_of_range
from train import (
    RECIPES,
    build_datasets,
    build_optimizer,
    make_loaders,
    model_config,
    train_step,
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


def base_config(args) -> Config:
    """The preset with the model flags given, as MPVG without --pe (default with --pool cls, which MPVG
    lacks); each row then sets its own mode."""
    pe = args.pe or ("default" if args.pool == "cls" else "mpvg")
    return model_config(argparse.Namespace(**{**vars(args), "pe": pe}))


def configurations(args, base: Config) -> dict:
    """The rows: each PE mode with its own pooling, and default with the other pooling too, so that each
    mode is compared with default pooled alike (--pe or --pool narrow the rows)."""
    pairs = [(args.pe, args.pool)] if args.pe else [
        ("default", "cls"), ("default", "gap"), ("lape", "cls"), ("pvg", "gap"), ("mpvg", "gap"),
    ]  # fmt: skip
    configs = {}
    for mode, pool in pairs:
        pool = args.pool or pool or PE_MODES[mode]["pool"]
        knobs = {k: v for k, v in PE_MODES[mode].items() if getattr(args, k) is None}
        with contextlib.suppress(ValueError):  # e.g. MPVG with --pool cls: no such model
            configs[f"{mode} ({pool})"] = replace(base, **{**knobs, "pe": mode, "pool": pool})
    return configs


def benchmark(args, device):
    cuda = device.type == "cuda"  # and so bf16 autocast
    base = base_config(args)
    loader_rate = time_data_loader(args, base, device)  # first: a data error stops it before any compile
    configs = configurations(args, base)
    builders = {f"mpvg.py {name}": (lambda c=c: VisionTransformer(c)) for name, c in configs.items()}
    for pool in (
        sorted({c.pool for c in configs.values()}) if args.timm else []
    ):  # timm's twin of each pooling
        twin = timm_twin(next(c for c in configs.values() if c.pool == pool))
        if twin is not None:
            builders[f"timm ViT ({pool})"] = lambda twin=twin: twin
    batch = args.batch_size
    img = torch.randn(batch, base.in_chans, base.img_size, base.img_size, device=device)
    target = torch.randint(base.num_classes, (batch,), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    steps, rows = {}, {}
    for name, build in tqdm(builders.items(), desc="warm-up and compile", leave=False, disable=None):
        model = build().to(device)  # one at a time, so that each peak is its own
        optimizer = build_optimizer(model, args, 1e-4, device)
        compiled = train.compile_model(model, args.compile)

        def step(model=compiled, optimizer=optimizer):  # exactly the training loop's step
            train_step(model, optimizer, [(img, target)], args.smoothing, amp=cuda)

        held = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()  # the first step compiles
        sync()
        first = time.perf_counter() - start
        for _ in range(args.bench_warmup - 1):
            step()
        sync()
        peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20 if cuda else None
        params = sum(p.numel() for p in model.parameters())
        rows[name], steps[name] = dict(params=params, peak_mib=peak, first_step_s=first), step

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
          f"{base.img_size} px, {'bf16' if cuda else 'fp32'} on {device_name}, torch {torch.__version__}, "
          f"compile {args.compile or 'off'}; {args.bench_warmup} warm-up, then {args.bench_rounds} rounds of "
          f"{args.bench_steps} steps, median of rounds; vs columns compare models pooled alike")  # fmt: skip
    print(f"{'model':<24}{'params':>12}{'img/s':>10}{'ms/step':>9}{'peak MiB':>9}{'MFU':>7}"
          f"{'1st step s':>11}{'vs timm':>8}{'vs default':>11}")  # fmt: skip
    for name, r in rows.items():
        ms = sorted(seconds[name])[len(seconds[name]) // 2] * 1e3
        twin_of = next(c for c in configs.values() if c.pool == name[-4:-1])  # a timm row's configuration
        cfg = configs.get(name.removeprefix("mpvg.py "), twin_of)
        r.update(ms_per_step=ms, images_per_sec=batch / ms * 1e3)
        r["mfu"] = (
            3 * flops_per_image(cfg) * r["images_per_sec"] / (args.peak_tflops * 1e12) if cuda else None
        )

    def ratio(row: dict, other: str) -> str:
        return f"{row['images_per_sec'] / rows[other]['images_per_sec']:.3f}" if other in rows else "-"

    for name, r in rows.items():
        pool = name[name.rindex("(") :]
        memory = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{name:<24}{r['params']:>12,}{r['images_per_sec']:>10.1f}{r['ms_per_step']:>9.1f}{memory:>9}{mfu:>7}"
              f"{r['first_step_s']:>11.1f}{ratio(r, f'timm ViT {pool}'):>8}{ratio(r, f'mpvg.py default {pool}'):>11}")  # fmt: skip
    if args.profile:
        profile(steps[args.profile], args.profile, cuda)  # a row that parse_args checked exists
    rows["data loader"] = dict(images_per_sec=loader_rate)
    return rows


def profile(step, name: str, cuda: bool, top: int = 12):
    """The kernels (or CPU ops) that take a row's step time, from torch.profiler over 5 steps."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of {name}, 5 steps, top {top} by self time:")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70))


def time_data_loader(args, cfg: Config, device, batches: int = 10) -> float:
    """Images/s that the training loader delivers with the recipe's augmentations, model aside: a
    DataLoader over `batches` batches once its workers run; the device path over a whole epoch (it
    augments a chunk of the epoch at a time)."""
    train_set, val_set, _ = build_datasets(args, cfg.img_size, noise_classes=cfg.num_classes)
    loader, _, _ = make_loaders(args, train_set, val_set, cfg.img_size, args.batch_size, device)
    on_device = isinstance(loader, DeviceLoader)
    if len(loader) < (1 if on_device else 2):  # the first batch starts the workers: a second is timed
        more = ", or raise --synthetic-size" if args.data in ("noise", "synthetic") else ""
        fail(f"--batch-size {args.batch_size} is too large for {len(train_set)} training images (the "
             f"loader's timing needs {1 if on_device else 2} batches): lower it{more}")  # fmt: skip
    it = iter(loader)
    if not on_device:
        next(it)  # the workers start
    start, seen = time.perf_counter(), 0
    for _, (img, _) in zip(range(len(loader) if on_device else batches), it):
        seen += len(img.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = seen / (time.perf_counter() - start)
    how = "on the device, a chunk at a time" if on_device else f"{args.workers} workers"
    print(f"data loader alone: {rate:.0f} img/s ({args.data}, {args.recipe} recipe augmentations, {how})")
    return rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter, allow_abbrev=False
    )
    train.add_data_flags(p, default="noise")
    train.add_model_flags(
        p, unset="the preset's value", pe="default, lape, pvg, mpvg: a row each, default both ways"
    )
    train.add_recipe_flags(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=train.COMPILE_MODES,
                   help="torch.compile every model, in this mode")  # fmt: skip
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bench-steps", type=int, default=10, help="timed steps per model per round")
    g.add_argument("--bench-rounds", type=int, default=3, help="rounds, the models taking turns")
    g.add_argument(
        "--bench-warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    g.add_argument(
        "--peak-tflops", type=float, default=989.4, help="the device's dense bf16 peak, for MFU (H100 SXM)"
    )
    g.add_argument(
        "--timm", type=boolean, default=True, help="time timm's ViT beside ours, where timm imports"
    )
    g.add_argument("--profile", metavar="ROW", default=None,
                   help="print torch.profiler's top kernels of one row, e.g. 'mpvg.py mpvg (gap)'")  # fmt: skip
    g.add_argument("--loader-only", action="store_true", help="time the training data loader alone")
    g.add_argument("--json", metavar="PATH", default=None, help="also write the rows to this file")
    return p


RANGES = {"bench_steps": "[1, inf)", "bench_rounds": "[1, inf)", "bench_warmup": "[1, inf)", "peak_tflops": "(0, inf)"}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    args = train.resolve_recipe(build_parser().parse_args(argv))
    rows = [f"mpvg.py {name}" for name in configurations(args, base_config(args))]
    if args.profile and args.profile not in rows:
        fail(f"--profile names no row: choose one of {', '.join(repr(r) for r in rows)}")
    if problem := out_of_range(args, RANGES):
        fail(problem)
    json_path = Path(args.json or ".")
    if args.json and (json_path.is_dir() or not os.access(json_path.parent, os.W_OK)):
        fail(f"--json {json_path} cannot be written (a folder, or its folder is missing or read-only): "
             f"give a file in a writable folder")  # fmt: skip
    args.rank, args.world, args.accum_steps = 0, 1, 1
    return args


def main(argv=None):
    args, device = parse_args(argv), train.pick_device()
    if args.loader_only:
        rows = {"data loader": dict(images_per_sec=time_data_loader(args, base_config(args), device))}
    else:
        rows = benchmark(args, device)
    if args.json:  # for tools/speed.py, which gathers the Speed section's figures
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        Path(args.json).write_text(
            json.dumps(dict(rows=rows, device=name, torch=torch.__version__, argv=argv))
        )
    return rows


if __name__ == "__main__":
    flags.PROG = "benchmark.py"  # as argparse names it
    main()
