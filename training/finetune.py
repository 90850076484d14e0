"""Weights of one model into another, as DeiT's --finetune does: another resolution, class count or
architecture. Every PE mode derives its layer-wise and Last-LN PE from the one position table, so one
resize serves all; each architecture's own table (pos_embed, Swin's absolute_pos_embed) is resized."""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

POSITION_TABLES = ("pos_embed", "absolute_pos_embed")  # ViT's, CeiT's and T2T-ViT's; Swin's


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The patch rows of a learned PE, (1, n * n, D), resized bicubically to (1, grid * grid, D) for
    another image size, as DeiT fine-tunes at 384 px; a class slot is the caller's to keep."""
    n = math.isqrt(pos.shape[1])
    if n * n != pos.shape[1]:
        raise ValueError(f"a PE of {pos.shape[1]} patch rows is no square grid; drop its class slot first")
    patches = rearrange(pos if pos.dtype == torch.float64 else pos.float(), "1 (h w) d -> 1 d h w", h=n)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return rearrange(patches, "1 d h w -> 1 (h w) d").to(pos.dtype)


def fit_position_table(theirs: torch.Tensor, own: torch.Tensor, grid: int) -> torch.Tensor:
    """Their table's patch rows resized to this model's grid; a class slot (told by the rows beyond a
    square: a class or distillation slot, or none) kept, added from this model's own, or dropped."""
    extra = theirs.shape[1] - math.isqrt(theirs.shape[1]) ** 2
    slot = own.shape[1] - grid * grid  # this model's: 1 with a class token, else 0
    kept = theirs[:, :slot] if extra >= slot else own[:, :slot]
    return torch.cat([kept, resize_pos_embed(theirs[:, extra:], grid)], dim=1)


def load_pretrained(model, checkpoint: dict) -> list[str]:
    """A checkpoint's weights (train.py's and DeiT's under "model", timm's the weights alone) into a model
    of any size, class count or architecture: each weight of the same name and shape is loaded, the
    position table resized to this model's grid, a head of another class count left new; the notes
    returned name what was done and what was not loaded. Nothing that fits: ValueError, in one line."""
    state, notes = checkpoint.get("model", checkpoint), []
    if (checkpoint.get("args") or {}).get("eval_ema"):  # a train.py run judged by its EMA: those weights
        state = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}
        notes.append("the EMA weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("holds no weights: a dict of tensors, alone or under 'model'")
    own, trained = model.state_dict(), {n for n, p in model.named_parameters() if p.requires_grad}
    if not set(state) & set(own):
        raise ValueError(f"holds none of this model's weights (it has {', '.join(sorted(state)[:3])}, ...)")
    grid, state = model.cfg.img_size // model.cfg.patch_size, dict(state)
    for name in POSITION_TABLES:  # a table that is not trained (T2T-ViT's sinusoid) is the model's own
        if name in state and name in own and name in trained and state[name].shape[-1] == own[name].shape[-1]:
            state[name] = fit_position_table(state[name], own[name], grid)
    heads = [k for k in own if k.startswith("head.")]  # head.weight, or Swin's head.fc.weight
    if any(k in state and state[k].shape != own[k].shape for k in heads):
        state = {k: v for k, v in state.items() if k not in heads}
        notes.append(f"a new head for {model.cfg.num_classes} classes")
    fits = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not set(fits) - set(POSITION_TABLES):
        wrong = [
            f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in state.items() if k in own
        ]
        raise ValueError(f"is another architecture ({'; '.join(wrong[:3])}): choose a model to match")
    model.load_state_dict(fits, strict=False)
    new, unused = [k for k in own if k not in fits and k not in heads], [k for k in state if k not in fits]
    return notes + [
        f"{what}: {listed(names)}" for what, names in (("new", new), ("not used", unused)) if names
    ]


def listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
