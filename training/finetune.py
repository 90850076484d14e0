"""Weights of one model into another of a different resolution or class count, as DeiT's --finetune does,
for every PE mode: each mode derives its layer-wise and Last-LN PE from pos_embed, so one resize serves all.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """The patch rows of a learned PE, (1, n * n, D), resized bicubically to (1, grid * grid, D) for
    another image size, as DeiT fine-tunes at 384 px; a class slot is the caller's to keep."""
    n = math.isqrt(pos.shape[1])
    if n * n != pos.shape[1]:
        raise ValueError(f"a PE of {pos.shape[1]} patch rows is no square grid; drop its class slot first")
    patches = rearrange(pos if pos.dtype == torch.float64 else pos.float(), "1 (h w) d -> 1 d h w", h=n)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return rearrange(patches, "1 d h w -> 1 (h w) d").to(pos.dtype)


def load_pretrained(model, checkpoint: dict) -> list[str]:
    """A checkpoint's weights (train.py's and DeiT's under "model", timm's the weights alone) into a model
    of another class count or resolution: the head stays new when its shape differs, pos_embed is resized
    to this model's grid (a class slot, told by its rows, kept, added or dropped), and weights that only
    one side has are named in the notes returned. Weights that do not fit: ValueError, in one line."""
    state, notes = checkpoint.get("model", checkpoint), []
    if (checkpoint.get("args") or {}).get("eval_ema"):  # a train.py run judged by its EMA: those weights
        state = {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k != "n_averaged"}
        notes.append("the EMA weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("holds no weights: a dict of tensors, alone or under 'model'")
    own = model.state_dict()
    if not set(state) & set(own):
        raise ValueError(f"holds none of this model's weights (it has {', '.join(sorted(state)[:3])}, ...)")
    if "pos_embed" in state and "pos_embed" in own:
        pos, grid = state["pos_embed"], model.cfg.img_size // model.cfg.patch_size
        extra = pos.shape[1] - math.isqrt(pos.shape[1]) ** 2  # a class slot, DeiT's distillation one, none
        patches = resize_pos_embed(pos[:, extra:], grid)
        if model.cls_token is not None:  # the class slot: the checkpoint's, else this model's own
            patches = torch.cat([pos[:, :1] if extra else own["pos_embed"][:, :1], patches], dim=1)
        state = {**state, "pos_embed": patches}
    if "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        notes.append(f"a new head for {model.cfg.num_classes} classes")
    wrong = [
        f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"is another architecture ({'; '.join(wrong[:3])}): choose a model to match")
    missing, _ = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    notes += [f"new: {', '.join(missing)}"] if missing else []
    notes += [f"not used: {', '.join(k for k in state if k not in own)}"] if set(state) - set(own) else []
    return notes
