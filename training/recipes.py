"""The recipes of train.py: the paper's Table 7 with each anchor's values, a dict of flag values each, and
which recipe a data set (and a model on it) takes when --recipe is left out. docs/training.md cites each
value; where Table 7 and an anchor differ, the anchor's value is here and the docs say so."""

ADAMW = dict(optimizer="adamw", backbone_lr=1.0, clip_grad=0.0, model_ema=0.0, eval_ema=False)
ADAMW |= dict(train_crop="resized", warmup_prefix=False)

# Paper Table 7 with the anchors' values: facebookresearch/deit main.py (ImageNet) and
# SHI-Labs/Compact-Transformers configs/datasets/cifar100.yml (CIFAR-100); for the other architectures
# microsoft/Swin-Transformer config.py, coeusguo/ceit main.py and yitu-opensource/T2T-ViT main.py and
# transfer_learning.py. docs/training.md cites each row.
RECIPES = {
    "deit": dict(
        model="deit_tiny", epochs=300, cooldown_epochs=0, batch_size=1024, lr=5e-4, lr_batch_scale=512,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, weight_decay=0.05, decay_pos_embed=False,
        drop_path=0.1, attn_drop=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=3, crop_scale=0.08, hflip=0.5, eval_crop=0.875, interpolation="bicubic",
        **ADAMW,
    ),
    "cifar": dict(
        model="vit_lite_7_4", epochs=310, cooldown_epochs=10, batch_size=128, lr=6e-4, lr_batch_scale=0,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=10, weight_decay=0.06, decay_pos_embed=True,
        drop_path=0.1, attn_drop=0.1, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=1, crop_scale=0.8, hflip=0.5, eval_crop=1.0, interpolation="random",
        **ADAMW,
    ),
    # The built-in task (--data synthetic): CPU minutes, and nothing that moves or mixes pixels.
    "synthetic": dict(
        model="vit_lite_7_4", epochs=10, cooldown_epochs=0, batch_size=64, lr=1e-3, lr_batch_scale=0,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=1, weight_decay=0.05, decay_pos_embed=False,
        drop_path=0.0, attn_drop=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug_magnitude=0, reprob=0.0,
        repeated_aug=1, crop_scale=1.0, hflip=0.0, eval_crop=1.0, interpolation="bicubic",
        **ADAMW,
    ),
    # Swin's lr, warmup lr and min lr all scale by batch / 512: these are their values at batch 1024.
    "swin": dict(
        model="swin_tiny", epochs=300, cooldown_epochs=0, batch_size=1024, lr=5e-4, lr_batch_scale=512,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=20, weight_decay=0.05, decay_pos_embed=False,
        drop_path=0.2, attn_drop=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=1, crop_scale=0.08, hflip=0.5, eval_crop=0.875, interpolation="bicubic",
        **ADAMW | dict(clip_grad=5.0, warmup_prefix=True),  # config.py: WARMUP_PREFIX, the cosine after it
    ),
    "ceit": dict(
        model="ceit_tiny", epochs=300, cooldown_epochs=0, batch_size=1024, lr=5e-4, lr_batch_scale=512,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=5, weight_decay=0.05, decay_pos_embed=False,
        drop_path=0.1, attn_drop=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=3, crop_scale=0.08, hflip=0.5, eval_crop=0.875, interpolation="bicubic",
        **ADAMW | dict(model_ema=0.99996),
    ),
    "t2t": dict(
        model="t2t_vit_7", epochs=310, cooldown_epochs=10, batch_size=512, lr=1e-3, lr_batch_scale=0,
        min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=10, weight_decay=0.03, decay_pos_embed=False,
        drop_path=0.1, attn_drop=0.0, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_magnitude=9, reprob=0.25,
        repeated_aug=1, crop_scale=0.08, hflip=0.5, eval_crop=0.9, interpolation="random",
        **ADAMW | dict(model_ema=0.99996, eval_ema=True),
    ),
    # Table 2's T2T-ViT-7: fine-tuned from an ImageNet run (--finetune), CIFAR-100 resized to 224 px.
    "t2t_cifar": dict(
        model="t2t_vit_7", epochs=60, cooldown_epochs=0, batch_size=128, lr=0.05, lr_batch_scale=0,
        min_lr=2e-4, warmup_lr=0.0, warmup_epochs=0, weight_decay=5e-4, decay_pos_embed=True,
        drop_path=0.1, attn_drop=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug_magnitude=0, reprob=0.0,
        repeated_aug=1, crop_scale=1.0, hflip=0.5, eval_crop=1.0, interpolation="bilinear",
        **ADAMW | dict(optimizer="sgd", backbone_lr=0.01, train_crop="padded"),
    ),
}  # fmt: skip
IMAGENET = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALISATION = {  # each recipe's (mean, std) of the images' channels: not flags, the data's own
    **dict.fromkeys(("deit", "swin", "ceit", "t2t"), IMAGENET),
    "cifar": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "synthetic": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "t2t_cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # transfer_learning.py's
}
DATA = {"cifar100": "cifar", "imagenet": "deit", "synthetic": "synthetic"}  # each data set's recipe
MODEL_RECIPES = {  # where a model has its anchor's recipe for a data set
    ("imagenet", "swin_tiny"): "swin",
    ("imagenet", "ceit_tiny"): "ceit",
    ("imagenet", "t2t_vit_7"): "t2t",
    ("cifar100", "t2t_vit_7"): "t2t_cifar",
}
