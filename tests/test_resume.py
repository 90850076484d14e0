"""Never losing a run: a kill at any point resumes at once to the same weights, an interrupt says what is
saved and how to go on, files are written whole, and a run's folder holds that run alone."""

import errno
import gc
import os
import re
import shlex
import signal
import struct
import weakref
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import (
    QUIET,
    TINY,
    epochs_in,
    folder_run,
    run_train,
    same_weights,
    snapshot,
    train_script,
    write_image_folder,
)

import train
from training import checkpoint, engine

# 64 images in batches of 16: 4 optimizer steps an epoch. Step 6 is the middle of the second epoch.


def test_a_run_killed_mid_epoch_resumes_at_once_to_the_same_weights(tmp_path):
    """SIGKILL in epoch 2 (no handler runs), then at once --resume auto alone: the run ends bit for bit as
    one never stopped, though its DataLoader workers outlive the killed process a moment. Nothing of that
    process is needed: each epoch is seeded from (seed, epoch, rank) and each image's augmentation from
    its index, so even another worker count changes nothing. The weights' EMA, evaluated, goes on too."""
    flags = [*TINY, "--workers", "2", "--epochs", "3", "--model-ema", "0.9", "--eval-ema", "true"]
    train.main([*flags, "--output-dir", str(tmp_path / "straight")])
    killed = train_script(tmp_path, *flags, "--output-dir", str(tmp_path / "killed"), signal_at=6, sig=9)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert epochs_in(tmp_path / "killed") == [1]
    train.main(["--resume", "auto", "--output-dir", str(tmp_path / "killed"), "--workers", "1"])
    assert same_weights(tmp_path / "straight/checkpoint.pt", tmp_path / "killed/checkpoint.pt")
    assert epochs_in(tmp_path / "killed") == [1, 2, 3]
    straight, killed = (
        torch.load(tmp_path / f"{n}/checkpoint.pt", weights_only=True) for n in ("straight", "killed")
    )
    assert all(torch.equal(straight["ema"][k], killed["ema"][k]) for k in straight["ema"])
    judged = [[m["val_loss"] for m in c["history"]] for c in (straight, killed)]  # the EMA's, evaluated
    assert judged[0] == judged[1]


def interrupt_at(monkeypatch, at: int):
    """Ctrl-C at the optimizer's at-th step, in this process."""
    step, seen = torch.optim.AdamW.step, []

    def stepping(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == at:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", stepping)


def test_an_interrupt_before_the_first_checkpoint_says_so_and_its_command_starts_the_run_again(
    tmp_path, monkeypatch, capsys
):
    """Nothing was saved, and the command it prints starts that same run again (not a resume, which would
    start a new run with every default): it ends as a run never stopped; so does a resumed one on the
    device data path."""
    flags = [*TINY, "--device-data", "on", "--epochs", "2"]
    train.main([*flags, "--output-dir", str(tmp_path / "straight")])
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(SystemExit) as stopped:
            train.main([*flags, "--output-dir", str(tmp_path / "run")])
    assert stopped.value.code == 130 and snapshot(tmp_path / "run") == {}
    line = capsys.readouterr().err.strip().splitlines()[-1]
    command = shlex.split(line.split("interrupted before its first checkpoint. Start again: ")[1])
    assert command[:2] == ["python", "train.py"]
    with monkeypatch.context() as m:
        interrupt_at(m, 6)
        with pytest.raises(SystemExit):
            train.main(command[2:])
    assert epochs_in(tmp_path / "run") == [1]
    train.main(["--resume", "auto", "--output-dir", str(tmp_path / "run")])
    assert same_weights(tmp_path / "straight/checkpoint.pt", tmp_path / "run/checkpoint.pt")


def test_a_preemption_says_what_is_saved_and_its_command_goes_on(tmp_path):
    """SIGTERM to the whole process group (a scheduler's preemption: the loader workers get it too): exit
    130, no traceback, and one last line with the epoch saved and the command that goes on, which ends
    the run as one never stopped."""
    flags = [*TINY, "--workers", "2", "--epochs", "2"]
    train.main([*flags, "--output-dir", str(tmp_path / "straight")])
    run = tmp_path / "run"
    stopped = train_script(tmp_path, *flags, "--output-dir", str(run), signal_at=6, sig=15, to="group")
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    go_on = f"python train.py --resume auto --output-dir {run}"
    assert last == f"train.py: interrupted; {run}/checkpoint.pt holds epoch 1. Go on: {go_on}"
    train.main(shlex.split(go_on)[2:])
    assert same_weights(tmp_path / "straight/checkpoint.pt", run / "checkpoint.pt")


@pytest.mark.parametrize(
    "at, sig, to, saved",
    [
        ("build_datasets", signal.SIGTERM, "group", None),  # start-up
        ("save", signal.SIGTERM, "group twice", "best.pt"),  # epoch 1's first file, being written
        ("save", signal.SIGINT, "process", "best.pt"),
        ("step", signal.SIGTERM, "group twice", "checkpoint.pt"),  # epoch 2, workers alive
        ("step", signal.SIGINT, "group", "checkpoint.pt"),
    ],
)
def test_an_interrupt_at_any_moment_is_one_line_and_leaves_every_file_whole(tmp_path, at, sig, to, saved):
    """SIGINT or SIGTERM, to the process or its group (loader workers alive), while it starts, writes a
    checkpoint (which is finished first) or trains: exit 130, no traceback, no temporary file, and the
    line that names the newest checkpoint, which reads back verified, and the command that goes on."""
    run = tmp_path / "run"
    flags = [*TINY, "--workers", "2", "--epochs", "2", "--output-dir", str(run)]
    stopped = train_script(tmp_path, *flags, signal_at={"step": 6}.get(at, 1), sig=sig, to=to, at=at)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    if saved is None:
        again = f"python train.py {shlex.join(flags)}"
        assert last == f"train.py: interrupted before its first checkpoint. Start again: {again}"
        assert not run.exists()
        return
    go_on = f"python train.py --resume auto --output-dir {run}"
    assert last == f"train.py: interrupted; {run / saved} holds epoch 1. Go on: {go_on}"
    assert checkpoint.read(run / saved)["epoch"] == 0 and not list(run.glob("*.tmp"))


@pytest.mark.parametrize("lone", ["checkpoint.pt", "best.pt", "metrics.jsonl"])
def test_a_new_run_refuses_a_folder_that_holds_any_of_a_runs_files(tmp_path, lone):
    """A lone best.pt too: a new run writes over none of them, whatever reads them (--finetune may)."""
    run_train(tmp_path, "--epochs", "1", name="other")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / lone).write_bytes((tmp_path / "other" / lone).read_bytes())
    before = snapshot(tmp_path / "run")
    with pytest.raises(
        SystemExit, match="run holds a run's files: continue it with --resume auto, or choose"
    ):
        run_train(
            tmp_path,
            "--epochs",
            "1",
            *(["--finetune", str(tmp_path / "run/best.pt")] if lone == "best.pt" else []),
        )
    assert snapshot(tmp_path / "run") == before


def test_a_resume_writes_into_its_own_runs_folder_only(tmp_path):
    """Runs a and b; b resumed by path goes on in b's folder; a resume into any other folder is refused,
    and so is a checkpoint of a's copied into b's folder: a and b stay as they were."""
    run_train(tmp_path, "--epochs", "2", name="a")
    run_train(tmp_path, "--epochs", "1", "--seed", "7", name="b")
    a = snapshot(tmp_path / "a")
    train.main(["--resume", str(tmp_path / "b/checkpoint.pt"), "--epochs", "2"])
    assert epochs_in(tmp_path / "b") == [1, 2]
    b_resumed = ["--resume", str(tmp_path / "b/checkpoint.pt"), "--epochs", "3"]
    for other in ("a", "c"):
        with pytest.raises(
            SystemExit, match=r"a resume writes into its run's own folder, .*b: drop --output-dir"
        ):
            train.main([*b_resumed, "--output-dir", str(tmp_path / other)])
    b = snapshot(tmp_path / "b")
    (tmp_path / "b/from_a.pt").write_bytes((tmp_path / "a/checkpoint.pt").read_bytes())
    with pytest.raises(
        SystemExit, match=r"b holds another run \(checkpoint.pt\): resume a checkpoint in its own"
    ):
        train.main(["--resume", str(tmp_path / "b/from_a.pt"), "--epochs", "3"])
    (tmp_path / "b/from_a.pt").unlink()
    assert snapshot(tmp_path / "a") == a and snapshot(tmp_path / "b") == b and not (tmp_path / "c").exists()


def test_a_kill_between_the_two_saves_of_a_best_epoch_still_goes_on(tmp_path, monkeypatch, capsys):
    """A best epoch writes best.pt, then checkpoint.pt: stopped between the two (epoch 1 always is a best
    one), the folder's newest checkpoint is best.pt, and both the printed command and --resume auto go on
    from it to the weights of a run never stopped."""
    run_train(tmp_path, "--epochs", "2", name="straight")
    save = checkpoint.save

    def stopped_after_best(path, obj):
        save(path, obj)
        if path.name == "best.pt":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", stopped_after_best)
        with pytest.raises(SystemExit):
            run_train(tmp_path, "--epochs", "2")
    assert sorted(snapshot(tmp_path / "run")) == ["best.pt"]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        f"interrupted; {tmp_path / 'run/best.pt'} holds epoch 1. Go on: python train.py --resume auto" in line
    )
    train.main(shlex.split(line.split("Go on: ")[1])[2:])
    assert same_weights(tmp_path / "straight/checkpoint.pt", tmp_path / "run/checkpoint.pt")


def test_resuming_an_older_checkpoint_over_its_runs_newer_one_is_refused(tmp_path):
    run_train(tmp_path, "--epochs", "3", "--lr", "1e-9", "--warmup-epochs", "0")  # best.pt: an early epoch
    assert torch.load(tmp_path / "run/best.pt", weights_only=True)["epoch"] < 2
    history = snapshot(tmp_path / "run")
    with pytest.raises(SystemExit, match=r"checkpoint.pt holds a newer epoch than .*best.pt, which a resume"):
        train.main(["--resume", str(tmp_path / "run/best.pt"), "--epochs", "4"])
    assert snapshot(tmp_path / "run") == history
    train.main(["--eval-only", "--resume", str(tmp_path / "run/best.pt")])  # an evaluation writes nothing


def test_a_resume_notices_a_data_set_that_changed(tmp_path):
    """Another image, or a class folder renamed (which moves ImageFolder's label ids): one line each, and
    the run's folder as it was."""
    write_image_folder(tmp_path / "data")
    train.main(folder_run(tmp_path / "data", "--epochs", "1", "--output-dir", str(tmp_path / "run")))
    history, resumed = snapshot(tmp_path / "run"), ["--resume", "auto", "--output-dir", str(tmp_path / "run")]
    (tmp_path / "data/train/cat/8.jpg").write_bytes((tmp_path / "data/train/cat/0.jpg").read_bytes())
    with pytest.raises(
        SystemExit, match="the data's train differ from the checkpoint's: use the data it trained on"
    ):
        train.main([*resumed, "--epochs", "2"])
    (tmp_path / "data/train/cat/8.jpg").unlink()
    for split in ("train", "val"):
        (tmp_path / f"data/{split}/cat").rename(tmp_path / f"data/{split}/zebra")
    for flags in (["--epochs", "2"], ["--eval-only"]):
        with pytest.raises(SystemExit, match="the data's classes differ from the checkpoint's"):
            train.main([*resumed, *flags])
    assert snapshot(tmp_path / "run") == history


def test_a_resume_keeps_its_flags_but_where_and_how_it_runs(tmp_path):
    """A resumed run is its checkpoint's flags with the command line on top: the same value again is
    welcome (torchrun restarts the whole command), a new one only for MAY_CHANGE."""
    run_train(tmp_path, "--epochs", "1")
    for flag, value in (
        ("--weight-decay", "0.1"),
        ("--pe", "lape"),
        ("--dim", "48"),
        ("--seed", "3"),
        ("--recipe", "deit"),
    ):
        with pytest.raises(SystemExit, match=f"{flag} differs from the checkpoint's, which a resume keeps"):
            run_train(tmp_path, "--resume", "auto", flag, value)
    best = run_train(tmp_path, "--resume", "auto", "--epochs", "2", "--workers", "1", "--log-every", "3")
    assert best["epoch"] in (1, 2) and epochs_in(tmp_path / "run") == [1, 2]
    with pytest.raises(
        SystemExit, match="nothing to train: the checkpoint holds epoch 2 of --epochs 2; give more"
    ):
        train.main(["--resume", "auto", "--output-dir", str(tmp_path / "run")])


def test_a_full_disk_mid_write_leaves_the_file_before_it_whole(tmp_path, monkeypatch):
    """ENOSPC half-way through a checkpoint: one line, every file as it was byte for byte, no temporary
    file left; and the run goes on from its checkpoint once there is space."""
    run_train(tmp_path, "--epochs", "1")
    before = snapshot(tmp_path / "run")
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"\0" * 100)  # a part was written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        SystemExit, match=r"could not write .*run/(best|checkpoint).pt \(.*No space left on device"
    ):
        run_train(tmp_path, "--epochs", "2", "--resume", "auto")
    assert snapshot(tmp_path / "run") == before
    monkeypatch.setattr(torch, "save", save)
    run_train(tmp_path, "--epochs", "2", "--resume", "auto")
    assert epochs_in(tmp_path / "run") == [1, 2]


def test_a_save_stopped_by_ctrl_c_outside_train_py_leaves_the_file_before_it(tmp_path, monkeypatch):
    """The library called from a program of one's own, with Python's own Ctrl-C: the interrupt goes on, the
    file before it stays whole and no temporary file is left."""
    checkpoint.save(tmp_path / "x.pt", {"w": torch.ones(2)})
    monkeypatch.setattr(torch, "save", lambda obj, f: f.write(b"part") and exec("raise KeyboardInterrupt"))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "x.pt", {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.ones(2))


def test_a_save_is_on_the_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """What survives a power loss: the new bytes are flushed to the disk before the rename, and the rename
    itself after it (a journal may otherwise replay the rename over an empty file)."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))) or fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or replace(a, b))
    checkpoint.save(tmp_path / "x.pt", {"w": torch.zeros(2)})
    assert events == [("fsync", False), ("replace", str(tmp_path / "x.pt")), ("fsync", True)]
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.zeros(2))


def test_the_resumed_checkpoint_is_freed_once_applied(tmp_path, monkeypatch):
    """The checkpoint's weights (and optimizer state: a DeiT-B's is about 1 GB) are not held while the
    resumed run trains."""
    run_train(tmp_path, "--epochs", "1")
    load, train_one_epoch, loaded, alive = checkpoint.read, engine.train_one_epoch, [], []

    def remembered(*args, **kwargs):
        ckpt = load(*args, **kwargs)
        loaded.append(weakref.ref(ckpt["model"]["head.weight"]))
        return ckpt

    def watched(*args, **kwargs):
        gc.collect()
        alive.append(loaded[0]() is not None)
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "read", remembered)
    monkeypatch.setattr(engine, "train_one_epoch", watched)
    run_train(tmp_path, "--epochs", "2", "--resume", "auto")
    assert alive == [False]


def test_no_process_waits_for_another_for_minutes(monkeypatch):
    """The process group's timeout (NCCL's default is 10 minutes, gloo's 30): a process that hangs or
    died outside torchrun ends the others' collectives within five minutes, which rank 0's save of a
    DeiT-B checkpoint (2 GB with best.pt, written while the others wait) must fit in."""
    asked = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: asked.update(kw) or exit(0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.main([*TINY, *QUIET])
    assert asked["timeout"] <= timedelta(minutes=5)


def test_the_interrupt_line_comes_before_the_teardown(tmp_path, monkeypatch, capsys):
    """A teardown that hangs or fails (NCCL after its peers died) must not swallow the line that says how
    to go on."""
    said = []
    monkeypatch.setattr(train, "run", lambda *args: exec("raise KeyboardInterrupt"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(
        torch.distributed, "destroy_process_group", lambda: said.append(capsys.readouterr().err)
    )
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path)
    assert stopped.value.code == 130 and "interrupted before its first checkpoint" in said[0]


def test_a_resume_writes_metrics_jsonl_anew_from_its_checkpoint(tmp_path):
    """metrics.jsonl is the checkpoint's history, written whole after it: a line cut short by a full disk,
    or the epochs of a run that died after its metrics but before its checkpoint, are no obstacle."""
    run_train(tmp_path, "--epochs", "1")
    with open(tmp_path / "run/metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    run_train(tmp_path, "--epochs", "2", "--resume", "auto")
    assert epochs_in(tmp_path / "run") == [1, 2]


def test_the_interrupt_line_of_processes_started_without_torchrun(monkeypatch, capsys):
    """RANK and WORLD_SIZE set by hand or by a scheduler, no LOCAL_WORLD_SIZE: still the one line."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "run", lambda *args: exec("raise KeyboardInterrupt"))
    with pytest.raises(SystemExit):
        train.main(["--epochs", "1"])
    assert "Start again: torchrun --nproc_per_node=2 train.py --epochs 1" in capsys.readouterr().err


def flipped(path: Path, offset: int, to: Path):
    """A copy of path with one bit flipped at offset."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    to.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoint_is_refused_in_one_line_that_names_the_other(tmp_path):
    """One bit flipped in the middle of any member of the file (its weights, optimizer state, pickled
    fields, torch's own records): resume and evaluation refuse it in one line that names it and the run's
    other checkpoint; resumed from that other one, the run goes on and writes a whole file over it."""
    run_train(tmp_path, "--epochs", "1")
    run, good = tmp_path / "run", (tmp_path / "run/checkpoint.pt").read_bytes()
    with zipfile.ZipFile(run / "checkpoint.pt") as z:  # each member's data: after its local header's names
        header = lambda m: struct.unpack("<HH", good[m.header_offset + 26 : m.header_offset + 30])  # noqa: E731
        members = [(m.header_offset + 30 + sum(header(m)), m.file_size) for m in z.infolist()]
    assert len(members) > 5
    for start, size in members:
        if size == 0:
            continue
        (run / "checkpoint.pt").write_bytes(good)
        flipped(run / "checkpoint.pt", start + size // 2, run / "checkpoint.pt")
        for command in (["--resume", "auto", "--epochs", "2"], ["--eval-only", "--resume", "auto"]):
            with pytest.raises(SystemExit) as refused:
                run_train(tmp_path, *command)
            assert re.fullmatch(
                rf"train.py: error: {run}/checkpoint.pt is damaged: .*fall back to the run's other one: "
                rf"--resume {run}/best.pt",
                str(refused.value.code),
            ), refused.value.code
    train.main(["--resume", str(run / "best.pt"), "--epochs", "2"])
    assert checkpoint.read(run / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("args", "without lr"),
        ("epoch", "1"),
        ("model", None),
        ("args", None),
        ("data", None),
        ("optimizer", {}),
        ("history", [{"epoch": 1}]),
        ("model_config", {"dim": 8}),
    ],
)
def test_a_checkpoint_with_a_field_missing_or_of_another_kind_is_refused_in_one_line(tmp_path, field, value):
    """A hand-edited or damaged checkpoint whose bytes are whole: resume and evaluation say which field is
    wrong, in one line, and write nothing."""
    run_train(tmp_path, "--epochs", "1")
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    if value == "without lr":
        value = {k: v for k, v in ckpt["args"].items() if k != "lr"}
    torch.save(ckpt | {field: value}, tmp_path / "edited.pt")
    before = snapshot(tmp_path / "run")
    for command in (
        ["--resume", str(tmp_path / "edited.pt"), "--epochs", "2"],
        ["--eval-only", "--resume", str(tmp_path / "edited.pt")],
    ):
        with pytest.raises(SystemExit) as refused:
            train.main(command)
        message = str(refused.value.code)
        assert message.startswith(f"train.py: error: {tmp_path}/edited.pt") and "\n" not in message
        assert (field if field != "args" or value is None else "--lr") in message, message
    assert snapshot(tmp_path / "run") == before


def test_an_interrupted_evaluation_says_to_run_it_again(monkeypatch, capsys):
    """An evaluation saves nothing: its interrupt line gives the same command again, not a resume that would
    train."""
    monkeypatch.setattr(train, "run", lambda *args: exec("raise KeyboardInterrupt"))
    with pytest.raises(SystemExit) as stopped:
        train.main(["--eval-only", "--resume", "runs/x/best.pt"])
    said = capsys.readouterr().err.strip()
    assert stopped.value.code == 130
    again = "python train.py --eval-only --resume runs/x/best.pt"
    assert said == f"train.py: interrupted; an evaluation saves nothing. Again: {again}"
