"""Every GPU figure of docs/speed.md from one command, stage by stage, each stage under a time limit.

    python -m tools.speed --out speed                          # every stage, on one GPU
    python -m tools.speed --out speed --stages deit_s,table2   # the two most wanted, in about 15 minutes
    python -m tools.speed --out speed --quick                  # a rehearsal on a CPU at tiny sizes

Each stage runs train.py or tools.benchmark in a process of its own, under its own time limit, and
keeps its log (and JSON) in --out; a stage that fails or runs out of time is reported and the next one
runs. A stage run again first moves its older files into --out/previous/. speed.md in --out gathers the
figures of every stage run into it so far, each with the date, device and torch version it ran with.

Stages, in the default order (the most wanted figures first; a compile of DeiT-S takes about 40 s on an
H200, so all stages together take longer than 15 minutes): deit_s (DeiT-S/16 batch 256
compiled, the four modes and timm, with a profile of MPVG), table2 (ViT-Lite-7/4 with the cifar recipe on
50,000 CIFAR-shaped images, 20 epochs timed, 310 extrapolated), compile (--compile trains and evaluates
with default, LaPE, PVG and MPVG under torchrun with one process, and resumes; DDP with compile needs two
GPUs), deit_s_eager, loader (the DeiT loader on JPEGs of ImageNet's typical size), deit_b (DeiT-B/16
MFU), scaling (DeiT-S batch 64-1024 and 384 px), dense (tools.dense_benchmark: a step of Mask R-CNN and of
UperNet on ViT-Adapter-Ti, batch 2, at 512 and 1024 px).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # where train.py is: every stage runs there


def stages(quick: bool, out: Path, cores: int) -> dict:
    """stage -> [(name, command, time limit in seconds)]: full sizes, or tiny ones for a CPU rehearsal."""
    bench = [sys.executable, "-m", "tools.benchmark", "--workers", str(cores)]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "train.py",
    ]
    small = "--img-size 32 --patch-size 8 --dim 64 --depth 2 --heads 2".split() if quick else []
    steps = "--steps 2 --rounds 1 --warmup 2".split() if quick else ["--steps", "20"]
    batch = "16" if quick else "256"

    def deit(name, *flags, model="deit_small", batch=batch):
        command = [*bench, "--model", model, "--batch-size", batch, *small, *steps, *flags]
        return [(name, [*command, "--json", str(out / f"{name}.json")], 120 if quick else 420)]

    cifar = "--data synthetic --recipe cifar --model vit_lite_7_4 --device-data on --workers 0".split()
    cifar += ["--compile", *([] if quick else ["reduce-overhead"]), *small]
    compile_runs = []  # one epoch (training and evaluation) per mode; MPVG also resumed, compiled again
    for mode in ("default", "lape", "pvg", "mpvg"):
        flags = [*cifar, "--pe", mode, "--synthetic-size", "512" if quick else "5120", "--epochs", "1"]
        compile_runs.append(
            (f"compile_{mode}", [*torchrun, *flags, "--output-dir", str(out / f"compile_{mode}")], 240)
        )
    resume = ["--resume", "auto", "--output-dir", str(out / "compile_mpvg"), "--epochs", "2"]
    compile_runs.append(("resume_mpvg", [*torchrun, *resume], 240))
    table2 = [*cifar, "--pe", "mpvg", "--synthetic-size", "1024" if quick else "50000"]
    table2 += [
        "--epochs",
        "2" if quick else "20",
        "--output-dir",
        str(out / "table2"),
    ]  # an epoch's time: any lr
    jpegs = ["--data", "imagenet", "--data-path", str(out / "jpegs"), "--recipe", "deit", *small]
    dense = [
        sys.executable,
        "-m",
        "tools.dense_benchmark",
        "--batch-size",
        "2",
        "--steps",
        "2" if quick else "5",
    ]
    dense += "--dim 48 --depth 4 --heads 2 --head-width 16".split() if quick else []
    return {
        "compile": compile_runs,
        "table2": [("table2", [sys.executable, "train.py", *table2], 120 if quick else 480)],
        "deit_s": deit("deit_s", "--compile", "--profile", "mpvg.py mpvg (gap)"),
        "deit_s_eager": deit("deit_s_eager"),
        "deit_b": deit("deit_b", "--compile", "--rows", "mpvg:gap", model="deit_base"),
        "scaling": [
            run
            for b in (["8", "16"] if quick else ["64", "128", "256", "512", "1024"])
            for run in deit(f"scaling_b{b}", "--compile", "--rows", "default:cls", "--timm", "false", batch=b)
        ]
        + deit(
            "scaling_384px",
            "--compile",
            "--rows",
            "default:cls",
            "--timm",
            "false",
            "--img-size",
            "64" if quick else "384",
        ),
        "loader": [
            (
                "loader",
                [*bench, "--loader-only", *jpegs, "--batch-size", batch, "--json", str(out / "loader.json")],
                300,
            )
        ],
        "dense": [  # both heads a size, each in a process of its own: rows of JSON in the log
            (f"dense_{size}", [*dense, "--size", str(size)], 120 if quick else 300)
            for size in ((64,) if quick else (512, 1024))
        ],
    }


def make_jpegs(folder: Path, n: int, size=(400, 350), classes: int = 10):
    """JPEGs of ImageNet's typical size and weight: smooth colour fields with texture, quality 90."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("val", max(n // 10, classes))):
        for i in range(count):
            d = folder / split / f"class{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            low = torch.rand(3, 6, 7, generator=g)[None]
            smooth = torch.nn.functional.interpolate(low, size=size[::-1], mode="bicubic")[0]
            pixels = (smooth * 200 + 40 * torch.rand(3, *size[::-1], generator=g)).clamp(0, 255).byte()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(d / f"{i}.jpg", quality=90)


def fail(message: str):
    raise SystemExit(f"speed.py: error: {message}")


def save(path: Path, ran: dict):
    """Written whole, even if the machine goes away here."""
    path.with_suffix(".tmp").write_text(json.dumps(ran, indent=1))
    path.with_suffix(".tmp").replace(path)


def machine() -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return dict(date=time.strftime("%Y-%m-%d %H:%M"), device=device, torch=torch.__version__)


def summary(out: Path) -> str:
    """speed.md: every stage run into --out so far (one call or several, perhaps on other machines), each
    with when, where and how it ran, then the figures read from its JSON or metrics."""
    ran = json.loads((out / "stages.json").read_text())
    lines = [
        "# Speed",
        "",
        "| stage | ran | device | torch | seconds | status |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in ran.items():
        lines.append(
            f"| {name} | {r['date']} | {r['device']} | {r['torch']} | {r['seconds']:.0f} | {r['status']} |"
        )
    for path in (out / f"{name}.json" for name in ran if (out / f"{name}.json").exists()):
        rows = json.loads(path.read_text())["rows"]
        lines += [
            "",
            f"## {path.stem}",
            "",
            "| row | img/s | ms/step | peak MiB | MFU | first step s |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            cells = [r.get(k) for k in ("images_per_sec", "ms_per_step", "peak_mib", "mfu", "first_step_s")]
            text = [
                "-" if c is None else f"{100 * c:.1f}%" if k == 3 else f"{c:,.1f}"
                for k, c in enumerate(cells)
            ]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
    metrics = out / "table2/metrics.jsonl"
    if metrics.exists():
        epochs = [json.loads(x) for x in metrics.read_text().splitlines()]
        steady = (
            sorted(e["seconds"] for e in epochs[1:])[len(epochs[1:]) // 2]
            if len(epochs) > 1
            else epochs[0]["seconds"]
        )
        first = epochs[0]["seconds"] - steady  # compilation and warm-up
        lines += ["", "## table2", ""]
        lines.append(
            f"{len(epochs)} epochs of ViT-Lite-7/4, each with its evaluation: {steady:.2f} s an epoch once "
            f"compiled ({epochs[-1]['images_per_sec']:,.0f} img/s in training), the first {first:.1f} s "
            "longer; "
            f"310 epochs extrapolate to {(first + 310 * steady) / 60:.1f} minutes."
        )
    dense = [
        json.loads(line)
        for name in ran
        if name.startswith("dense_") and (out / f"{name}.log").exists()
        for line in (out / f"{name}.log").read_text().splitlines()
        if line.startswith('{"task"')
    ]
    if dense:
        lines += ["", "## dense", "", "| head | px | batch | s/step | peak MiB | deformable attention |"]
        lines.append("|---|---|---|---|---|---|")
        for r in dense:
            cells = [r["model"], r["size"], r["batch"], r["step_s"], f"{r['peak_mib']:,}"]
            lines.append("| " + " | ".join(map(str, cells)) + f" | {100 * r['deform_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", default="speed", help="where logs, JSON and speed.md go")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a rehearsal on a CPU")
    order = "deit_s,table2,compile,deit_s_eager,loader,deit_b,scaling,dense"
    p.add_argument(
        "--stages", default=order, help="a comma-separated subset of the stages, run in this order"
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out, chosen = Path(args.out), args.stages.split(",")
    plan = stages(args.quick, out, min(os.cpu_count() or 1, 16))
    unknown = set(chosen) - set(plan)
    if unknown:
        named = ", ".join(repr(s) for s in sorted(unknown))
        fail(f"unknown stage(s) {named} in --stages {args.stages!r}: choose from {', '.join(plan)}")
    try:
        (out / "previous").mkdir(parents=True, exist_ok=True)
        ran = json.loads((out / "stages.json").read_text()) if (out / "stages.json").exists() else {}
    except OSError as e:
        fail(f"cannot use --out {out} ({type(e).__name__}: {e.strerror}): choose another folder")
    except ValueError:
        fail(f"{out}/stages.json is unreadable: move it away (the stages' logs and JSON stay) and run again")
    if "loader" in chosen and not (out / "jpegs").exists():
        make_jpegs(out / "jpegs.partial", 200 if args.quick else 4000)
        (out / "jpegs.partial").rename(out / "jpegs")  # whole, or made again next time
    results = []
    for stage in chosen:
        for name, command, limit in plan[stage]:
            for old in (out / name, out / f"{name}.json", out / f"{name}.log"):  # kept, but not gathered
                if old.exists():
                    shutil.rmtree(out / "previous" / old.name, ignore_errors=True)
                    old.replace(out / "previous" / old.name)
            ran.pop(name, None)  # until it ends: its figures are not of the machine that ran it before
            save(out / "stages.json", ran)
            start, log = time.perf_counter(), out / f"{name}.log"
            print(f"speed.py: {name} (limit {limit} s) ...", flush=True)
            with open(log, "w") as f:
                try:
                    rc = subprocess.run(
                        command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit
                    ).returncode
                    status = "ok" if rc == 0 else f"failed (exit {rc}; see {log.name})"
                except subprocess.TimeoutExpired:
                    status = f"stopped at its {limit} s limit (see {log.name})"
            results.append((name, time.perf_counter() - start, status))
            print(f"speed.py: {name}: {status}, {results[-1][1]:.0f} s", flush=True)
            ran[name] = dict(**machine(), seconds=results[-1][1], status=status)
            save(out / "stages.json", ran)
    (out / "speed.md").write_text(summary(out))
    print((out / "speed.md").read_text())
    return results


if __name__ == "__main__":
    main()
