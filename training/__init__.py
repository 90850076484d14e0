"""The parts of training that train.py imports, one concern a module: timm's RandAugment and Mixup/CutMix
as the recipes use them, a data set held on the device and augmented there in chunks, the built-in task,
and weights carried into a model of another resolution or class count. None imports train.py.
"""
