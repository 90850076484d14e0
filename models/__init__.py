"""The paper's vision transformers, each in every PE mode: ViT/DeiT from mpvg.py, and Swin-Ti, CeiT-Ti and
T2T-ViT-7 beside it, built on mpvg.py's knobs (Table 1 and 2).

    model = create_model("swin_tiny", pe="mpvg")  # any knob of mpvg.Config (or SwinConfig) as a keyword
"""

from dataclasses import fields

import torch

from models.ceit import CEIT_TINY, CeiT, CeiTConfig
from models.swin import SWIN_TINY, SwinConfig, SwinTransformer
from models.t2t_vit import T2T_VIT_7, T2TConfig, T2TViT
from mpvg import PRESETS, Config, VisionTransformer

ARCHITECTURES = {  # name: (the model class, its config class, the preset's values)
    **{name: (VisionTransformer, Config, preset) for name, preset in PRESETS.items()},
    "swin_tiny": (SwinTransformer, SwinConfig, SWIN_TINY),
    "ceit_tiny": (CeiT, CeiTConfig, CEIT_TINY),
    "t2t_vit_7": (T2TViT, T2TConfig, T2T_VIT_7),
}


def config(model: str, **overrides):
    """The configuration of a model of ARCHITECTURES, its preset with any field overridden. A value the model
    cannot honour is refused here, in one ValueError of one line: a model built from a config never raises."""
    if model not in ARCHITECTURES:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(ARCHITECTURES)}")
    _, config_class, preset = ARCHITECTURES[model]
    if unknown := set(overrides) - {f.name for f in fields(config_class)}:
        raise ValueError(f"{model} has no {', '.join(map(repr, sorted(unknown)))}: leave it out")
    return config_class(**preset | overrides)


def create_model(model: str = "deit_tiny", **overrides):
    """A model of ARCHITECTURES, e.g. create_model("t2t_vit_7", pe="mpvg", num_classes=100)."""
    return ARCHITECTURES[model][0](config(model, **overrides))


def load_model(checkpoint, map_location="cpu"):
    """The model of a train.py checkpoint (its path, or the loaded dict), any architecture, in eval mode: its
    model_config, {"model": a name of ARCHITECTURES, **its config's fields}, is create_model's keywords."""
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location, weights_only=True)
    model = create_model(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()
