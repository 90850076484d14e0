"""train.py end to end: a run's files, the first command, DDP as one process, accumulation, fine-tuning,
the compiled path, the schedule and the optimizer of each anchor, and every recipe value at work."""

import argparse
import json
import math
import re
import shlex

import pytest
import torch
from conftest import QUIET, TINY, epochs_in, folder_run, run_train, train_script, weights, write_image_folder

import models
import train
import training.data
from mpvg import PE_MODES, create_model, load_model
from training import checkpoint, engine, flags, recipes
from training.finetune import load_pretrained, resize_pos_embed

MODES = ["default", "lape", "pvg", "mpvg"]


def test_a_run_writes_its_checkpoints_and_metrics_and_reloads(tmp_path, capsys):
    """A line per epoch in metrics.jsonl, checkpoints that load back as the model (mpvg.load_model) and
    evaluate to the same top-1, and progress lines every --log-every steps, also off a terminal."""
    best = run_train(tmp_path, "--epochs", "2", "--pe", "mpvg", "--log-every", "2")
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    keys = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "seconds"}
    assert [m["epoch"] for m in lines] == [1, 2] and all(set(m) == keys for m in lines)
    assert all(math.isfinite(v) for m in lines for v in m.values())
    out = capsys.readouterr().out
    progress = re.findall(r"^epoch (\d) step (\d)/4  loss [\d.]+  \d+ img/s$", out, re.M)
    assert progress == [("1", "2"), ("1", "4"), ("2", "2"), ("2", "4")]
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert set(ckpt) == checkpoint.FIELDS and ckpt["epoch"] == 1 and ckpt["history"] == lines
    model = load_model(tmp_path / "run/best.pt")
    assert not model.training and model.cfg.num_classes == 16 and model.cfg.pe == "mpvg"
    evaluated = train.main(["--eval-only", "--resume", str(tmp_path / "run/best.pt")])  # its flags its own
    assert evaluated["val_top1"] == best["val_top1"]


def test_the_first_command_learns_the_built_in_task(tmp_path, capsys):
    """The README's first run, smaller (16 px, 6 epochs): well above the chance it prints."""
    flags = [
        "--data",
        "synthetic",
        "--img-size",
        "16",
        "--synthetic-size",
        "1024",
        "--epochs",
        "6",
        "--dim",
        "32",
    ]
    flags += ["--depth", "2", "--heads", "2", "--batch-size", "32", "--lr", "3e-3", "--workers", "0"]
    best = train.main([*flags, "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    chance = float(re.search(r"chance: ([\d.]+)%", out).group(1))
    assert chance < 15 and best["val_top1"] > 2.5 * chance, out


def test_two_processes_under_torchrun_equal_one_and_go_on_after_a_kill(tmp_path):
    """DDP with gloo under torchrun: the batch split over 2 processes gives the weights of one process, for
    per-image augmentation (seeded by image and epoch); batch-level randomness (Mixup, CutMix, drop path,
    dropout) is drawn in each process, so it is off here. Both are killed in epoch 2: torchrun
    (--max-restarts) starts the command again and, as it carries --resume auto, the run goes on from its
    checkpoint. (With more than one process, a restart needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1:
    pytorch#135712.)"""
    flags = [*TINY, "--epochs", "3", *QUIET, "--resume", "auto"]
    launcher = ["--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    ddp = ["--output-dir", str(tmp_path / "ddp")]
    result = train_script(tmp_path, *flags, *ddp, signal_at=6, torchrun=launcher)
    assert result.returncode == 0 and "exitcode: -9" in result.stderr, result.stderr[
        -3000:
    ]  # killed, restarted
    assert (
        result.stdout.count("no checkpoint") == 1 and result.stdout.count("epoch 1 ") == 1
    )  # resumed after it
    assert epochs_in(tmp_path / "ddp") == [1, 2, 3]
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    a, b = weights(tmp_path / "ddp/checkpoint.pt"), weights(tmp_path / "one/checkpoint.pt")
    torch.manual_seed(0)
    start = create_model("vit_lite_7_4", pe="mpvg", img_size=16, dim=32, depth=2, heads=2, num_classes=16)
    assert all(
        (a[k] - start.state_dict()[k]).abs().max() > 1e-4 for k in ("head.weight", "blocks.1.attn.qkv.weight")
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_accumulated_micro_batches_make_exactly_the_large_step(tmp_path):
    """Two micro-batches of 4 give the update of one batch of 8 (float64, no BatchNorm); and a run with
    --accum-steps 2 ends with the weights of the run without, Mixup and CutMix on (they mix the step's
    whole batch; drop path and dropout, which draw per micro-batch, are off)."""
    cfg = dict(pe="mpvg", img_size=16, patch_size=8, dim=16, heads=2, depth=2, num_classes=5)
    a, b = (create_model("deit_tiny", **cfg).double().train() for _ in range(2))
    b.load_state_dict(a.state_dict())
    img, target = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(5, (8,))
    opt_a, opt_b = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05) for m in (a, b))
    loss_a = engine.train_step(a, opt_a, [(img, target)], smoothing=0.1)
    loss_b = engine.train_step(b, opt_b, [(img[:4], target[:4]), (img[4:], target[4:])], smoothing=0.1)
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-12)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)
    no_drop = ["--drop-path", "0", "--attn-drop", "0", "--epochs", "2"]
    run_train(tmp_path, *no_drop, name="whole")
    run_train(tmp_path, *no_drop, "--accum-steps", "2", name="accumulated")
    whole, accumulated = (
        weights(tmp_path / "whole/checkpoint.pt"),
        weights(tmp_path / "accumulated/checkpoint.pt"),
    )
    for k in whole:
        torch.testing.assert_close(whole[k], accumulated[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("mode", MODES)
def test_finetune_gives_a_new_head_and_a_resized_pe_in_every_mode(tmp_path, mode, capsys):
    """A 16-class, 16 px checkpoint fine-tuned at 24 px onto 100 classes (CIFAR-100's count): every weight
    but the head and pos_embed carries over; pos_embed's patch rows are resized, its class slot kept."""
    run_train(tmp_path, "--epochs", "1", "--pe", mode, name="pre")
    pre = weights(tmp_path / "pre/checkpoint.pt")
    model = create_model("vit_lite_7_4", pe=mode, img_size=24, dim=32, depth=2, heads=2)
    assert load_pretrained(model, dict(model=pre))[0] == "a new head for 100 classes"
    after = model.state_dict()
    assert all(torch.equal(after[k], pre[k]) for k in pre if not k.startswith("head.") and k != "pos_embed")
    cls = int(PE_MODES[mode]["pool"] == "cls")
    torch.testing.assert_close(after["pos_embed"][:, cls:], resize_pos_embed(pre["pos_embed"][:, cls:], 6))
    assert torch.equal(after["pos_embed"][:, :cls], pre["pos_embed"][:, :cls])
    pre_best = ["--pe", mode, "--finetune", str(tmp_path / "pre/best.pt")]
    run_train(tmp_path, *pre_best, "--img-size", "24", "--resume", "auto", "--epochs", "1", name="fine")
    assert f"--finetune {tmp_path / 'pre/best.pt'}: loaded" in capsys.readouterr().out
    run_train(tmp_path, *pre_best, "--img-size", "24", "--resume", "auto", "--epochs", "2", name="fine")
    assert epochs_in(tmp_path / "fine") == [1, 2]  # the same command again goes on: torchrun can restart it
    with pytest.raises(
        SystemExit, match=r"--finetune .*pre/best.pt is another architecture \(.*32\) there, .*48\) here"
    ):
        run_train(tmp_path, *pre_best, "--dim", "48", "--epochs", "1", name="x")


def test_finetune_across_the_zoo_resizes_each_position_table_and_head_and_names_the_rest(tmp_path, capsys):
    """Swin onto another resolution and class count: absolute_pos_embed resized to the new grid, head.fc
    new, every other weight carried; a ViT into Swin: what fits (the patch embedding) is loaded and the
    rest named; through train.py, one line says so."""
    swin = dict(patch_size=2, dim=8, heads=1, window=2)  # every stage's window 2 at either size
    pre = models.create_model("swin_tiny", img_size=32, num_classes=16, **swin)
    fine = models.create_model("swin_tiny", img_size=64, num_classes=3, **swin)
    assert load_pretrained(fine, dict(model=pre.state_dict())) == ["a new head for 3 classes"]
    before, after = pre.state_dict(), fine.state_dict()
    table = resize_pos_embed(before["absolute_pos_embed"], 32)
    torch.testing.assert_close(after.pop("absolute_pos_embed"), table)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("head."))
    vit = models.create_model("deit_tiny", img_size=32, patch_size=2, dim=8, heads=1, depth=2, num_classes=16)
    notes = load_pretrained(fine, dict(model=vit.state_dict()))
    assert notes[0].startswith("new: ") and notes[1].startswith("not used: cls_token, pos_embed, blocks.0.")
    assert torch.equal(fine.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    torch.save(dict(model=vit.state_dict()), tmp_path / "vit.pt")
    write_image_folder(tmp_path / "data")
    flags = "--data imagenet --model swin_tiny --img-size 32 --patch-size 2 --dim 8 --heads 1 --window 4"
    flags = [
        *flags.split(),
        *"--batch-size 8 --workers 0 --epochs 1 --data-path".split(),
        str(tmp_path / "data"),
    ]
    train.main([*flags, "--finetune", str(tmp_path / "vit.pt"), "--output-dir", str(tmp_path / "run")])
    assert f"--finetune {tmp_path / 'vit.pt'}: loaded; new: " in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["timm", "deit", "deit3"])
def test_finetune_from_a_timm_or_deit_checkpoint(tmp_path, layout):
    """timm's DeiT weights (timm saves the weights alone, DeiT's releases them under "model") into an MPVG
    model at another resolution and class count; pe_norm and last_pe_norm, which DeiT lacks, start new.
    timm's deit3_* have a class token but no class slot in pos_embed: all its rows are patches."""
    timm = pytest.importorskip("timm")
    small = layout == "deit3"
    theirs = "deit3_small_patch16_224" if small else "deit_tiny_patch16_224"
    state = timm.create_model(theirs, img_size=32, patch_size=8, num_classes=10, depth=2).state_dict()
    torch.save(state if layout == "timm" else {"model": state}, tmp_path / "deit.pth")
    write_image_folder(tmp_path / "data")
    flags = f"--dim {384 if small else 192} --heads {6 if small else 3} --img-size 48 --depth 2".split()
    flags += ["--epochs", "1"]
    flags += ["--lr", "1e-12", "--warmup-lr", "0", "--finetune", str(tmp_path / "deit.pth")]
    train.main(folder_run(tmp_path / "data", *flags, "--output-dir", str(tmp_path / "run")))
    after, slot = weights(tmp_path / "run/checkpoint.pt"), int(layout != "deit3")
    torch.testing.assert_close(after["blocks.1.mlp.fc1.weight"], state["blocks.1.mlp.fc1.weight"])  # lr ~ 0
    torch.testing.assert_close(
        after["pos_embed"], resize_pos_embed(state["pos_embed"][:, slot:], 6), atol=1e-6, rtol=0
    )
    assert after["head.weight"].shape[0] == 3 and "blocks.1.pe_norm.weight" in after


@pytest.mark.parametrize("mode", ["lape", "mpvg"])
def test_torch_compile_traces_every_pe_mode_in_one_graph(mode):
    """fullgraph=True: no graph break, and the traced forward and backward equal eager's. LaPE and MPVG
    between them take every branch of the forward: the class token and GAP, PE on the patches or not,
    pe_norm in every layer or from layer 1, and the Last-LN PE."""
    torch._dynamo.reset()
    model = create_model("deit_tiny", pe=mode, img_size=16, patch_size=4, dim=16, heads=2, depth=2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo's capture: no graph break
    img = torch.randn(2, 3, 16, 16)
    eager = model(img)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    traced = compiled(img)
    traced.sum().backward()
    torch.testing.assert_close(traced, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_compiled_training_evaluates_and_resumes(tmp_path, monkeypatch):
    """--compile end to end on the device data path, with a short last validation batch (padded to one
    shape, the padding not counted). The suite compiles with the aot_eager backend: dynamo traces the real
    loop, loaders and model in seconds; inductor would take minutes on a CPU."""
    compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: compile(model, backend="aot_eager", dynamic=False)
    )
    torch._dynamo.reset()
    flags = ["--device-data", "on", "--synthetic-size", "80", "--compile"]
    run_train(tmp_path, *flags, "--epochs", "1")
    run_train(tmp_path, *flags, "--epochs", "2", "--resume", "auto")
    eager = train.main(["--eval-only", "--resume", str(tmp_path / "run/checkpoint.pt")])
    last = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 2 and last["val_top1"] == pytest.approx(eager["val_top1"])
    assert last["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)  # 16 images: 16 and none padded


@pytest.mark.parametrize("device_data", ["on", "off"])
def test_every_loader_yields_plain_tensors(device_data):
    """torchvision's tv_tensors.Image must never reach the model (under dynamo in torch 2.11 it recursed
    in __torch_function__): training and validation batches, DataLoader workers and the device path."""
    args = flags.parse([*TINY, "--device-data", device_data, "--workers", "2"])[0]
    train_set, val_set = training.data.build_datasets(args, 16)
    for loader in training.data.make_loaders(args, train_set, val_set, 16, 16, torch.device("cpu"), 0, 1):
        img, target = next(iter(loader))
        assert type(img) is torch.Tensor and type(target) is torch.Tensor and img.dtype == torch.float32


@pytest.mark.parametrize("recipe", [r for r in recipes.RECIPES if r != "t2t_cifar"])
def test_the_lr_schedule_of_every_epoch_is_the_anchors_timm_scheduler(recipe):
    """Every epoch of every ImageNet and CIFAR recipe against timm's CosineLRScheduler as the anchors build
    it (t_initial = epochs - cooldown, the cooldown at lr_min after it; Swin's warmup_prefix: the cosine
    over the epochs after the warmup), for the head and a group at a hundredth of its lr alike."""
    scheduler = pytest.importorskip("timm.scheduler")
    args = flags.parse(["--recipe", recipe, "--batch-size", "1024"])[0]
    peak = args.lr * (args.batch_size / args.lr_batch_scale if args.lr_batch_scale else 1)
    groups = [dict(params=[torch.zeros(1)], lr=peak * scale) for scale in (1.0, 0.01)]
    optimizer = torch.optim.SGD(groups, lr=peak)
    start = args.warmup_epochs if args.warmup_prefix else 0
    cosine = dict(t_initial=args.epochs - args.cooldown_epochs - start, lr_min=args.min_lr)
    warmup = dict(
        warmup_t=args.warmup_epochs, warmup_lr_init=args.warmup_lr, warmup_prefix=args.warmup_prefix
    )
    timm = scheduler.CosineLRScheduler(optimizer, **cosine, **warmup)
    for epoch in range(args.epochs):
        timm.step(epoch)
        for group, scale in zip(optimizer.param_groups, (1.0, 0.01)):
            assert engine.lr_at(epoch, args, scale) == pytest.approx(group["lr"], rel=1e-12), (epoch, scale)
    if recipe == "swin":  # Swin's epoch 100: the cosine 80 epochs into its 280
        assert engine.lr_at(100, args) == pytest.approx(8.14e-4, rel=1e-3)


def test_the_t2t_transfer_schedule_is_cosine_annealing_to_an_absolute_floor():
    """T2T-ViT's transfer_learning.py: torch's CosineAnnealingLR(T_max=60, eta_min=2e-4) over the head at
    0.05 and the backbone at 5e-4: every group ends at 2e-4 (the backbone is 2.4e-4 at epoch 45)."""
    args = flags.parse(["--data", "cifar100", "--model", "t2t_vit_7"])[0]
    groups = [dict(params=[torch.zeros(1)], lr=args.lr * scale) for scale in (1.0, args.backbone_lr)]
    optimizer = torch.optim.SGD(groups, lr=args.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs, eta_min=2e-4)
    for epoch in range(args.epochs):
        for group, scale in zip(optimizer.param_groups, (1.0, args.backbone_lr)):
            assert engine.lr_at(epoch, args, scale) == pytest.approx(group["lr"], rel=1e-9), (epoch, scale)
        optimizer.step()
        cosine.step()
    assert engine.lr_at(45, args, args.backbone_lr) == pytest.approx(2.44e-4, rel=1e-3)


@pytest.mark.parametrize("recipe, decays_pos", [("deit", False), ("cifar", True)])
def test_the_optimizer_decays_what_each_anchor_decays(recipe, decays_pos):
    """Never biases or LayerNorms; pos_embed and cls_token not under DeiT (its no_weight_decay), but under
    Compact Transformers (which has no exemption list)."""
    args = flags.parse(["--recipe", recipe])[0]
    model = create_model("deit_tiny", pe="lape", depth=2, img_size=32, patch_size=16)
    optimizer = engine.build_optimizer(model, args, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, args.weight_decay) for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2} - {"pos_embed", "cls_token"}
    assert decayed == matrices | ({"pos_embed", "cls_token"} if decays_pos else set())


BASE = dict(epochs=2, warmup_epochs=1, cooldown_epochs=0, batch_size=8, model_ema=0.9)  # every phase
CHANGED = dict(  # each recipe value and another value of it
    model="deit_tiny", epochs=1, cooldown_epochs=1, batch_size=4, lr=1e-3, lr_batch_scale=4, min_lr=1e-4,
    warmup_lr=1e-4, warmup_epochs=0, weight_decay=0.5, decay_pos_embed=False, drop_path=0.3, attn_drop=0.3,
    smoothing=0.3, mixup=0.3, cutmix=0.3, randaug_magnitude=5, reprob=0.75, repeated_aug=3, crop_scale=0.5,
    hflip=0.0, eval_crop=0.875, interpolation="bilinear", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4),
    optimizer="sgd", backbone_lr=0.5, clip_grad=1e-3, model_ema=0.5, eval_ema=True, train_crop="padded",
)  # fmt: skip
AUGMENTATION = [
    "crop_scale",
    "hflip",
    "interpolation",
    "randaug_magnitude",
    "reprob",
    "mean",
    "std",
    "eval_crop",
]
FINGERPRINTS = {}  # (flags, recipe) -> fingerprint: the base runs are shared


def fingerprint(tmp_path, monkeypatch, flags: tuple, **recipe) -> list:
    """The final weights and their EMA, and every epoch's validation loss of a tiny run on the cifar recipe,
    with some of the recipe's values replaced (in RECIPES itself, not by flags)."""
    key = (flags, tuple(sorted(recipe.items())))
    if key not in FINGERPRINTS:
        for name, value in {**BASE, **recipe}.items():
            if name in ("mean", "std"):  # the normalisation, not a flag
                mean_std = recipes.NORMALISATION["cifar"]
                value = (value, mean_std[1]) if name == "mean" else (mean_std[0], value)
                monkeypatch.setitem(recipes.NORMALISATION, "cifar", value)
            else:
                monkeypatch.setitem(recipes.RECIPES["cifar"], name, value)
        tiny = ["--data", "synthetic", "--recipe", "cifar", "--synthetic-size", "16", "--img-size", "8"]
        tiny += ["--patch-size", "4", "--dim", "8", "--depth", "2", "--heads", "2", "--workers", "0", *flags]
        train.main([*tiny, "--output-dir", str(tmp_path / "run")])
        losses = [json.loads(line)["val_loss"] for line in (tmp_path / "run/metrics.jsonl").open()]
        ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
        FINGERPRINTS[key] = [ckpt["model"] | {f"ema.{k}": v for k, v in ckpt["ema"].items()}, losses]
    return FINGERPRINTS[key]


@pytest.mark.parametrize(
    "key, flags", [(k, ()) for k in CHANGED] + [(k, ("--device-data", "on")) for k in AUGMENTATION]
)
def test_every_recipe_value_changes_the_run(tmp_path, monkeypatch, key, flags):
    """No recipe value is ignored: each, changed alone, changes the weights a run ends with or what its
    validation measures; the augmentations on both loaders."""
    base = fingerprint(tmp_path / "base", monkeypatch, flags)
    changed = fingerprint(tmp_path / "changed", monkeypatch, flags, **{key: CHANGED[key]})
    same = base[1] == changed[1] and base[0].keys() == changed[0].keys()
    assert not same or any(not torch.equal(base[0][k], changed[0][k]) for k in base[0]), (
        f"{key} changes nothing"
    )


def test_training_stops_on_a_non_finite_loss_before_saving_and_a_lower_lr_goes_on(tmp_path, monkeypatch):
    """A loss that overflows in epoch 2 (here: images scaled by 1e38 from its sixth step on) stops the run
    in one line, epoch 1's checkpoint whole and the last saved; the command it names, with a lower --lr,
    goes on from there with that lr. One that overflows in epoch 1 names the command that starts again."""
    steps, step = [], engine.train_step

    def overflowing(model, optimizer, micro_batches, *args):
        steps.append(1)
        scale = 1e38 if len(steps) > 5 else 1.0
        return step(model, optimizer, [(img * scale, t) for img, t in micro_batches], *args)

    monkeypatch.setattr(engine, "train_step", overflowing)
    with pytest.raises(
        SystemExit, match="epoch 1, step 6; stopped before saving it. Start again with a lower"
    ):
        run_train(tmp_path, "--log-every", "1", "--synthetic-size", "512", *QUIET, name="early")
    assert not list((tmp_path / "early").iterdir())
    steps.clear()
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, "--epochs", "3", "--log-every", "1", *QUIET)
    message = str(stopped.value.code)
    assert re.search(r"the loss became (nan|inf) in epoch 2, step \d; stopped before saving", message)
    assert torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["epoch"] == 0
    go_on = message.split("with a lower lr: ")[1].replace("LOWER", "1e-4")
    monkeypatch.setattr(engine, "train_step", step)
    train.main(shlex.split(go_on)[2:])
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    resumed = argparse.Namespace(**ckpt["args"])
    assert ckpt["epoch"] == 2 and resumed.lr == 1e-4
    assert ckpt["history"][1]["lr"] == engine.lr_at(1, resumed) != engine.lr_at(1, flags.parse(TINY)[0])


@pytest.mark.parametrize(
    ("data", "model", "recipe"),
    [
        ("imagenet", "swin_tiny", "swin"),
        ("imagenet", "ceit_tiny", "ceit"),
        ("imagenet", "t2t_vit_7", "t2t"),
        ("cifar100", "t2t_vit_7", "t2t_cifar"),
        ("imagenet", "deit_small", "deit"),
        ("cifar100", "swin_tiny", "cifar"),
    ],
)
def test_each_model_takes_its_anchors_recipe(data, model, recipe):
    """Left out, --recipe is the model's anchor's for the data set (Table 7 with the anchor's values), else
    the data set's; the recipe's values are the run's."""
    args = flags.parse(["--data", data, "--model", model])[0]
    assert args.recipe == recipe and args.lr == recipes.RECIPES[recipe]["lr"]


def test_the_t2t_transfer_recipe_trains_the_head_at_lr_and_the_rest_at_a_hundredth(tmp_path, capsys):
    """Table 2's T2T-ViT-7: SGD with momentum 0.9, the head at --lr and every other weight at 0.01 x --lr,
    from the EMA weights of an ImageNet-style run that was judged by them."""
    small = ["--model", "t2t_vit_7", "--img-size", "32", "--synthetic-size", "16"]
    run_train(tmp_path, *small, "--recipe", "t2t", "--epochs", "1", "--repeated-aug", "1", name="pre")
    pre = torch.load(tmp_path / "pre/best.pt", weights_only=True)
    model = create_model("deit_tiny")
    args = flags.parse(["--data", "cifar100", "--model", "t2t_vit_7"])[0]
    optimizer = engine.build_optimizer(model, args, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD) and {g["momentum"] for g in optimizer.param_groups} == {0.9}
    heads = {id(p) for p in model.head.parameters()}
    for group in optimizer.param_groups:
        assert group["lr_scale"] == (1.0 if {id(p) for p in group["params"]} <= heads else 0.01)
    model = models.create_model("t2t_vit_7", pe="mpvg", img_size=32, dim=32, depth=2, heads=2, num_classes=16)
    assert "the EMA weights" in load_pretrained(model, pre)
    ema = {k.removeprefix("module."): v for k, v in pre["ema"].items()}
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items()) and pre["args"]["eval_ema"]
