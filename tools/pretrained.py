"""Weights of one model into another of a different resolution or class count: DeiT's --finetune, for
every PE mode. train.py imports this for --finetune; it imports neither train.py nor a script.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from tools.flags import fail
from tools.run_folder import read_checkpoint


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The patch rows of a learned PE, (1, n * n, D), resized bicubically to (1, grid * grid, D) for
    another image size, as DeiT fine-tunes at 384 px; a class slot is the caller's to keep."""
    n = math.isqrt(pos.shape[1])
    if n * n != pos.shape[1]:
        raise ValueError(f"a PE of {pos.shape[1]} patch rows is no square grid; drop its class slot first")
    patches = rearrange(pos if pos.dtype == torch.float64 else pos.float(), "1 (h w) d -> 1 d h w", h=n)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return rearrange(patches, "1 d h w -> 1 (h w) d").to(pos.dtype)


def weights_of(checkpoint: dict) -> tuple[dict, dict | None]:
    """The weights and model config (None if it has none) of a checkpoint: train.py's and DeiT's hold the
    weights under "model", some under "state_dict", timm's are the weights alone."""
    weights = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError("holds no weights that this project can read (a dict of tensors, alone or under "
                         "'model' or 'state_dict')")  # fmt: skip
    config = checkpoint.get("model_config")
    if config is not None and not isinstance(config, dict):
        raise ValueError("holds a 'model_config' that is not a dict of Config fields (train.py writes one)")
    return weights, config


def load_pretrained(model, state: dict) -> list[str]:
    """Load a checkpoint's weights into a model of another class count or resolution (DeiT's
    --finetune): the head is left new when its shape differs, pos_embed is resized to this model's
    grid (the class slot kept, added or dropped), and any weight this model lacks or the checkpoint
    lacks is named. Every PE mode derives its layer-wise and Last-LN PE from pos_embed."""
    own, notes = model.state_dict(), []
    if "pos_embed" in state and "pos_embed" in own:
        pos, had_cls = state["pos_embed"], "cls_token" in state
        grid = model.cfg.img_size // model.cfg.patch_size
        pos = resize_pos_embed(pos[:, int(had_cls) :], grid)
        if model.cls_token is not None:  # the class slot: the checkpoint's, else this model's own
            pos = torch.cat([state["pos_embed"][:, :1] if had_cls else own["pos_embed"][:, :1], pos], dim=1)
        state = {**state, "pos_embed": pos}
    if "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        notes.append(f"a new head for {model.cfg.num_classes} classes")
    wrong = [f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in state.items()
             if k in own and v.shape != own[k].shape]  # fmt: skip
    if wrong:
        raise ValueError(
            f"the checkpoint is another architecture ({'; '.join(wrong[:3])}): choose a model to match"
        )
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    notes += [f"new: {', '.join(missing)}"] if missing else []
    notes += [f"not used: {', '.join(k for k in state if k not in own)}"] if set(state) - set(own) else []
    return notes


def read(path: str) -> tuple[dict, dict | None]:
    """--finetune's file: its weights and model config (see weights_of), or one line that says what is
    wrong with it."""
    checkpoint = read_checkpoint(Path(path), set())  # a FolderError: its line, as train.py's main says it
    try:
        return weights_of(checkpoint)
    except ValueError as e:
        fail(f"--finetune {path} {e}")


def finetune(model, weights: dict, path: str):
    """load_pretrained, with one line for weights that do not fit and, from rank 0, what was loaded."""
    device = next(model.parameters()).device
    try:
        notes = load_pretrained(model, {k: v.to(device) for k, v in weights.items()})
    except ValueError as e:
        fail(f"--finetune {path}: {e}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"--finetune {path}: loaded" + "".join(f"; {n}" for n in notes))
