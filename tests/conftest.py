"""What the tests of train.py, training/ and tools/ share: a tiny run, its files, and data sets written in
their real on-disk formats."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

import train

settings.register_profile(
    "mpvg", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mpvg")

REPO = Path(__file__).resolve().parent.parent
TINY = [  # a model and data small enough for a CPU test, with every augmentation of the cifar recipe on
    *("--data", "synthetic", "--recipe", "cifar", "--synthetic-size", "64", "--img-size", "16"),
    *("--dim", "32", "--depth", "2", "--heads", "2", "--batch-size", "16", "--workers", "0"),
]
QUIET = ["--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--attn-drop", "0"]  # no batch-level randomness


def run_train(tmp_path, *extra, name="run"):
    return train.main([*TINY, "--output-dir", str(tmp_path / name), *extra])


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict:
    """Every file of a folder and its bytes, to show that nothing changed."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def epochs_in(folder: Path) -> list[int]:
    return [int(line.split('"epoch": ')[1].split(",")[0]) for line in (folder / "metrics.jsonl").open()]


STEPPER = """
import os, runpy, signal, subprocess, sys, torch
import training.data
at, moment, seen = int(os.environ["SIGNAL_AT"]), os.environ["SIGNAL_IN"], []
def send():  # the at-th time the moment comes, the signal goes out (not again once torchrun restarted us)
    seen.append(1)
    if len(seen) == at and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        sig = int(os.environ["SIGNAL"])
        if os.environ["SIGNAL_TO"] == "process":
            return os.kill(os.getpid(), sig)
        # to the group, from another process, as a scheduler or timeout sends it (a loader worker
        # takes a signal from its parent as a request to exit, one from elsewhere as a kill); twice: also
        # 0.2 s later, as torchrun forwards a scheduler's signal to the processes that got it already
        kill = f"kill -{sig} -{os.getpgid(0)}"
        twice = os.environ["SIGNAL_TO"] == "group twice"
        subprocess.Popen(["sh", "-c", f"{kill}; sleep 0.2; {kill}" if twice else kill]).wait()
def wrap(owner, name):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        if moment == name:
            send()  # its handler runs at once, inside the function
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)
wrap(torch.optim.AdamW, "step")  # the optimizer's step: in the middle of an epoch
wrap(torch, "save")  # a checkpoint being written
wrap(training.data, "build_datasets")  # start-up
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def train_script(tmp_path, *argv, signal_at=0, sig=9, to="process", at="step", torchrun=(), timeout=240):
    """train.py as its command runs it (its __main__), in a process group of its own and with as many
    threads as this process; the `signal_at`-th time that `at` comes (the optimizer's "step", a checkpoint
    being written in "save", start-up's "build_datasets") it sends `sig` to itself ("process"), or
    from another process to its whole group ("group"), or that twice 0.2 s apart ("group twice"); not again
    once torchrun restarted it. torchrun: the launcher's flags, to run under it."""
    stepper = tmp_path / "stepper.py"
    stepper.write_text(STEPPER)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))
    env |= dict(SIGNAL_AT=str(signal_at), SIGNAL_IN=at, SIGNAL=str(sig), SIGNAL_TO=to)
    env |= dict(
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"
    )  # as docs/training.md says for restarts: pytorch#135712
    launcher = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    command = [*launcher, str(stepper), *argv]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def write_cifar100(root: Path, n_train=48, n_test=16):
    """A tiny CIFAR-100 in the real cifar-100-python pickle layout."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {  # Python 2 str keys, which torchvision reads back with encoding="latin1"
            "data": torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g).numpy(),
            "fine_labels": torch.randint(100, (n,), generator=g).tolist(),
            "coarse_labels": torch.randint(20, (n,), generator=g).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)], "coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_image_folder(root: Path, n_train=8, n_val=4, size=(40, 48), classes=("cat", "dog", "emu")):
    """An ImageFolder of JPEGs: train/ and val/, one folder per class."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")


def folder_run(root: Path, *flags: str) -> list[str]:
    """train.py's flags of a tiny DeiT on the ImageFolder of write_image_folder(root), for a CPU test."""
    model = "--model deit_tiny --img-size 32 --patch-size 8 --dim 32 --depth 1 --heads 2 --batch-size 8"
    return ["--data", "imagenet", "--data-path", str(root), *model.split(), "--workers", "0", *flags]
