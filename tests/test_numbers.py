"""The numbers a run reports, each against the promise of its anchor (DeiT's engine.py and main.py, timm's
train.py and utilities, torchvision's samplers and transforms): the evaluation's loss, top-1 and top-5 over
every validation image; the data's order and the randomness of each epoch, chunk and process; and the
recipe's arithmetic (the lr's batch scaling, gradient clipping, random erasing's rate, the EMA, the
position table resized for fine-tuning)."""

import copy
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import QUIET, REPO, TINY, run_train
from hypothesis import example, given
from hypothesis import strategies as st

import train
from mpvg import create_model
from training import data, device_data, engine, flags
from training.data import Augmented, EpochSampler, build_transforms, make_loaders
from training.finetune import load_pretrained, resize_pos_embed

CPU = torch.device("cpu")
SMALL = ["--dim", "8", "--depth", "1", "--heads", "2"]  # TINY's data and recipe, a smaller model
AT_PEAK = ["--warmup-epochs", "0", "--cooldown-epochs", "0"]  # a run's first epoch at the peak lr


# The evaluation: DeiT's engine.evaluate, timm's accuracy(output, target, topk=(1, 5)).


def ranked_logits(ranks: list[int], classes: int, seed: int):
    """Logits and targets in which image i's class has the ranks[i]-th highest logit (0: the highest); the
    logits are classes - 1, ..., 1, 0 in a random order of the classes."""
    g = torch.Generator().manual_seed(seed)
    logits, targets = torch.empty(len(ranks), classes, dtype=torch.float64), []
    for i, rank in enumerate(ranks):
        order = torch.randperm(classes, generator=g)  # order[k]: the class with the k-th highest logit
        logits[i, order] = torch.arange(classes - 1, -1, -1, dtype=torch.float64)
        targets.append(int(order[rank]))
    return logits, torch.tensor(targets)


@given(st.lists(st.integers(0, 7), min_size=1, max_size=20), st.integers(1, 8), st.integers(0, 2**16))
@example(ranks=[1, 2, 3, 4, 5, 0], batch=6, seed=0)  # top-5 is not top-1: the class 2nd to 5th best counts
@example(ranks=[0, 0, 0, 0, 7], batch=4, seed=0)  # a short last batch of the worst image: it counts
def test_evaluation_is_the_mean_over_every_image_of_its_loss_top1_and_top5(ranks, batch, seed):
    """An image counts for top-1 when its class has the highest logit, for top-5 when its class is among the
    5 highest; loss, top-1 and top-5 are means over every image, a short last batch counted image by image
    (as it is, or padded to one shape for a compiled model). Expected values from the ranks alone: the
    cross-entropy of an image whose class is k-th best of logits 7..0 is logsumexp(0..7) - (7 - k)."""
    logits, targets = ranked_logits(ranks, 8, seed)
    batches = [(logits[i : i + batch], targets[i : i + batch]) for i in range(0, len(ranks), batch)]
    ranks_ = torch.tensor(ranks, dtype=torch.float64)
    loss = torch.logsumexp(torch.arange(8.0, dtype=torch.float64), 0) - 7 + ranks_.mean()
    top1, top5 = 100 * float((ranks_ == 0).double().mean()), 100 * float((ranks_ < 5).double().mean())
    model = torch.nn.Identity()  # its logits are its input
    for padded_to in (None, batch):
        found = engine.evaluate(model, batches, CPU, padded_to)
        assert found["val_loss"] == pytest.approx(float(loss), rel=1e-6)  # float32 cross-entropy
        assert (found["val_top1"], found["val_top5"]) == pytest.approx((top1, top5), rel=1e-12, abs=1e-12)


def shard_images(args, world: int) -> Counter:
    """How many times each validation image comes out of the validation loaders that make_loaders gives
    ranks 0..world-1 (batches of 4: the shards of 13 images end in a short batch), told apart by comparing
    each image with the evaluation transform of every image of the set."""
    train_set, val_set = data.build_datasets(args, 16)
    val_tf = build_transforms(args, 16)[1]
    every = torch.stack([val_tf(val_set[i][0]) for i in range(len(val_set))]).flatten(1)
    seen = Counter()
    for rank in range(world):
        _, val_loader = make_loaders(args, train_set, val_set, 16, 4, CPU, rank, world)
        for img, _ in val_loader:
            distance = torch.cdist(img.flatten(1), every)  # (batch, images)
            assert (distance.min(dim=1).values < 1e-3).all()  # each is one of the set's images
            seen.update(distance.argmin(dim=1).tolist())
    return seen


@pytest.mark.parametrize("device_data", ["off", "on"])
def test_the_ranks_validation_shards_cover_every_image_once(device_data):
    """Each process evaluates its own shard and the sums are reduced over the processes: whatever their
    number, each validation image is evaluated exactly once, a shard's short last batch included (torch's
    DistributedSampler, which DeiT's --dist-eval shards with, pads the shards with repeats, and DeiT warns
    that this alters the numbers). 65 synthetic images: 13 to validate, in shards of 7 + 6 and 5 + 4 + 4."""
    args = flags.parse([*TINY, "--synthetic-size", "65", "--device-data", device_data])[0]
    for world in (1, 2, 3):
        assert shard_images(args, world) == Counter(range(13)), f"{world} process(es)"


# The data's order and the randomness of each epoch, chunk and process.


def test_each_epoch_is_a_new_order_and_a_resume_deals_the_unbroken_runs(tmp_path, monkeypatch):
    """torch's DistributedSampler, which DeiT's main.py tells the epoch (sampler.set_epoch) every epoch:
    each epoch a new shuffle of every training image, each image keyed by that epoch for its augmentation;
    and a run resumed after epoch 1 deals epoch 2 exactly as a run never stopped."""
    epochs, getitem, one_epoch = [], Augmented.__getitem__, engine.train_one_epoch

    def recorded_item(self, key):
        if isinstance(key, tuple):  # (index, epoch, copy): a training image; a plain index: validation
            epochs[-1].append(key)
        return getitem(self, key)

    def recorded_epoch(*args, **kwargs):
        epochs.append([])
        return one_epoch(*args, **kwargs)

    monkeypatch.setattr(Augmented, "__getitem__", recorded_item)
    monkeypatch.setattr(engine, "train_one_epoch", recorded_epoch)
    small = [*SMALL, *QUIET, "--synthetic-size", "16", "--batch-size", "8"]  # every image once an epoch
    run_train(tmp_path, *small, "--epochs", "2", name="unbroken")
    unbroken = epochs[:]
    epochs.clear()
    run_train(tmp_path, *small, "--epochs", "1", name="resumed")
    train.main(["--resume", "auto", "--output-dir", str(tmp_path / "resumed"), "--epochs", "2"])
    orders = [[index for index, _, _ in keys] for keys in unbroken]
    assert [sorted(order) for order in orders] == [list(range(16))] * 2
    assert orders[0] != orders[1]
    assert [{e for _, e, _ in keys} for keys in unbroken] == [{0}, {1}]
    assert epochs == unbroken


def one_image_augmented(*keys_of_ranks, chunk=8192) -> torch.Tensor:
    """One noise image, the whole data set of 64 copies, through the device loader with the cifar recipe's
    augmentations (batches of 16, epoch 0), for each rank's EpochSampler: every image it yields."""
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images, labels = image.repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long)
    augment = device_data.BatchAugment(flags.parse(["--recipe", "cifar"])[0], 16)
    out = []
    for sampler in keys_of_ranks:
        loader = device_data.DeviceLoader(images, labels, sampler, 16, augment, seed=0, chunk=chunk)
        out += [x for x, _ in loader]
    return torch.cat(out)


def distinct(images: torch.Tensor) -> int:
    return len({hash(x.numpy().tobytes()) for x in images})


def test_the_device_loader_draws_anew_for_every_batch_chunk_and_rank():
    """torchvision's transforms draw for each image anew, and DeiT seeds each process with seed + rank: one
    image, repeated 64 times, comes out 64 ways (a few may coincide; a repeat of a chunk or a batch would
    leave 32 or 16), whether an epoch is augmented as one chunk, as chunks of two batches or of one; and
    the two ranks of a 2-process run draw differently (rank-blind, they would leave 32)."""
    for chunk in (8192, 32, 16):
        assert distinct(one_image_augmented(EpochSampler(64, 1, 0, seed=0), chunk=chunk)) > 60, chunk
    ranks = [EpochSampler(64, 2, rank, seed=0) for rank in (0, 1)]
    assert distinct(one_image_augmented(*ranks)) > 60


# One run on 2 processes under torchrun (gloo), recorded in each process: what its optimizer steps with
# and where its generator (dropout, drop path, Mixup) starts each epoch.

RECORDER = """
import json, os, runpy, sys
import torch
import training.engine
record, step, one_epoch = dict(lr=[], draws=[]), torch.optim.AdamW.step, training.engine.train_one_epoch
def stepped(self, *args, **kwargs):
    record["lr"].append([group["lr"] for group in self.param_groups])
    return step(self, *args, **kwargs)
def epoch(*args, **kwargs):
    with torch.random.fork_rng(devices=[]):  # a look at the generator, which the run then draws from
        record["draws"].append(torch.rand(4).tolist())
    return one_epoch(*args, **kwargs)
torch.optim.AdamW.step, training.engine.train_one_epoch = stepped, epoch
out, sys.argv = sys.argv[1], ["train.py", *sys.argv[2:]]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
"""
SCALED = [*SMALL, *AT_PEAK, "--synthetic-size", "32", "--epochs", "1"]
SCALED += ["--lr", "1e-3", "--lr-batch-scale", "8"]  # at TINY's global batch of 16: an lr of 2e-3


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The run of SCALED on 2 processes: the launcher's result and each rank's record."""
    tmp = tmp_path_factory.mktemp("two_processes")
    (tmp / "recorder.py").write_text(RECORDER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv = [*TINY, *SCALED, "--output-dir", str(tmp / "run")]
    command = [*launch, str(tmp / "recorder.py"), str(tmp), *argv]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert all((tmp / f"rank{r}.json").exists() for r in (0, 1)), done.stderr[-3000:]
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    return done, ranks, json.loads((tmp / "run/metrics.jsonl").read_text())


def test_the_lr_is_scaled_by_the_global_batch_on_any_number_of_processes(
    two_processes, tmp_path, monkeypatch
):
    """DeiT: lr = --lr x batch_size x world_size / 512, the global batch; so a run on 2 processes steps at
    the lr of one process with the same global batch, --lr x 16 / 8, in every rank and every group, and
    reports it."""
    _, ranks, reported = two_processes
    one, step = [], torch.optim.AdamW.step

    def stepped(self, *args, **kwargs):
        one.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", stepped)
    alone = run_train(tmp_path, *SCALED)
    assert len(one) == 2 and all(lr == pytest.approx(2e-3, rel=1e-12) for lrs in one for lr in lrs)
    assert ranks[0]["lr"] == ranks[1]["lr"] == one
    assert reported["lr"] == alone["lr"] == pytest.approx(2e-3, rel=1e-12)


def test_each_process_draws_its_own_dropout_drop_path_and_mixup(two_processes):
    """DeiT seeds each process with seed + rank (and nanoGPT offsets its seed by rank): the generator that
    dropout, drop path and Mixup draw from starts each epoch elsewhere on each rank."""
    _, ranks, _ = two_processes
    assert len(ranks[0]["draws"]) == len(ranks[1]["draws"]) == 1
    assert ranks[0]["draws"] != ranks[1]["draws"]


def test_a_run_on_two_processes_that_finishes_exits_0(two_processes):
    """A run that trains all its epochs ends with exit 0 on every process: torchrun reports it done."""
    done, _, _ = two_processes
    assert done.returncode == 0, done.stderr[-3000:]


# The recipe's arithmetic.


@given(st.floats(0.05, 20.0), st.integers(0, 2**16))
def test_clipping_scales_the_whole_gradient_to_norm_c_keeping_its_direction(ratio, seed):
    """timm's --clip-grad in its default mode, "norm" (DeiT, Swin: clip_grad_norm_): the gradient the
    optimizer steps with has the global norm min(c, its norm) and the direction of the unclipped one."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    img, target = torch.randn(8, 6, dtype=torch.float64), torch.randint(3, (8,))

    def stepped_with(clip: float) -> torch.Tensor:
        trained = copy.deepcopy(model)
        optimizer, seen = torch.optim.SGD(trained.parameters(), lr=0.0), []
        step = optimizer.step

        def capture(*args, **kwargs):
            seen.append(torch.cat([p.grad.flatten() for p in trained.parameters()]))
            return step(*args, **kwargs)

        optimizer.step = capture
        engine.train_step(trained, optimizer, [(img, target)], smoothing=0.0, clip=clip)
        return seen[0]

    free = stepped_with(0.0)
    c = ratio * float(free.norm())
    clipped = stepped_with(c)
    norm = pytest.approx(min(c, float(free.norm())), rel=1e-9, abs=1e-6)  # torch divides by norm + 1e-6
    assert float(clipped.norm()) == norm
    torch.testing.assert_close(clipped / clipped.norm(), free / free.norm(), rtol=1e-9, atol=1e-12)


def binomial_range(n: int, p: float, alpha: float = 1e-6) -> tuple[int, int]:
    """The counts lo..hi that Binomial(n, p) falls outside with probability alpha at most (alpha / 2 a
    side)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    pmf = torch.distributions.Binomial(n, torch.tensor(p, dtype=torch.float64)).log_prob(k).exp()
    below, above = pmf.cumsum(0), pmf.flip(0).cumsum(0).flip(0)  # P(X <= k), P(X >= k)
    return int((below > alpha / 2).nonzero()[0]), int((above > alpha / 2).nonzero()[-1])


def cifar(*extra):
    """The cifar recipe's flags at --reprob 0.25, RandAugment off (its rotations fill a grey image's corners
    with another colour)."""
    return flags.parse(["--recipe", "cifar", "--reprob", "0.25", "--randaug-magnitude", "0", *extra])[0]


GREY = torch.full((3, 16, 16), 128, dtype=torch.uint8)  # crops, flips and resizes leave it one colour


def erased(images: torch.Tensor) -> int:
    """How many of the augmented images are erased: not one colour a channel (the noise never is)."""
    return int((images != images[..., :1, :1]).flatten(1).any(dim=1).sum())


def erased_per_image(n: int) -> int:
    """Of n grey images through build_transforms' training transform (the DataLoader path)."""
    augmented = Augmented([(GREY, 0)] * n, build_transforms(cifar(), 16)[0], seed=0)
    return erased(torch.stack([augmented[(i, 0, 0)][0] for i in range(n)]))


def erased_on_the_device(n: int) -> int:
    """Of n grey images through BatchAugment (the device path)."""
    images = GREY.repeat(n, 1, 1, 1)
    return erased(device_data.BatchAugment(cifar(), 16)(images, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("count, n", [(erased_per_image, 400), (erased_on_the_device, 2000)])
def test_random_erasing_erases_a_share_p_of_the_images(count, n):
    """timm's and torchvision's RandomErasing(p): an image is erased with probability p (10 tries find a
    box that fits all but ~1e-19 of the time at 16 px). At p = 0.25 the count lies in the range that
    Binomial(n, 0.25) leaves with probability 1e-6, a range that Binomial(n, 0.75) reaches with less."""
    lo, hi = binomial_range(n, 0.25)
    assert binomial_range(n, 0.75)[0] > hi  # the test tells p from 1 - p
    assert lo <= count(n) <= hi, (lo, hi)


def ema_run(tmp_path, monkeypatch, *extra) -> tuple[list[dict], dict]:
    """A run of one epoch at an lr of 0.01 with --model-ema 0.5: every floating entry of the model's state
    (weights, and BatchNorm's running statistics) before its first optimizer step and after each, and the
    EMA it saved."""
    states, step = [], engine.train_step

    def floats(model) -> dict:
        return {
            k: v.detach().clone().double() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    def recorded(model, *args, **kwargs):
        if not states:  # the start: the weights the EMA begins as
            states.append(floats(model))
        loss = step(model, *args, **kwargs)
        states.append(floats(model))
        return loss

    monkeypatch.setattr(engine, "train_step", recorded)
    run_train(tmp_path, *QUIET, *AT_PEAK, "--lr", "0.01", "--epochs", "1", "--model-ema", "0.5", *extra)
    ema = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)["ema"]
    return states, {k.removeprefix("module."): v.double() for k, v in ema.items() if k.startswith("module.")}


def by_hand(states: list[dict], decay: float) -> dict:
    """timm's ModelEmaV2: the EMA starts as the weights, then ema = decay ema + (1 - decay) weights."""
    ema = states[0]
    for state in states[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * v for k, v in state.items()}
    return ema


def test_the_ema_is_updated_once_per_optimizer_step_under_accumulation(tmp_path, monkeypatch):
    """timm's train.py updates the EMA after each optimizer step, not each micro-batch: with --accum-steps 2
    the EMA after the epoch's 4 steps is the EMA of the weights after each of them, decay^4 of the start."""
    steps = "--synthetic-size 32 --batch-size 8 --accum-steps 2".split()
    states, ema = ema_run(tmp_path, monkeypatch, *SMALL, *steps)
    assert len(states) == 5  # the start, and 4 steps of 2 micro-batches of 4
    moved = [(b["head.weight"] - a["head.weight"]).abs().max() for a, b in zip(states, states[1:])]
    assert min(moved) > 1e-3  # each step tells itself from the others, far beyond the tolerance
    expected = by_hand(states, 0.5)
    assert ema.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_the_ema_averages_batchnorms_running_statistics(tmp_path, monkeypatch):
    """timm's ModelEma, which DeiT's and CeiT's main.py train with, averages every floating entry of the
    state, buffers as weights: the EMA's BatchNorm running mean and variance are the EMA of the model's,
    which move at every step."""
    ceit = "--model ceit_tiny --synthetic-size 16 --batch-size 8".split()
    states, ema = ema_run(tmp_path, monkeypatch, *SMALL, *ceit)
    statistics = [k for k in states[0] if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(states[0][k], states[-1][k]) for k in statistics)
    expected = by_hand(states, 0.5)
    for k in statistics:
        torch.testing.assert_close(ema[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


# Each axis's bicubic weights from 2 to 4 pixels, by hand: Keys' cubic convolution with a = -0.75 (torch's,
# so DeiT's and timm's), pixel centres at (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 of the input, taps
# beyond its edges read the edge pixel. E.g. at -0.25: taps at -2, -1, 0, 1 weigh -9, 67, 225, -27 / 256.
BICUBIC_2_TO_4 = torch.tensor([[283, -27], [198, 58], [58, 198], [-27, 283]], dtype=torch.float64) / 256


def test_finetune_resizes_the_position_table_bicubically_as_deit():
    """DeiT's --finetune at another resolution (and timm's resample_abs_pos_embed): the table's patch rows
    interpolated bicubically (F.interpolate, align_corners=False), its class slot kept. From a 2 x 2 grid
    to 4 x 4 each channel of the table P becomes M P M^T, M the weights above."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 4, 3, dtype=torch.float64, generator=g)  # (1, 2 * 2, D)
    grid = table[0].reshape(2, 2, 3).permute(2, 0, 1)  # (D, 2, 2)
    expected = (BICUBIC_2_TO_4 @ grid @ BICUBIC_2_TO_4.T).permute(1, 2, 0).reshape(1, 16, 3)
    torch.testing.assert_close(resize_pos_embed(table, 4), expected, rtol=0, atol=1e-12)
    vit = dict(pe="default", patch_size=8, dim=3, heads=1, depth=1, num_classes=3)  # a class token: a slot
    small, large = (
        create_model("deit_tiny", img_size=16, **vit),
        create_model("deit_tiny", img_size=32, **vit),
    )
    with torch.no_grad():
        small.pos_embed[:, 1:] = table.float()
    load_pretrained(large, dict(model=small.state_dict()))
    torch.testing.assert_close(large.pos_embed[:, 1:], expected.float(), rtol=0, atol=1e-6)
    assert torch.equal(large.pos_embed[:, :1], small.pos_embed[:, :1])
