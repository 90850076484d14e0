"""Training throughput of the paper's PE modes, and of timm's ViT, side by side: full training steps
(train.py's train_step) on data already on the device, the models taking turns in one process.

    python -m tools.benchmark --model deit_small --batch-size 256 --compile   # the GPU targets
    python -m tools.benchmark --model deit_tiny --batch-size 16 --steps 5 --rounds 3 --warmup 2

Every other flag is train.py's: the model (its preset and knobs), --batch-size, --compile, the recipe's
weight decay and smoothing, and the data whose loader is timed (--data synthetic --recipe deit unless
given).
"""

import json
import os
import time
from argparse import ArgumentTypeError, Namespace
from pathlib import Path

import torch
from tqdm import tqdm

import models
from models.swin import SwinConfig
from mpvg import PE_MODES, PRESETS, Config
from training import UserError, flags
from training.data import build_datasets, make_loaders
from training.engine import build_optimizer, compile_model, model_config, train_step

ROWS = "default:cls,default:gap,lape:cls,pvg:gap,mpvg:gap"  # each mode beside default pooled alike
SWIN_ROWS = "default:gap,lape:gap,pvg:gap,mpvg:gap"  # Swin averages in every mode


def flops_per_image(cfg: Config) -> float:
    """Forward FLOPs of one image, matmuls only (a multiply-add is 2). LayerNorms, softmax and the
    (1, N, D) PE path are left out: they are under 1% here. A training step is 3x this."""
    t, d, hidden = cfg.num_tokens, cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    patches = 2 * cfg.num_patches * d * cfg.in_chans * cfg.patch_size**2
    layer = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
    return patches + cfg.depth * layer + 2 * d * cfg.num_classes


def timm_twin(name: str, cfg: Config):
    """timm's VisionTransformer (or SwinTransformer, without the absolute PE) built to the same
    configuration; None without timm, or for CeiT and T2T-ViT, which timm does not build."""
    try:
        from timm.models.swin_transformer import SwinTransformer as TimmSwin
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return None
    if name not in PRESETS and not isinstance(cfg, SwinConfig):
        return None
    if isinstance(cfg, SwinConfig):
        size = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.dim, depths=cfg.depths)
        size |= dict(num_heads=[cfg.heads << s for s in range(len(cfg.depths))], window_size=cfg.window)
        rates = dict(drop_path_rate=cfg.drop_path, attn_drop_rate=cfg.attn_drop)
        return TimmSwin(
            num_classes=cfg.num_classes, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, **size, **rates
        )
    cls = cfg.pool == "cls"
    size = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.dim)
    size |= dict(depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias)
    pooling = dict(class_token=cls, global_pool="token" if cls else "avg", fc_norm=False)
    rates = dict(drop_path_rate=cfg.drop_path, attn_drop_rate=cfg.attn_drop)
    return TimmViT(num_classes=cfg.num_classes, **size, **pooling, **rates)


def configurations(args, rows: str) -> dict[str, Config]:
    """The rows' models: the flags' model in each PE mode, with the pooling the row names."""
    pairs = [row.split(":") for row in rows.split(",")]
    return {
        f"{pe} ({pool})": model_config(Namespace(**vars(args) | dict(pe=pe, pool=pool))) for pe, pool in pairs
    }


def time_data_loader(args, device, batches: int = 10) -> float:
    """Images/s that train.py's training loader delivers with the recipe's augmentations, model aside: a
    DataLoader over `batches` batches once its workers run; the device loader over a whole epoch (it
    augments a chunk of the epoch at a time)."""
    img_size = model_config(args).img_size
    train_set, val_set = build_datasets(args, img_size)
    loader, _ = make_loaders(args, train_set, val_set, img_size, args.batch_size, device, 0, 1)
    on_device = not isinstance(loader, torch.utils.data.DataLoader)
    if len(loader) < (1 if on_device else 2):  # the first batch starts the workers: a second is timed
        raise UserError(f"--batch-size {args.batch_size} is too large for {len(train_set)} training images")
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


def profile(step, name: str, cuda: bool, top: int = 12):
    """The kernels (or CPU ops) that take a row's step time, from torch.profiler over 5 steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of {name}, 5 steps, top {top} by self time:")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70))


def benchmark(args, ours, device) -> dict:
    cuda = device.type == "cuda"  # and so bf16 autocast, as in training
    configs = configurations(args, ours.rows)
    model_class = models.ARCHITECTURES[args.model][0]
    builders = {f"mpvg.py {name}": (lambda c=c: model_class(c)) for name, c in configs.items()}
    for pool in (
        sorted({c.pool for c in configs.values()}) if ours.timm else []
    ):  # timm's twin of each pooling
        twin = timm_twin(args.model, next(c for c in configs.values() if c.pool == pool))
        if twin is not None:
            builders[f"timm {'Swin' if args.model == 'swin_tiny' else 'ViT'} ({pool})"] = lambda twin=twin: (
                twin
            )
    cfg = next(iter(configs.values()))
    img = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    target = torch.randint(cfg.num_classes, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    steps, rows = {}, {}
    for name, build in tqdm(builders.items(), desc="warm-up and compile", leave=False, disable=None):
        model = build().to(device)  # one at a time, so that each peak is its own
        optimizer = build_optimizer(model, args, device)
        compiled = compile_model(model, args.compile)

        def step(model=compiled, optimizer=optimizer):  # exactly the training loop's step
            train_step(model, optimizer, [(img, target)], args.smoothing)

        held = torch.cuda.memory_allocated(device) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()  # the first step compiles
        sync()
        first = time.perf_counter() - start
        for _ in range(ours.warmup - 1):
            step()
        sync()
        peak = (torch.cuda.max_memory_allocated(device) - held) / 2**20 if cuda else None
        params = sum(p.numel() for p in model.parameters())
        rows[name], steps[name] = dict(params=params, peak_mib=peak, first_step_s=first), step

    seconds = {name: [] for name in steps}
    for _ in range(ours.rounds):  # the models take turns, so drifts in clock or heat hit all alike
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(ours.steps):
                step()
            sync()
            seconds[name].append((time.perf_counter() - start) / ours.steps)

    device_name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(
        f"\nbenchmark: {args.model} ({cfg.dim}d x {cfg.depth}), batch {args.batch_size}, {cfg.img_size} px, "
        f"{'bf16' if cuda else 'fp32'} on {device_name}, torch {torch.__version__}, compile "
        f"{args.compile or 'off'}; {ours.warmup} warm-up, then {ours.rounds} rounds of {ours.steps} steps, "
        "median of rounds; the vs columns compare models pooled alike"
    )
    print(
        f"{'model':<24}{'params':>12}{'img/s':>10}{'ms/step':>9}{'peak MiB':>9}{'MFU':>7}{'1st step s':>11}",
        end="",
    )
    print(f"{'vs timm':>8}{'vs default':>11}")
    for name, r in rows.items():
        ms = sorted(seconds[name])[len(seconds[name]) // 2] * 1e3
        pool = name[-4:-1]
        row_cfg = configs.get(
            name.removeprefix("mpvg.py "), next(c for c in configs.values() if c.pool == pool)
        )
        r.update(ms_per_step=ms, images_per_sec=args.batch_size / ms * 1e3)
        r["mfu"] = (  # of ViT/DeiT, whose FLOPs flops_per_image counts
            3 * flops_per_image(row_cfg) * r["images_per_sec"] / (ours.peak_tflops * 1e12)
            if cuda and args.model in PRESETS
            else None
        )

    def ratio(row: dict, other: str) -> str:
        return f"{row['images_per_sec'] / rows[other]['images_per_sec']:.3f}" if other in rows else "-"

    for name, r in rows.items():
        pool = name[name.rindex("(") :]
        memory = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(
            f"{name:<24}{r['params']:>12,}{r['images_per_sec']:>10.1f}{r['ms_per_step']:>9.1f}{memory:>9}",
            end="",
        )
        timm = next((n for n in rows if n.startswith("timm") and n.endswith(pool)), "")
        print(f"{mfu:>7}{r['first_step_s']:>11.1f}{ratio(r, timm):>8}", end="")
        print(f"{ratio(r, f'mpvg.py default {pool}'):>11}")
    if ours.profile:
        profile(steps[ours.profile], ours.profile, cuda)
    return rows


def row_list(text: str) -> str:
    """--rows: PE mode:pooling pairs, comma-separated."""
    for row in text.split(","):
        pe, _, pool = row.partition(":")
        if pe not in PE_MODES or pool not in ("cls", "gap"):
            raise ArgumentTypeError(f"{row!r} is no PE mode:pooling, such as mpvg:gap")
    return text


def build_parser(train_flags: bool = True):
    """The benchmark's own flags, and (for --help and their checks) train.py's: the models, the data and
    the recipe."""
    parents = [flags.build_parser(add_help=False)] if train_flags else []
    p = flags.Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False, parents=parents)
    p.add_argument(
        "--rows",
        type=row_list,
        help=f"the models, as PE mode:pooling, comma-separated [{ROWS}; swin_tiny: {SWIN_ROWS}]",
    )
    p.add_argument("--steps", type=flags.COUNT, default=10, help="timed steps per model per round [10]")
    p.add_argument("--rounds", type=flags.COUNT, default=3, help="rounds, the models taking turns [3]")
    p.add_argument("--warmup", type=flags.COUNT, default=3, help="untimed steps first, compiling [3]")
    p.add_argument(
        "--peak-tflops", type=flags.POSITIVE, default=989.4, help="dense bf16 peak, for MFU [989.4]"
    )
    p.add_argument("--timm", type=flags.boolean, default=True, help="timm's ViT too, where it imports [true]")
    p.add_argument(
        "--profile", metavar="ROW", help="torch.profiler's top kernels of a row: 'mpvg.py mpvg (gap)'"
    )
    p.add_argument("--loader-only", action="store_true", help="time train.py's training loader alone")
    p.add_argument("--json", metavar="PATH", help="also write the rows to this file")
    return p


def parse_args(argv=None):
    build_parser().parse_args(argv)  # every flag, train.py's too, checked as --help lists them
    ours, rest = build_parser(train_flags=False).parse_known_args(argv)
    args = flags.parse(["--data", "synthetic", "--recipe", "deit", *rest])[0]
    ours.rows = ours.rows or (SWIN_ROWS if args.model == "swin_tiny" else ROWS)
    names = [f"mpvg.py {name}" for name in configurations(args, ours.rows)]
    if ours.profile and ours.profile not in names:
        raise UserError(f"--profile names no row: choose one of {', '.join(repr(r) for r in names)}")
    if ours.json and (Path(ours.json).is_dir() or not os.access(Path(ours.json).parent, os.W_OK)):
        raise UserError(f"--json {ours.json} cannot be written: give a file in a folder you can write")
    return ours, args


def main(argv=None):
    try:
        return measure(*parse_args(argv), argv)
    except UserError as e:
        raise SystemExit(f"benchmark.py: error: {e}") from None


def measure(ours, args, argv) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {
        "data loader": dict(images_per_sec=time_data_loader(args, device))
    }  # first: bad data ends it early
    if not ours.loader_only:
        rows = benchmark(args, ours, device) | rows
    if ours.json:  # for tools/speed.py, which gathers the Speed figures
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        Path(ours.json).write_text(
            json.dumps(dict(rows=rows, device=name, torch=torch.__version__, argv=argv))
        )
    return rows


if __name__ == "__main__":
    main()
