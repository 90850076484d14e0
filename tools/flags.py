"""Command-line plumbing shared by train.py and the scripts in tools/: the one-line error that a user's
mistake ends in, flag types, help that says where a default comes from, and range checks. train.py
imports this; it imports nothing of the project's back.
"""

from __future__ import annotations

import argparse
import math
import os

PROG = "train.py"  # what errors begin with; a script of tools/ sets its own name here


def fail(message: str, every_rank: bool = False):
    """A user error: one clear line (from rank 0 only, unless the error is one rank's), no traceback."""
    raise SystemExit(f"{PROG}: error: {message}" if every_rank or int(os.environ.get("RANK", 0)) == 0 else 1)


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "false", "0", "no"):
        return text.lower() in ("true", "1", "yes")
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def layer_or_none(text: str) -> int | str:
    return "none" if text.lower() == "none" else int(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one; flags whose default comes from elsewhere say so."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False  # not `in (None, False)`: 0 == False
        return action.help if unset else super()._get_help_string(action)


def out_of_range(args: argparse.Namespace, ranges: dict[str, str]) -> str | None:
    """The first flag whose value lies outside its interval in `ranges` ("[0, 1)": [ and ] include the
    bound, ( and ) exclude it), said in one line; None when every value is within."""
    for key, interval in ranges.items():
        value = getattr(args, key, None)
        if value is None:
            continue
        low, high = (float(b) for b in interval[1:-1].split(","))
        ok = math.isfinite(value) and (low <= value if interval[0] == "[" else low < value)
        if not (ok and (value <= high if interval[-1] == "]" else value < high)):
            return f"--{key.replace('_', '-')} must be in {interval}, got {value}"
    return None
