"""One training run's folder: owned by one run, written by one live process (and by its rank 0 alone), every
file written whole, every checkpoint read back with one line for what is wrong with it.

train.py keeps its checkpoints and metrics here; this file imports nothing of the project's back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import uuid
from pathlib import Path

import torch
import torch.distributed as dist


class FolderError(Exception):
    """What went wrong with --output-dir or a checkpoint file, in one line that says what to do."""


def fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomically(path: Path, write):
    """write(tmp), flushed to the disk, then renamed over path: a crash, a power loss or a full disk
    leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync(tmp)  # the data on the disk before the rename...
        os.replace(tmp, path)
        fsync(path.parent)  # ...and the rename itself
    except (OSError, RuntimeError) as e:  # a full disk reaches torch.save as either
        tmp.unlink(missing_ok=True)
        raise FolderError(f"could not write {path} ({type(e).__name__}: {e}); the previous {path.name} is "
                          f"untouched. Free space (or fix permissions), then --resume auto") from None  # fmt: skip


def save_checkpoint(path: Path, state: dict):
    save_atomically(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: Path, keys: set[str]) -> dict:
    """The checkpoint at path, tensors only (weights_only), holding every key of `keys`."""
    if path.is_dir():
        raise FolderError(f"{path} is a folder: pass a checkpoint in it, such as {path / 'checkpoint.pt'}")
    if not path.is_file():
        raise FolderError(f"no checkpoint at {path}: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise FolderError(f"cannot read {path} ({e.strerror or e}): check its permissions") from None
    except Exception as e:
        unpickled = isinstance(e, pickle.UnpicklingError)
        objects = [line.split("GLOBAL ")[1].split()[0] for line in str(e).splitlines() if "GLOBAL " in line]
        if unpickled and objects:
            raise FolderError(f"{path} is not a checkpoint of this project: it holds pickled Python objects ({objects[0]}), "
                              f"which loading with weights_only=True refuses; pass a file of tensors") from None  # fmt: skip
        with open(path, "rb") as f:  # torch.save writes a zip archive (older torch: a pickle)
            head = f.read(2)
        if unpickled or head not in (b"", b"PK", b"\x80\x02"):  # not a pickle at all; empty: cut short
            raise FolderError(f"{path} is not a checkpoint: torch.load cannot read it; pass a .pt file of weights "
                              f"(train.py's, DeiT's or timm's)") from None  # fmt: skip
        raise FolderError(f"cannot read checkpoint {path}: it is truncated or corrupt ({type(e).__name__}); use "
                          f"another one") from None  # fmt: skip
    if not isinstance(state, dict):
        raise FolderError(f"{path} holds a {type(state).__name__}, not a checkpoint (a dict of weights and "
                          f"settings); pass train.py's, DeiT's or timm's")  # fmt: skip
    lacking = sorted(keys - set(state))
    if lacking:
        raise FolderError(f"{path} is not a checkpoint written by train.py (it lacks {', '.join(lacking)})")
    return state


def on_rank_0(rank: int, device: torch.device, work, *inputs):
    """work(*inputs) (a write of the run's folder) on rank 0 alone, every rank waiting for it. If it fails,
    all ranks stop: rank 0 with its error, the others quietly, rather than go on to meet a rank 0 that is
    gone."""
    result, error = None, None
    if rank == 0:
        try:
            result = work(*inputs)
        except Exception as e:
            error = e
    failed = torch.tensor(float(error is not None), device=device)
    if dist.is_initialized():
        dist.all_reduce(failed)
    if failed.item():
        raise error or SystemExit(1)
    return result


def launcher(world: int) -> str:
    """The command that starts train.py with `world` processes again, as a resume must."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world == 1:
        return "python"
    nodes = "--standalone" if per_node == world else f"--nnodes={world // per_node} (your rendezvous flags)"
    return f"torchrun {nodes} --nproc_per_node={per_node}"


class RunFolder:
    """--output-dir: owned by one run (its id in run.json, with the newest epoch saved) and written by one
    live process (an OS lock, released however the process ends). A new run needs a folder that holds
    no run; a resumed one, its own run's folder at an epoch no newer than its checkpoint."""

    def __init__(self, path: Path):
        self.path, self.lock = path, None

    def claim(self, run_id: str, epoch: int) -> str:
        """Take the folder for the run `run_id` resuming after `epoch` (-1: a new run), or fail; drop the
        metrics of epochs after `epoch`. Returns the id the run goes on under: its own, or a new one for
        a run resumed into a folder that held none (a fork, a run of its own from here on)."""
        if self.path.exists() and not self.path.is_dir():
            raise FolderError(f"--output-dir {self.path} is a file; choose a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path / ".lock", "a+")
        except OSError as e:
            message = (
                f"cannot write to --output-dir {self.path} ({e.strerror}); choose a folder you can write"
            )
            raise FolderError(message) from None
        try:
            import fcntl

            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not on this OS: the ownership checks below still hold
            pass
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # a file system without locks
                print(
                    f"note: {self.path} cannot be locked ({e.strerror}): two live runs there would not be stopped"
                )
            else:
                raise FolderError(
                    f"{self.path} is in use by another live run; wait for it, or choose another --output-dir"
                ) from None
        owner = None
        if (self.path / "run.json").exists():
            try:
                owner = json.loads((self.path / "run.json").read_text())
                owner = dict(run_id=owner["run_id"], epoch=int(owner["epoch"]))
            except (ValueError, KeyError, TypeError):
                raise FolderError(
                    f"{self.path}/run.json is not train.py's; choose another --output-dir"
                ) from None
        elif (self.path / "checkpoint.pt").exists():  # a run written before run.json existed
            owner = dict(run_id=None, epoch=-1)  # its id and epoch unknown
        if owner is not None:
            self.refuse(owner, run_id, epoch)
        self.metrics(epoch + 1)
        return uuid.uuid4().hex if owner is None and epoch >= 0 else run_id

    def refuse(self, owner: dict, run_id: str, epoch: int):
        """Fail unless the folder's run (`owner`) is the one resuming after `epoch`, at no newer epoch."""
        held = f"{self.path} holds another run" + (
            f" (epoch {owner['epoch'] + 1})" if owner["epoch"] >= 0 else ""
        )
        if epoch < 0:
            raise FolderError(
                f"{held}: continue it with --resume auto, or start this one in another --output-dir"
            )
        if owner["run_id"] not in (run_id, None):
            raise FolderError(
                f"{held}, not the checkpoint's: resume into its own folder, or choose an empty --output-dir"
            )
        if owner["epoch"] > epoch:
            raise FolderError(
                f"{self.path} holds epoch {owner['epoch'] + 1}, newer than the checkpoint's {epoch + 1}: resuming "
                f"would overwrite that history; resume from {self.path / 'checkpoint.pt'}, or write this run to "
                f"another --output-dir"
            )

    def save(self, epoch: int, metrics: dict, state: dict, is_best: bool):
        """An epoch's files, in an order that leaves them consistent wherever a crash falls: its metrics line
        (a resume drops what no checkpoint holds), best.pt (checkpoint.pt names it as best), checkpoint.pt,
        then run.json."""
        self.metrics(epoch, metrics)
        if is_best:
            save_checkpoint(self.path / "best.pt", state)
        save_checkpoint(self.path / "checkpoint.pt", state)
        self.record(state["run_id"], epoch)

    def interrupted(self, epoch: int, world: int = 1) -> str:
        """What to tell a user whose run of `world` processes stopped in `epoch`: what is saved and how to
        continue."""
        newest = self.path / "checkpoint.pt"
        saved = torch.load(newest, weights_only=True, mmap=True)["epoch"] if newest.exists() else None
        held = f"{newest} holds epoch {saved + 1}" if saved is not None else "no checkpoint was saved yet"
        return (f"interrupted in epoch {epoch + 1}; {held}. Continue with: {launcher(world)} train.py --resume auto "
                f"--output-dir {self.path}")  # fmt: skip

    def record(self, run_id: str, epoch: int):
        save_atomically(
            self.path / "run.json", lambda tmp: tmp.write_text(json.dumps(dict(run_id=run_id, epoch=epoch)))
        )

    def metrics(self, start_epoch: int, line: dict | None = None):
        """metrics.jsonl rewritten whole: the lines of epochs up to start_epoch (a line cut short by a full
        disk or a crash is dropped), then `line`."""
        path, kept = self.path / "metrics.jsonl", []
        for text in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(text)["epoch"] <= start_epoch:
                    kept.append(text)
        kept += [json.dumps(line)] if line else []
        save_atomically(path, lambda tmp: tmp.write_text("".join(t + "\n" for t in kept)))
