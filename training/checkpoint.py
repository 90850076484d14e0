"""A run's checkpoints, never lost: written whole or not at all (an interrupt waits until the file is whole),
read back verified (every byte against the zip's CRC-32s, every field of its type), and the rules of a
resume: which checkpoint goes on, and which flags a resumed run may be given anew."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
import zipfile
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from training import UserError
from training.data import DataError

NAMES = ("checkpoint.pt", "best.pt")  # a run's checkpoints: its last epoch, and its best
FIELDS = {"model", "ema", "model_config", "optimizer", "epoch", "args", "history", "data"}
MODEL_FLAGS = (
    "pool pe_input pe_layers pe_hierarchical last_pe img_size patch_size dim depth heads window".split()
)
MAY_CHANGE = {  # what a resume may be given anew: where and how it runs, for how long, and its lr
    *"resume eval_only output_dir epochs lr data_path workers device_data".split(),
    *"accum_steps compile log_every".split(),
}


# Interrupts: SIGINT (Ctrl-C) and SIGTERM (a scheduler's, torchrun's) end a run as a KeyboardInterrupt

_waiting: list[int] | None = None  # while a file is written: the signals that came meanwhile


def _interrupt(signum, frame):
    # Loader workers stopped by the same signal (sent to the whole group) must not raise in its place:
    # torch's SIGCHLD handler would turn their end into a RuntimeError, anywhere, even on the way out. A
    # handler that does nothing, not SIG_DFL, so that a SIGCHLD already on its way finds one to call.
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    if _waiting is not None:
        _waiting.append(signum)
        return
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)  # one interrupt: the way out is not interrupted again
    raise KeyboardInterrupt


@contextmanager
def interrupts():
    """SIGINT and SIGTERM, to this process or its whole group, raise KeyboardInterrupt in the block once, at
    any moment but in the middle of a save (which finishes first); the handlers before are put back after."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupt)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextmanager
def _uninterrupted():
    global _waiting
    _waiting = []
    try:
        yield
    finally:
        came, _waiting = _waiting, None
        if came and signal.getsignal(came[0]) is _interrupt:
            _interrupt(came[0], None)


def save(path: Path, obj):
    """torch.save(obj) (bytes: as they are) to a temporary file, flushed to the disk, then renamed over
    path: a crash, a kill or a full disk leaves the file before it whole, and an interrupt waits for it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _uninterrupted():
            with open(tmp, "wb") as f:
                f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes on the disk before the rename...
            os.replace(tmp, path)
            folder = os.open(path.parent, os.O_RDONLY)
            os.fsync(folder)  # ...and the rename itself
            os.close(folder)
    except BaseException as e:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # a full disk reaches torch.save as either
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise UserError(
                f"could not write {path} ({why}); the one before is whole: free space, then --resume auto"
            ) from None
        raise


def damaged_fields(ckpt: dict, score: str = "val_top1") -> list[str]:
    """The fields of a checkpoint that are not of the kind train.py writes (in its history each epoch's number
    and `score`: train.py's val_top1, or another program's)."""
    weights = lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values())  # noqa: E731
    has = lambda v, keys: isinstance(v, dict) and set(keys) <= set(v)  # noqa: E731
    history = ckpt["history"]
    kind = dict(
        model=weights(ckpt["model"]),
        ema=ckpt["ema"] is None or weights(ckpt["ema"]),
        model_config=has(ckpt["model_config"], ["model"]),
        optimizer=has(ckpt["optimizer"], ["state", "param_groups"]),
        epoch=type(ckpt["epoch"]) is int and ckpt["epoch"] >= 0,
        args=isinstance(ckpt["args"], dict),
        history=isinstance(history, list) and all(has(m, ["epoch", score]) for m in history),
        data=has(ckpt["data"], ["train", "val", "classes"]),
    )
    return [field for field, ok in kind.items() if not ok]


def read(path: Path, mmap: bool = False, of_a_run: bool = True, score: str = "val_top1") -> dict:
    """A checkpoint verified: each zip member's bytes against its CRC-32, loaded with weights_only=True (so
    no pickled code runs), and of_a_run: every field of train.py's, each of its kind. Else a UserError that
    names the file and, in a run's folder, the other checkpoint to fall back to. mmap: its tensors are
    read only where they are used."""
    path = Path(path)
    other = path.with_name(NAMES[path.name == NAMES[0]])
    other = (
        f"; fall back to the run's other one: --resume {other}"
        if path.name in NAMES and other.exists()
        else ""
    )
    damaged = None
    try:
        if zipfile.is_zipfile(
            path
        ):  # torch.save's format (a file of torch before 1.6 is checked by its load)
            with zipfile.ZipFile(path) as z:
                damaged = z.testzip()
        ckpt = None if damaged else torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # no such file, a folder, no permission, cut short, not torch's, pickled objects
        why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise UserError(
            f"cannot read checkpoint {path} ({why}): give a .pt file that torch.save wrote{other}"
        ) from None
    if damaged:
        raise UserError(f"{path} is damaged: its {damaged} is not what was written{other}")
    fields = FIELDS if of_a_run else set()
    if not isinstance(ckpt, dict) or not fields <= set(ckpt):
        held = (
            f"no {', '.join(sorted(fields - set(ckpt)))}" if isinstance(ckpt, dict) else type(ckpt).__name__
        )
        raise UserError(f"{path} is not a run's checkpoint ({held}): pass its checkpoint.pt or best.pt")
    if of_a_run and (wrong := damaged_fields(ckpt, score)):
        raise UserError(
            f"{path} is damaged or hand-edited: its {', '.join(wrong)} not as a run writes{other}"
        )
    return ckpt


def newest(folder: Path) -> tuple[Path, int] | None:
    """The newest checkpoint of a run's folder and its epoch, or None: read quickly (its epoch alone, not
    verified), and never an error (an unreadable one is left out), for the line that ends an interrupt."""
    epochs = {}
    for path in (folder / n for n in NAMES):
        with suppress(Exception):
            epochs[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    return max(epochs.items(), key=lambda item: item[1], default=None)


def going_on(out: Path | None, argv: list[str], world: int, program: str, *keep: str):
    """The newest checkpoint of a run's folder and its epoch (None before the first), and the command of
    `program` that goes on from it (with the flags `keep`), or, with none, starts the same run again; on as
    many processes a node as now (the launcher's node flags are the user's to add)."""
    found = out and newest(out)
    again = [*keep, "--resume", "auto", "--output-dir", str(out)] if found else argv
    launcher = (
        "python" if world == 1 else f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"
    )
    return found, f"{launcher} {program} {shlex.join(again)}"


def resume(
    given: dict, out: Path, may_change: set = MAY_CHANGE, score: str = "val_top1", model_flags=MODEL_FLAGS
) -> tuple[Path, dict] | None:
    """The checkpoint that a run given these flags goes on from, read once, and its path: --resume PATH,
    or for --resume auto the newest in `out` (None in a folder of no run). Refused in one line: a flag
    outside may_change given anew (an evaluation: one of model_flags), a resume that would write outside its
    run's folder, over another run's checkpoint, or over a newer epoch of its own run."""
    auto, evaluating = given["resume"] == "auto", given.get("eval_only", False)
    folder = out if auto else Path(given["resume"]).parent
    run = {p: read(p, mmap=True, score=score) for p in (folder / n for n in NAMES) if auto and p.exists()}
    path = max(run, key=lambda p: run[p]["epoch"], default=None) if auto else Path(given["resume"])
    if path is None:
        return None
    ckpt = run.get(path) or read(path, mmap=True, score=score)
    fixed = {"model", "pe", *model_flags} if evaluating else set(given) - may_change
    for key in (k for k in fixed & set(given) if given[k] != ckpt["args"].get(k)):
        raise UserError(
            f"--{key.replace('_', '-')} differs from the checkpoint's, which a resume keeps: drop it"
        )
    if evaluating:
        return path, ckpt
    if "output_dir" in given and Path(given["output_dir"]).resolve() != path.parent.resolve():
        raise UserError(f"a resume writes into its run's own folder, {path.parent}: drop --output-dir")
    for other in (path.parent / n for n in NAMES if n != path.name):
        try:
            theirs = run.get(other) or read(other, mmap=True, score=score)
        except UserError:
            continue  # none, or a damaged one: written over, nothing of it is lost
        if any(theirs["args"].get(k) != v for k, v in ckpt["args"].items() if k not in may_change):
            raise UserError(
                f"{path.parent} holds another run ({other.name}): resume a checkpoint in its own run's folder"
            )
        if theirs["epoch"] > ckpt["epoch"]:
            raise UserError(
                f"{other} holds a newer epoch than {path}, which a resume would write over: resume from it"
            )
    return path, ckpt


def claim(out: Path, resuming: bool):
    """The run's folder, made and seen to be writable before any training; a new run takes no folder that
    holds a run's files."""
    if not resuming and any((out / name).exists() for name in (*NAMES, "metrics.jsonl")):
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


def save_epoch(out: Path, args, state: dict, epoch: int, score: str = "val_top1"):
    """The epoch's checkpoint (and best.pt, if its score, the history's last, is the best yet: first, so
    that checkpoint.pt never names a best epoch whose file is not there), then metrics.jsonl, each written
    whole."""
    history = state["history"]
    is_best = history[-1][score] > max((m[score] for m in history[:-1]), default=-1.0)
    model, ema, optimizer, cfg = state["model"], state["ema"], state["optimizer"], state["cfg"]
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, data=state["data"])
    ckpt |= dict(ema=ema.state_dict() if ema else None, args=vars(args), history=history)
    ckpt |= dict(model_config=dict(model=args.model, **asdict(cfg)))
    for name in ("best.pt", "checkpoint.pt") if is_best else ("checkpoint.pt",):
        save(out / name, ckpt)
    save(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode())


def command(program: str, run, argv: list[str], unit: str = "epoch"):
    """run(argv, rank, world, where) as `program`'s command line, on each of torchrun's processes (or the
    single one). An interrupt (Ctrl-C, or SIGTERM to the process or its group) ends it with exit 130 and one
    line: the newest checkpoint in where["out"] and the command that goes on from it (with where["keep"]'s
    flags), or starts it again. A loss that is not finite, a UserError and a loader's DataError end it with
    one line each, from rank 0 alone unless only this process met it."""
    rank, world, where = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), {}
    name = program.removeprefix("-m ")

    def fail(message: str, every_rank: bool = False):
        raise SystemExit(f"{name}: error: {message}" if every_rank or rank == 0 else 1)

    with interrupts():
        try:
            return run(argv, rank, world, where)
        except KeyboardInterrupt:
            evaluating = "--eval-only" in argv  # it saves nothing: the same command again
            out = None if evaluating else where.get("out")
            found, again = going_on(out, argv, world, program, *where.get("keep", ()))
            if evaluating:
                said = "; an evaluation saves nothing. Again"
            else:
                said = (
                    f"; {found[0]} holds {unit} {found[1] + 1}. Go on"
                    if found
                    else " before its first checkpoint. Start again"
                )
            if rank == 0:
                print(f"\n{name}: interrupted{said}: {again}", file=sys.stderr)
            raise SystemExit(130) from None
        except FloatingPointError as e:  # stopped before saving it: the last checkpoint goes on
            found, again = going_on(where.get("out"), argv, world, program, *where.get("keep", ()))
            how = "Go on from the last checkpoint" if found else "Start again"
            fail(f"{e}; stopped before saving it. {how} with a lower lr: {again} --lr LOWER")
        except UserError as e:
            fail(str(e))
        except DataError as e:  # from a loader worker, whose traceback's last line is the error itself
            fail(str(e).strip().splitlines()[-1].split("DataError: ")[-1], every_rank=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
