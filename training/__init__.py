"""The library of train.py and the tools: the command line (flags), the data (data, device_data, mixing,
randaugment), the model's training and evaluation (engine), checkpoints and resumes (checkpoint), the
recipes, and weights carried into another model (finetune). Nothing here imports a script."""

import os


def say(line: str, result=None):
    """Print a line from rank 0 of torchrun's processes alone (or the single process); return result."""
    if os.environ.get("RANK", "0") == "0":
        print(line)
    return result


class UserError(Exception):
    """A user's error: what was wrong and what to do, in one line that each program prints as its own."""
