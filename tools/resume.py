"""A run of train.py that stops and goes on: an interrupt (Ctrl-C, or a cluster's SIGTERM) ends it with a
line that says what is saved and how to continue; the continued run takes its flags from its checkpoint
(refusing the two it cannot change) and the state that makes it go on exactly where it stopped: weights,
optimizer and every rank's random generators.

train.py and tools/analyze.py import this; it imports neither train.py nor a script.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tools import flags
from tools.flags import fail
from tools.run_folder import RunFolder

# What a resume cannot change, and why (an evaluation builds no optimizer, so it may change both)
FIXED = dict(
    recipe="a resumed run keeps its recipe's values (give single ones with their flags)",
    decay_pos_embed="the optimizer's state is kept per weight-decay group",
)


@contextlib.contextmanager
def interruptible(args: argparse.Namespace):
    """SIGTERM (a cluster's preemption, torchrun relaying Ctrl-C) taken as Ctrl-C inside the block (train.py
    may run in a notebook, so not after it); either ends the process with status 130 and, on rank 0, a
    line saying what is saved and how to continue."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        yield
    except KeyboardInterrupt:
        if args.rank == 0 and args.progress["epoch"] is not None:
            message = RunFolder(Path(args.output_dir)).interrupted(args.progress["epoch"], args.world)
            print(f"\n{flags.PROG}: {message}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupted(signum, frame):
    """A preemption stops the loader workers as well: their end is part of the interrupt, not a loader
    failure to report (torch's SIGCHLD handler would raise one over it)."""
    if hasattr(signal, "SIGCHLD"):  # a handler that does nothing, not SIG_DFL: Python warns of a pending one
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    raise KeyboardInterrupt


def checkpoint_to_resume(args: argparse.Namespace) -> Path | None:
    """The checkpoint that --resume continues: the path given, or for auto the newest in --output-dir (None
    in a new folder); None without --resume. Refuses an empty path, --resume with --finetune, and
    --eval-only with no checkpoint."""
    if "" in (args.resume, args.finetune):
        fail("--resume and --finetune take a path, and one of them got an empty one (is a shell variable "
             "unset?)")  # fmt: skip
    if args.resume and args.finetune:
        fail("--resume continues a run and --finetune starts a new one from weights: give one of them")
    newest = Path(args.output_dir) / "checkpoint.pt"
    path = (
        (newest if newest.is_file() else None) if args.resume == "auto" else args.resume and Path(args.resume)
    )
    if args.eval_only and not path:
        where = f"none in {args.output_dir} yet" if args.resume == "auto" else "none was given"
        fail(f"--eval-only needs a checkpoint: --resume PATH, or --resume auto for --output-dir's ({where})")
    return path


def inherit(parser: argparse.ArgumentParser, argv, state: dict, keys: set[str], **defaults):
    """The command line parsed again with the checkpoint's value for each flag of `keys` that it does not
    give (a resumed run is the same run), and `defaults` for others."""
    parser.set_defaults(**{k: v for k, v in state["args"].items() if k in keys}, **defaults)
    return parser.parse_args(argv)


def check_unchanged(args: argparse.Namespace, state: dict, path: Path):
    """Refuse a flag of FIXED that differs from the checkpoint's, for a run that trains on."""
    for key in (k for k in FIXED if getattr(args, k) not in (None, state["args"].get(k))):
        fail(f"--{key.replace('_', '-')} differs from the checkpoint's: {FIXED[key]}; resume without it, or "
             f"start a new run with --finetune {path}")  # fmt: skip


def load_weights(model: torch.nn.Module, state: dict, path: Path):
    """The checkpoint's weights into `model`, a model of its config for this data set's class count; one
    line when the class count or the weights do not fit."""
    saved = state["model_config"].get("num_classes", model.cfg.num_classes)  # if not, load_state_dict says
    if saved != model.cfg.num_classes:
        fail(f"the checkpoint has {saved} classes but this data set has {model.cfg.num_classes}: to train a "
             f"new head on it, start a new run with --finetune {path}")  # fmt: skip
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # a damaged or hand-edited file
        fail(f"{path}'s weights do not fit its model_config ({str(e).strip().splitlines()[-1].strip()})")


def restore(state: dict, optimizer, args: argparse.Namespace, device: torch.device) -> tuple[int, dict, str]:
    """The optimizer's state (with the weight decay given now) and this rank's random generators put back;
    returns the epoch to start from, the best epoch so far and the run's id. Refuses another process count
    than the checkpoint's (each rank has its own generators) and a checkpoint that already holds --epochs."""
    if len(state["rng"]) != args.world:
        fail(f"the checkpoint was written by {len(state['rng'])} processes; resume it with that many, "
             f"not {args.world}")  # fmt: skip
    optimizer.load_state_dict(state["optimizer"])  # its weight decay is the checkpoint's; the flag's wins
    optimizer.param_groups[0]["weight_decay"] = args.weight_decay
    rng = state["rng"][args.rank]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    random.setstate(rng["python"])
    start = state["epoch"] + 1
    if start >= args.epochs:
        fail(f"nothing to train: the checkpoint holds epoch {start} and --epochs is {args.epochs}; give a "
             f"larger --epochs to train on")  # fmt: skip
    return start, state["best"], state["run_id"]


def rng_states(device: torch.device, world: int) -> list[dict]:
    """Every rank's random generators, as a checkpoint holds them (a collective: every rank calls it)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    mine = dict(torch=torch.get_rng_state(), cuda=cuda, python=random.getstate())
    states = [mine] * world
    if dist.is_initialized():
        dist.all_gather_object(states, mine)
    return states
