"""The dense half (paper Tables 3-4, recipes Tables 8-9): COCO and ADE20K read from their real file formats,
scored as pycocotools and MMSegmentation score them, each head trained, interrupted and resumed exactly, and
position learnt per token at a grid other than the pretraining one: by the ViT in every PE mode but none,
and through ViT-Adapter in every mode."""

import json
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_train
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import mpvg
from dense import data, detection, evaluate
from dense import train as dense_train
from dense.adapter import build_adapter
from dense.segmentation import IGNORE, Segmenter
from mpvg import PE_MODES

TINY = [  # a tiny ViT-Adapter, narrow heads, four 64 x 64 images to train on and one to score
    *("--dim", "48", "--depth", "4", "--heads", "2", "--head-width", "16", "--crop", "64"),
    *("--synthetic-size", "4", "--workers", "0"),
]


def test_coco_polygons_rle_and_crowds_load_and_the_ground_truth_scores_ap_100(tmp_path):
    """COCO's three kinds of annotation (polygons, RLE, a crowd region in uncompressed RLE) load through
    torchvision: crowds left out of training, COCO's sparse category ids (1, 3) as labels 1..C, each mask
    inside its box; and the ground truth as Mask R-CNN's output, turned back into COCO's results, scores
    box and mask AP 100 by COCOeval (the conversion loses nothing)."""
    data.write_coco(tmp_path, sizes=(3, 3), side=64)
    train, val, classes, coco = data.load_coco(tmp_path, crop=64, seed=0)
    assert classes == ["square", "bar"] and (len(train), len(val)) == (3, 3)
    for i in range(len(train)):
        img, target = data.coco_objects(v2.Identity(), {1: 1, 3: 2}, *train.dataset[i])
        assert target["labels"].tolist() == [1, 2]
        for box, mask in zip(target["boxes"].tolist(), target["masks"]):
            x1, y1, x2, y2 = (round(v) for v in box)
            assert mask.sum() == mask[y1:y2, x1:x2].sum() > 0
        img, target = train[(i, i)]  # augmented: float image, its masks and boxes on it
        assert img.dtype == torch.float32 and target["masks"].shape[-2:] == img.shape[-2:]
        assert set(target["labels"].tolist()) <= {1, 2}
    results = []
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        masks = torch.stack([torch.from_numpy(coco.annToMask(a)).float() for a in anns])[:, None]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        labels = torch.tensor([data.categories(coco).index(a["category_id"]) + 1 for a in anns])
        found = dict(boxes=boxes, labels=labels, scores=torch.ones(len(anns)), masks=masks)
        results += evaluate.coco_results(image_id, found, data.categories(coco))
        assert val[coco.getImgIds().index(image_id)][1] == image_id
    assert evaluate.coco_ap(coco, results) == dict(box_ap=100.0, mask_ap=100.0)


def test_ade20k_label_maps_load_with_reduce_zero_label(tmp_path):
    """ADE20K's PNG label maps read as MMSegmentation's reduce_zero_label: "other" (0) becomes IGNORE and
    class k (1..150) becomes k - 1; a training sample is the crop, padded with IGNORE where the image ends."""
    for folder in ("images", "annotations"):
        (tmp_path / folder / "training").mkdir(parents=True)
    raw = torch.tensor([0, 1, 2, 150], dtype=torch.uint8).repeat_interleave(32).repeat(16, 1)  # (16, 128)
    TF.to_pil_image(raw).save(tmp_path / "annotations/training/ADE_train_00000001.png")
    image = torch.full((3, 16, 128), 200, dtype=torch.uint8)
    TF.to_pil_image(image).save(tmp_path / "images/training/ADE_train_00000001.jpg")
    img, label = data.ADE20K(tmp_path, "training")[0]
    assert img.shape == (3, 16, 128) and label.unique().tolist() == [0, 1, 149, IGNORE]
    assert torch.equal(label == IGNORE, raw == 0)
    torch.manual_seed(0)
    img, label = data.ade_train(64, img, label)  # resized to 16..64 x 128..512 (512 x 2048 at 64 / 512)
    padded = (img == 0).all(0)  # a normalised image is 0 only where padded
    assert img.shape == (3, 64, 64) and label.shape == (64, 64) and padded.any()
    assert (label[padded] == IGNORE).all() and (label[~padded] != IGNORE).any()


@given(h=st.integers(1, 100), w=st.integers(1, 100), crop=st.integers(16, 64), part=st.floats(1 / 3, 1))
def test_sliding_windows_count_every_pixel_once(h, w, crop, part):
    """MMSegmentation's sliding-window inference covers every pixel and divides each pixel's sum by the
    windows over it (crop x crop, any stride up to crop): a model that answers ones gives exactly ones (no
    pixel missed or counted twice), and one that answers its window gives back the image (each window's
    logits land where it lies; float sums of up to 9 windows: 1e-6)."""
    img, stride = torch.rand(1, 3, h, w), max(int(crop * part), 1)
    assert torch.equal(evaluate.slide(torch.ones_like, img, crop, stride), torch.ones_like(img))
    assert torch.allclose(evaluate.slide(lambda x: x, img, crop, stride), img, rtol=1e-6, atol=0)


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_each_head_interrupted_says_so_and_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys, task):
    """A step of each head, saved; an interrupt in the next ends with exit 130 and one line that names the
    checkpoint and the command that goes on; that command (given more --iters) ends with the very weights
    and optimizer state of a run never stopped: data order, augmentation, drop path and the heads' sampling
    come from the seed and the step alone. --eval-only scores best.pt's own weights, for its task and model
    only."""
    flags = ["--task", task, "--data", "synthetic", *TINY, "--eval-every", "1", "--iters", "2"]
    dense_train.main([*flags, "--output-dir", str(tmp_path / "straight")])
    step, seen = torch.optim.AdamW.step, []

    def stepping(self, *args, **kwargs):
        if len(seen) == 1:
            raise KeyboardInterrupt
        seen.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", stepping)
    with pytest.raises(SystemExit) as stopped:
        dense_train.main([*flags, "--output-dir", str(tmp_path / "stopped")])
    line = capsys.readouterr().err.strip()
    assert (
        stopped.value.code == 130 and "\n" not in line and "stopped/checkpoint.pt holds evaluation 1" in line
    )
    monkeypatch.undo()
    dense_train.main(shlex.split(line.split("Go on: ")[1])[3:])  # python -m dense.train ...
    a, b = (
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "stopped")
    )
    assert [{**m, "seconds": 0} for m in a["history"]] == [{**m, "seconds": 0} for m in b["history"]]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    states = [ckpt["optimizer"]["state"] for ckpt in (a, b)]
    assert all(torch.equal(states[0][i][k], states[1][i][k]) for i in states[0] for k in states[0][i])
    other = "ade20k" if task == "coco" else "coco"
    with pytest.raises(SystemExit, match=f"best.pt is a checkpoint of --task {task}: give --task {task}$"):
        dense_train.main(["--task", other, "--eval-only", "--resume", str(tmp_path / "stopped/best.pt")])
    evaluated = ["--task", task, "--eval-only", "--resume", str(tmp_path / "stopped/best.pt")]
    with pytest.raises(SystemExit, match="--head-width differs from the checkpoint's, which a resume keeps"):
        dense_train.main([*evaluated, "--head-width", "8"])
    score = dense_train.SCORES[task]  # scored by a fingerprint of the weights evaluated: best.pt's own

    def fingerprint(model, *rest):
        return {score: sum(v.double().sum().item() for v in model.state_dict().values())}

    monkeypatch.setattr(evaluate, f"evaluate_{task}", fingerprint)
    saved = torch.load(tmp_path / "stopped/best.pt", weights_only=True)["model"]
    assert dense_train.main(evaluated)[score] == pytest.approx(
        sum(v.double().sum().item() for v in saved.values())
    )


def quadrants(n: int, side: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images and each pixel's quadrant (0 1 / 2 3): a label that no image content tells."""
    half = torch.arange(side) >= side // 2
    label = (2 * half[:, None] + half).expand(n, side, side)
    return torch.randn(n, 3, side, side, generator=generator), label


@pytest.mark.parametrize("pe", list(PE_MODES))
def test_the_vits_tokens_know_their_place_at_another_grid_in_every_pe_mode_but_none(pe):
    """mpvg.py's ViT made for 32 px (a 2 x 2 grid), read per token at 64 px (its PE resized to 4 x 4), learns
    which of the 16 cells each token of a noise image is in: in 300 steps every PE mode gets 75% of held-out
    tokens right, where chance is 6.25%. pe="none" cannot: without a PE the ViT is blind to the order of its
    tokens, and a noise image says nothing of where a patch lies."""
    torch.manual_seed(0)
    vit = mpvg.create_model("deit_tiny", pe=pe, dim=48, depth=4, heads=2, img_size=32, drop_path=0.0)
    head, cells = torch.nn.Linear(48, 16), torch.arange(16)
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=5e-3)
    place = lambda img: head(vit.forward_features(img)[:, -16:])  # noqa: E731  (the class token set aside)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        torch.nn.functional.cross_entropy(
            place(torch.randn(8, 3, 64, 64, generator=g)).flatten(0, 1), cells.repeat(8)
        ).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        right = (
            (
                place(torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))).argmax(-1)
                == cells
            )
            .float()
            .mean()
        )
    assert right < 0.15 if pe == "none" else right > 0.75


@pytest.mark.parametrize("pe", list(PE_MODES))
def test_every_pe_mode_learns_position_through_vit_adapter_at_another_grid(pe):
    """UperNet on a tiny ViT-Adapter whose ViT was made for 32 px (a 2 x 2 grid, its PE resized to the 4 x 4
    of 64 px images) learns each pixel's quadrant on noise in 20 steps: 85% of held-out pixels right, where
    the commonest label scores 25% and one boundary alone 50%. pe="none" learns it too: ViT-Adapter is not
    blind to position without a PE, as its convolutions and deformable sampling read zeros beyond the image,
    which tells where its edges are."""
    torch.manual_seed(0)
    adapter = build_adapter(pe, dim=48, depth=4, heads=2, img_size=32, drop_path=0.0)
    model = Segmenter(adapter, 4, channels=32, aux_channels=16)
    optimizer, g = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.Generator().manual_seed(0)
    for _ in range(20):
        sum(model(*quadrants(4, 64, g)).values()).backward()
        optimizer.step()
        optimizer.zero_grad()
    img, label = quadrants(8, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.eval()(img).argmax(1) == label).float().mean() > 0.85


def test_the_recipes_are_mmcvs_schedules_and_vit_adapters_layer_decay():
    """Table 8's schedule (x 0.1 from epochs 27 and 33; 500 warmup steps from 0.001 x) and Table 9's (1500
    warmup steps from 1e-6 x, then linear to 0 at step 160k), and ViT-Adapter's segmentation groups: block
    i at 0.95 ** (12 - i), the embeddings at 0.95 ** 13, the adapter and the heads at 1; no weight decay
    on 1-D weights (its BEiT rule misses the prefixed pos_embed and level_embed, which it decays). The
    detection config's MMCV rule goes by name: the 34 1-D weights of ViT-Adapter-T whose names hold none of
    its keys decay. Mask R-CNN reads the last tokens into every level, with window attention; UperNet each
    interaction's tokens, with global attention."""
    coco, ade = (dense_train.parse(["--task", task])[0] for task in ("coco", "ade20k"))
    at = lambda args, step: dense_train.lr_at(step, args, total=160_000, per_epoch=100) / args.lr  # noqa: E731
    assert [at(coco, s) for s in (0, 250, 2699, 2700, 3300)] == pytest.approx([1e-3, 0.5005, 1, 0.1, 0.01])
    assert [at(ade, s) for s in (0, 1500, 80_000, 159_999)] == pytest.approx(
        [1e-6, 1 - 1500 / 160_000, 0.5, 1 / 160_000]
    )
    model = Segmenter(build_adapter("mpvg"), 150)
    groups = {id(p): g for g in dense_train.param_groups(model, ade) for p in g["params"]}
    for name, p in model.named_parameters():  # as ViT-Adapter's names: backbone.vit.blocks.i, ...
        if ".patch_embed." in name or name.endswith("pos_embed"):
            layer = 0
        elif ".blocks." in name:
            layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
        else:
            layer = 13
        assert groups[id(p)]["lr_scale"] == pytest.approx(0.95 ** (13 - layer)), name
        assert groups[id(p)]["weight_decay"] == (0.01 if p.ndim > 1 else 0), name
    detector = detection.build_mask_rcnn(build_adapter("mpvg", window_attn=True), 81)
    groups = {id(p): g for g in dense_train.param_groups(detector, coco) for p in g["params"]}
    exempt = ("level_embed", "pos_embed", "norm", "bias")  # the detection config's custom_keys, by name
    for name, p in detector.named_parameters():
        assert groups[id(p)]["weight_decay"] == (0 if any(k in name for k in exempt) else 0.05), name
    decayed_1d = [n for n, p in detector.named_parameters() if p.ndim == 1 and groups[id(p)]["weight_decay"]]
    assert len(decayed_1d) == 2 * 12 + 4 + 6  # LayerScale's gammas, the injectors', the prior's BatchNorms
    small = ["--dim", "48", "--depth", "4", "--heads", "2"]  # each head reads the ViT as its config does
    segmenter, detector = (
        dense_train.build_model(dense_train.parse(["--task", task, *small])[0], ["a", "b"], None)
        for task in ("ade20k", "coco")
    )
    assert (
        segmenter.backbone.add_vit_feature == "each" and detector.backbone.adapter.add_vit_feature == "last"
    )
    windows = [block.attn.window for block in detector.backbone.adapter.vit.blocks]
    assert windows == [14, 14, None, 14] and {b.attn.window for b in segmenter.backbone.vit.blocks} == {None}


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    """No COCO folder, an ADE20K folder without images, no pycocotools, one image a step for UperNet's
    batch statistics, COCO's json cut short or not COCO's, an ADE20K image without its label map, a crop
    the adapter cannot take, no --task: each a line that says what to give, and nothing written."""
    coco, ade = tmp_path / "coco", tmp_path / "ade"
    data.write_coco(coco, (2, 1), 64)
    data.write_ade20k(ade, (2, 1), 64)
    cut = coco / "annotations/instances_val2017.json"  # cut short in the middle
    cut.write_text(cut.read_text()[:300])
    empty = tmp_path / "empty"  # COCO's folders and files, its json not COCO's
    data.write_coco(empty, (2, 1), 64)
    (empty / "annotations/instances_train2017.json").write_text("{}")
    (ade / "annotations/training/ADE_training_00000002.png").unlink()
    for flags, said in [
        (["--task", "coco", "--data-path", str(tmp_path)], f"no {tmp_path}/train2017/ or "),
        (["--task", "ade20k", "--data-path", str(tmp_path)], f"no images in {tmp_path}/images/training"),
        (
            ["--task", "coco", "--data", "synthetic"],
            "COCO needs pycocotools: pip install -r requirements-dense.txt",
        ),
        (["--task", "ade20k", "--batch-size", "1"], "UperNet's pyramid pooling normalises a 1 x 1 map over"),
        (["--task", "coco", "--data-path", str(coco)], f"cannot read {cut} (JSONDecodeError: "),
        (
            ["--task", "coco", "--data-path", str(empty)],
            f"{empty}/annotations/instances_train2017.json is not COCO's",
        ),
        (
            ["--task", "ade20k", "--data-path", str(ade)],
            f"1 image(s) of {ade}/images/training without a label",
        ),
    ]:
        with (
            monkeypatch.context() as m,
            pytest.raises(SystemExit, match="^" + re.escape(f"dense.train: error: {said}")),
        ):
            if "synthetic" in flags:
                m.setitem(sys.modules, "pycocotools", None)  # as if not installed
            dense_train.main([*flags, "--output-dir", str(tmp_path / "run")])
    for flags in (["--task", "coco", "--crop", "100"], []):
        with pytest.raises(SystemExit) as refused:
            dense_train.main(flags)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and err.count("\n") == 1 and "error: " in err
    assert not (tmp_path / "run").exists()


class Oracle(torch.nn.Module):
    """A stand-in for either head that reads the synthetic sets' bright objects: for COCO one detection a
    image, the box (and mask) of channel 0's bright pixels, the square's channel; for ADE20K class 0 where
    the red channel is high, else class 1. Each image's score then depends on that image alone."""

    def forward(self, images):
        if isinstance(images, list):  # Mask R-CNN's evaluation: a list of (3, H, W) in [0, 1]
            found = []
            for img in images:
                mask = img[0] > 0.8
                ys, xs = mask.nonzero(as_tuple=True)
                box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
                found.append(
                    dict(
                        boxes=box,
                        labels=torch.tensor([1]),
                        scores=img.mean()[None],
                        masks=mask[None, None].float(),
                    )
                )
            return found
        red = images[:, :1] > 0.5  # normalised
        return torch.cat([red, ~red], 1).float()


def scores_on(rank: int, world: int, root: str, port: int, out: str):
    """Each task's scores of the Oracle from this process's shard of the validation set, combined over the
    `world` processes (gloo) as dense.train combines them; rank 0 writes them to `out`."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    scores = {}
    for task in ("coco", "ade20k"):
        load = data.load_coco if task == "coco" else data.load_ade20k
        _, val_set, classes, coco = load(Path(root) / task, 64, 0)
        shard = Subset(val_set, range(rank, len(val_set), world))
        loader = DataLoader(shard, 1, collate_fn=data.as_lists if task == "coco" else None)
        if task == "coco":
            scores[task] = evaluate.evaluate_coco(Oracle(), loader, torch.device("cpu"), coco)
        else:
            scores[task] = evaluate.evaluate_ade20k(Oracle(), loader, torch.device("cpu"), len(classes), 64)
    if rank == 0:
        Path(out).write_text(json.dumps(scores))
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_score_each_validation_image_once_as_one_does(tmp_path):
    """COCO's AP and ADE20K's mIoU of 7 validation images scored by one process, and by two that each score
    their shard (4 + 3 images) and combine them: the same figures, none of them 0 or 100."""
    data.write_coco(tmp_path / "coco", (1, 7), 64, seed=0)
    data.write_ade20k(tmp_path / "ade20k", (1, 7), 64, seed=0)
    scores_on(0, 1, str(tmp_path), 0, str(tmp_path / "one.json"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(scores_on, (2, str(tmp_path), port, str(tmp_path / "two.json")), nprocs=2)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    one, two = ({f"{t} {k}": v for t in s for k, v in s[t].items()} for s in (one, two))
    assert two == pytest.approx(one) and all(0 < v < 100 for v in one.values()), (one, two)


def test_the_segmentation_loss_is_mmsegmentations_mean_over_every_pixel():
    """MMSegmentation 0.20's cross-entropy (ViT-Adapter's pin) averages over all of a batch's pixels, those
    labelled IGNORE (ADE20K's "other", the crop's padding) adding 0: with one pixel labelled, the loss is
    its cross-entropy over the pixel count, not the cross-entropy itself."""
    torch.manual_seed(0)
    model = Segmenter(build_adapter("mpvg", dim=48, depth=4, heads=2, drop_path=0.0), 4, 32, 16).eval()
    img, labels = torch.randn(1, 3, 64, 64), torch.full((1, 64, 64), IGNORE)
    labels[0, 10, 20] = 2
    losses = model(img, labels)
    with torch.no_grad():
        logits = model(img)[0, :, 10, 20]
    pixel = torch.nn.functional.cross_entropy(logits[None], torch.tensor([2]))
    assert losses["loss_decode"].item() == pytest.approx(pixel.item() / 64**2, rel=1e-4)


def test_finetune_builds_the_vit_of_a_train_py_checkpoint_and_loads_it_whole(tmp_path, capsys):
    """Table 3's start: a train.py run (here ViT-Lite's shape: MLP ratio 2, no qkv bias; MPVG with a PE in
    every layer) into ViT-Adapter. Its width, depth and heads must be given as trained (a one-line error
    says which); the rest of its shape and its PE knobs come from its model_config, so every ViT weight
    loads (block 0's LN'_0 too) and only LayerScale is new."""
    shape = ["--img-size", "64", "--patch-size", "16", "--dim", "48", "--depth", "4", "--pe-layers", "all"]
    run_train(tmp_path, *shape, "--epochs", "1")
    ade = [
        "--task",
        "ade20k",
        "--data",
        "synthetic",
        "--synthetic-size",
        "4",
        "--crop",
        "64",
        "--workers",
        "0",
    ]
    ade += ["--head-width", "16", "--iters", "1", "--finetune", str(tmp_path / "run/best.pt")]
    with pytest.raises(
        SystemExit, match="best.pt is a ViT of --dim 48 --depth 4 --heads 2 --pe mpvg: give those$"
    ):
        dense_train.main([*ade, "--output-dir", str(tmp_path / "refused")])
    dense_train.main(
        [*ade, "--dim", "48", "--depth", "4", "--heads", "2", "--output-dir", str(tmp_path / "ade")]
    )
    loaded = next(line for line in capsys.readouterr().out.splitlines() if "loaded" in line)
    gammas = ", ".join(f"blocks.{i}.{part}.gamma" for i in range(4) for part in ("attn", "mlp"))
    assert loaded.endswith(f"loaded; new: {gammas}; not used: norm.weight, norm.bias, head.weight, head.bias")


def test_a_damaged_image_is_named_in_one_line(tmp_path):
    """A COCO image cut short, met by a loader worker in the middle of training: one line that names its
    file, from the process that met it."""
    data.write_coco(tmp_path / "coco", (4, 1), 64)
    image = tmp_path / "coco/train2017/000000000002.jpg"
    image.write_bytes(image.read_bytes()[:200])
    flags = [
        "--task",
        "coco",
        "--data-path",
        str(tmp_path / "coco"),
        *TINY,
        "--workers",
        "1",
        "--batch-size",
        "2",
    ]
    with pytest.raises(
        SystemExit, match=f"^dense.train: error: cannot read {image} \\(OSError: .*\\); replace it$"
    ):
        dense_train.main([*flags, "--iters", "4", "--output-dir", str(tmp_path / "run")])


def test_a_resume_interrupted_as_it_starts_names_its_task_and_an_older_checkpoint_is_one_line(
    tmp_path, monkeypatch, capsys
):
    """An interrupt while the processes join still gives a command that goes on (with its --task); a
    checkpoint whose flags lack one of today's is refused in one line, not an AttributeError."""
    run = str(tmp_path / "run")
    dense_train.main(["--task", "ade20k", "--data", "synthetic", *TINY, "--iters", "1", "--output-dir", run])
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(dense_train.engine, "join", lambda *args: exec("raise KeyboardInterrupt"))
        with pytest.raises(SystemExit):
            dense_train.main(["--task", "ade20k", "--resume", "auto", "--output-dir", run, "--iters", "2"])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"Go on: python -m dense.train --task ade20k --resume auto --output-dir {run}")
    )
    ckpt = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    del ckpt["args"]["add_vit_feature"]
    torch.save(ckpt, tmp_path / "run/checkpoint.pt")
    with pytest.raises(
        SystemExit, match="checkpoint.pt's flags lack --add-vit-feature: an older dense.train's$"
    ):
        dense_train.main(
            ["--task", "ade20k", "--resume", str(tmp_path / "run/checkpoint.pt"), "--iters", "2"]
        )
