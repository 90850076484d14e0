"""train.py's command line: bad flags, data and checkpoints end in one line and a non-zero exit with
nothing written, --help tells the truth, and errors come from rank 0 alone."""

import re
import shutil
import subprocess

import pytest
import torch
import torchvision
from conftest import folder_run, run_train, write_image_folder

import train
from training import UserError, checkpoint, flags, recipes
from training.data import DataError

BAD_VALUES = [  # (flag, a value outside its range), for every flag that has one
    *[(f, "0") for f in ("--epochs", "--batch-size", "--accum-steps", "--repeated-aug", "--synthetic-size")],
    *[(f, "0") for f in ("--log-every", "--img-size", "--patch-size", "--dim", "--depth", "--heads")],
    *[(f, "-1") for f in ("--cooldown-epochs", "--warmup-epochs", "--lr-batch-scale", "--workers", "--seed")],
    ("--seed", str(2**32)), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--min-lr", "-0.1"),
    ("--warmup-lr", "nan"), ("--weight-decay", "-0.1"), ("--mixup", "-1"), ("--cutmix", "nan"),
    ("--drop-path", "1"), ("--attn-drop", "-0.1"), ("--smoothing", "1"), ("--reprob", "2"),
    ("--hflip", "nan"), ("--crop-scale", "0"), ("--eval-crop", "1.5"), ("--randaug-magnitude", "11"),
    ("--epochs", "2.5"), ("--pe-input", "yes"), ("--last-pe", "first"), ("--pe", "rope"),
    ("--model", "deit_huge"), ("--epoch", "5"), ("--finetune", ""), ("--resume", ""), ("--output-dir", ""),
    ("--lr", "11"), ("--backbone-lr", "1e308"), ("--mixup", "1e-300"), ("--eval-crop", "1e-300"),
]  # fmt: skip


@pytest.mark.parametrize("flag, value", BAD_VALUES)
def test_a_flag_out_of_its_range_is_one_line_and_writes_nothing(tmp_path, capsys, flag, value):
    """Every flag's allowed values are checked as it is read, so nothing starts (abbreviations are no
    flags: --epoch is refused, not taken for --epochs)."""
    with pytest.raises(SystemExit) as refused:
        run_train(tmp_path, flag, value)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and err.startswith("__main__.py: error: "), err
    assert value in err and not (tmp_path / "run").exists()


def test_bad_data_is_one_line(tmp_path, monkeypatch):
    """No such folder, folders of other classes, CIFAR-100 offline, an image too small for the built-in
    task: each names the way out."""
    with pytest.raises(SystemExit, match=r"cannot load --data imagenet from .*nowhere \(FileNotFoundError"):
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "nowhere")])
    write_image_folder(tmp_path / "data")
    (tmp_path / "data/val/cat").rename(tmp_path / "data/val/cow")
    with pytest.raises(SystemExit, match="data/train and .*data/val hold different class folders"):
        train.main(["--data", "imagenet", "--data-path", str(tmp_path / "data")])
    monkeypatch.setattr(
        torchvision.datasets.CIFAR100, "download", lambda self: exec("raise OSError('offline')")
    )
    with pytest.raises(
        SystemExit, match=r"cannot load --data cifar100 from .* \(OSError: offline\); see --data-path"
    ):
        train.main(["--data", "cifar100", "--data-path", str(tmp_path)])
    with pytest.raises(SystemExit, match="--data synthetic needs --img-size 4 or more, got 2"):
        run_train(tmp_path, "--img-size", "2", "--patch-size", "2")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "workers, damage", [("0", "not an image"), ("2", "not an image"), ("2", "truncated")]
)
def test_an_unreadable_image_is_named_in_one_line(tmp_path, workers, damage):
    """Also from a loader worker, whose exception reaches the main process inside a traceback's text."""
    write_image_folder(tmp_path / "data")
    bad = tmp_path / "data/val/dog/3.jpg"
    bad.write_bytes(b"not a jpeg" if damage == "not an image" else bad.read_bytes()[:300])
    error = "UnidentifiedImageError" if damage == "not an image" else "OSError"
    with pytest.raises(
        SystemExit, match=rf"^train.py: error: cannot read .*dog/3\.jpg \({error}.*delete or replace it$"
    ):
        train.main(folder_run(tmp_path / "data", "--workers", workers, "--output-dir", str(tmp_path / "r")))


def test_a_checkpoint_that_is_not_one_is_named_in_one_line(tmp_path):
    """Missing, a folder, empty, cut short, a text, a tensor, a dict of something else, pickled Python
    objects (weights_only refuses to run them), or a model_config of another mpvg.py: one line each."""
    run_train(tmp_path, "--epochs", "1")
    ckpt = tmp_path / "run/checkpoint.pt"
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "note.txt").write_text("hi")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "model_config": {**state["model_config"], "rope": True}}, tmp_path / "newer.pt")
    torch.save({**state, "model_config": {**state["model_config"], "dim": 48}}, tmp_path / "edited.pt")
    for name, why in [
        ("missing.pt", r"\(No such file or directory\)"),
        ("run", r"\(Is a directory\)"),
        ("empty.pt", r"\(\w+Error\): give a .pt file that torch.save wrote"),
        ("cut.pt", r"\(\w+Error\): give a .pt file that torch.save wrote"),
        ("note.txt", r"\(\w+Error\): give a .pt file that torch.save wrote"),
        ("module.pt", r"\(UnpicklingError\): give a .pt file that torch.save wrote"),
        ("tensor.pt", r"is not a run's checkpoint \(Tensor\)"),
        (
            "dict.pt",
            r"is not a run's checkpoint \(no args, data, ema, epoch, history, model, model_config",
        ),
    ]:
        with pytest.raises(SystemExit, match=rf"error: (cannot read checkpoint )?.*{name} {why}"):
            train.main(["--eval-only", "--resume", str(tmp_path / name)])
    with pytest.raises(SystemExit, match=r"newer.pt's model_config does not fit this mpvg.py \(.*'rope'"):
        train.main(["--eval-only", "--resume", str(tmp_path / "newer.pt")])
    with pytest.raises(
        SystemExit, match=r"edited.pt's weights do not fit its model_config \(\s*size mismatch"
    ):
        train.main(["--eval-only", "--resume", str(tmp_path / "edited.pt")])
    torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
    for name, why in (
        ("dict.pt", "holds none of this model's weights .it has weights"),
        ("no_weights.pt", "holds no weights"),
    ):
        with pytest.raises(SystemExit, match=rf"--finetune .*{name} {why}"):
            run_train(tmp_path, "--finetune", str(tmp_path / name), name="fine")
    assert not (tmp_path / "fine").exists()


def test_an_evaluation_of_the_ema_of_a_checkpoint_without_one_is_one_line(tmp_path):
    """--model-ema alone changes nothing of an evaluation; --eval-ema where the run kept no EMA is refused."""
    run_train(tmp_path, "--epochs", "1", "--model-ema", "0")
    best = str(tmp_path / "run/best.pt")
    plain = train.main(["--eval-only", "--resume", best])
    assert train.main(["--eval-only", "--resume", best, "--model-ema", "0.9"]) == plain
    with pytest.raises(
        SystemExit, match=f"^train.py: error: {best} holds no EMA of the weights: drop --model-ema"
    ):
        train.main(["--eval-only", "--resume", best, "--model-ema", "0.9", "--eval-ema", "true"])


def test_what_cannot_run_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    """Config's checks, --resume with --finetune, --eval-only without a checkpoint, a batch that does not
    split over the processes or fills no step."""
    write_image_folder(tmp_path / "data")
    for given, message in [
        (["--pe", "mpvg", "--pool", "cls"], "incompatible with the class token"),
        (
            ["--last-pe", "5"],
            "last_pe=5 names pos_5, but layer 5 does not exist: use 0 .the raw PE. or a layer in",
        ),
        (["--pe", "default", "--pool", "gap", "--last-pe", "1"], "layer 1 receives no PE .pe_layers='none'"),
        (
            ["--resume", "y.pt", "--finetune", "x.pt"],
            "--resume PATH goes on with a run and --finetune starts a new one",
        ),
        (["--eval-only"], "--eval-only needs a checkpoint"),
        (["--model", "ceit_tiny", "--patch-size", "2"], "CeiT's stem halves the image twice"),
        (["--model", "t2t_vit_7", "--patch-size", "8"], "T2T-ViT's soft splits stride 4, 2 and 2 pixels"),
        (["--model", "swin_tiny", "--depth", "4"], "give depth 7 or more, not 4"),
        (
            ["--model", "swin_tiny", "--depth", "12", "--pe", "default", "--pool", "cls"],
            "Swin has no class token",
        ),
        (["--batch-size", "128"], "64 training images a process make no step: lower --batch-size"),
        (
            ["--device-data", "on", "--data", "imagenet", "--data-path", str(tmp_path / "data")],
            "--device-data holds sets of one image size",
        ),
    ]:
        with pytest.raises(SystemExit, match=message):
            run_train(tmp_path, *given)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--batch-size 15 does not split evenly over 2 process"):
        run_train(tmp_path, "--batch-size", "15")
    assert not (tmp_path / "run").exists()


def test_errors_are_printed_by_rank_0_alone(monkeypatch):
    """Under torchrun every process meets a bad flag: one says it, the others end quietly, non-zero."""

    def failing(error):
        def run(*args):
            raise error

        return run

    monkeypatch.setenv("RANK", "1")  # torchrun's second process
    with pytest.raises(SystemExit) as other_rank:
        checkpoint.command("train.py", failing(UserError("the same message on every rank")), [])
    assert other_rank.value.code == 1
    with pytest.raises(SystemExit, match="error: cannot read img.jpg$"):  # one only this process met
        checkpoint.command("train.py", failing(DataError("cannot read img.jpg")), [])
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="^train.py: error: the same message on every rank$"):
        checkpoint.command("train.py", failing(UserError("the same message on every rank")), [])


def test_help_shows_every_default_and_each_recipes_value():
    """--help tells the truth: the value each recipe gives every recipe flag, the default of every other
    (0 included), and which flags a resume may be given anew."""
    text = " ".join(flags.build_parser().format_help().split())  # what --help prints, its lines joined
    for key in recipes.RECIPES["deit"]:
        if key not in ("mean", "std"):
            shown = "; ".join(f"{r}: {recipes.RECIPES[r][key]}" for r in recipes.RECIPES)
            assert f"[{shown}]" in text, key
    for key, value in flags.DEFAULTS.items():
        if value is not None and value is not False:
            assert re.search(rf"--{key.replace('_', '-')} .*?\[{re.escape(str(value))}\]", text), key
    for key in checkpoint.MAY_CHANGE - {"resume", "eval_only"}:
        assert f"--{key.replace('_', '-')}" in text.split("given anew only")[1].split(".")[0], key


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("keep me")
    for name in ("file", "file/run"):
        with pytest.raises(SystemExit, match=f"cannot write into --output-dir .*{name} "):
            run_train(tmp_path, "--epochs", "1", name=name)
    assert (tmp_path / "file").read_text() == "keep me"


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only file system (a tmpfs mounted so), where even root cannot write."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", folder], capture_output=True
    ).returncode:
        pytest.skip("mount is not allowed here: no read-only file system to try")
    yield folder
    subprocess.run(["umount", folder], check=True)


def test_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path, read_only, capsys):
    """A new run, a resume and a fine-tune into a read-only folder: one line, before any epoch is trained."""
    for name in ("read_only", "read_only/run"):
        with pytest.raises(
            SystemExit, match=f"cannot write into --output-dir .*{name} .Read-only file system"
        ):
            run_train(tmp_path, "--epochs", "1", name=name)
    run_train(tmp_path, "--epochs", "1")
    subprocess.run(["mount", "-o", "remount,rw", read_only], check=True)
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl"):
        shutil.copy(tmp_path / "run" / name, read_only)
    subprocess.run(["mount", "-o", "remount,ro", read_only], check=True)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="cannot write into --output-dir .*read_only .Read-only file system"):
        train.main(["--resume", "auto", "--output-dir", str(read_only), "--epochs", "2"])
    assert "epoch 2" not in capsys.readouterr().out


def test_the_largest_seed_runs_on_either_loader(tmp_path):
    """Every seed derived from --seed (the data's, each epoch's, each image's) stays within torch's range."""
    for loader in ("on", "off"):
        run_train(tmp_path, "--epochs", "1", "--seed", str(2**32 - 1), "--device-data", loader, name=loader)
