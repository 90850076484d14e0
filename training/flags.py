"""The command line's plumbing: argparse with its error in one line, and the makings of the types that
check each flag's values as it is read, so that a bad value ends in one line before anything starts."""

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage of fifty flags above it
        self.exit(2, f"{self.prog}: error: {message}\n")


def typed(kind, ok, rule: str):
    """An argparse type: the text read as `kind`, refused in one line unless ok(value) (nan never is)."""

    def parse(text: str):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value: ..." names the type
    return parse


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def layer(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)
