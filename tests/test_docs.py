"""The README and docs/: their Python runs as printed, their commands name scripts and flags that exist,
and their links lead somewhere."""

import re
import shlex

import pytest
from conftest import REPO

from dense import train as dense_train
from tools import analyze, benchmark, dense_benchmark, speed, workshop
from training import flags

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(language: str) -> list[str]:
    return [b.split("```", 1)[0] for page in PAGES for b in page.read_text().split(f"```{language}\n")[1:]]


def test_the_python_of_the_readme_and_the_docs_runs(tmp_path, monkeypatch):
    """What a reader will paste: every Python block as printed, in an empty folder."""
    snippets = blocks("python")
    assert snippets
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (8, 1000) and namespace["x_3"].shape == (8, 196, 192)


def commands() -> list[tuple[str, list[str]]]:
    """Every `python train.py`, `torchrun ... train.py`, `python -m tools.NAME` or `-m dense.train` command of
    the pages, in shell blocks or inline code, as (script, its flags)."""
    spans = [c for page in PAGES for c in re.findall(r"`((?:python|torchrun) [^`]*)`", page.read_text())]
    inline = [" ".join(c.split()) for c in spans]  # a span the page's lines wrap is one command
    found = []
    for line in "\n".join(blocks("bash") + inline).replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("#", 1)[0])
        if not words or words[0] not in ("python", "torchrun") or "..." in words:
            continue
        if "-m" in words and words[words.index("-m") + 1].startswith(("tools.", "dense.")):
            at = words.index("-m") + 1
        elif "train.py" in words:
            at = words.index("train.py")
        else:
            continue
        found.append((words[at], words[at + 1 :]))
    return found


def test_every_documented_command_parses():
    """Each names a script that exists and flags that script takes; every script is documented."""

    def tool(module):
        return lambda argv: flags.build_parser().parse_args(module.build_parser().parse_known_args(argv)[1])

    parsers = {
        "train.py": lambda argv: flags.build_parser().parse_args(argv),
        "tools.benchmark": benchmark.parse_args,
        "tools.analyze": tool(analyze),
        "tools.workshop": lambda argv: workshop.build_parser().parse_args(argv),
        "tools.speed": lambda argv: speed.build_parser().parse_args(argv),
        "tools.dense_benchmark": lambda argv: dense_train.build_parser().parse_args(
            ["--task", "coco", *dense_benchmark.build_parser().parse_known_args(argv)[1]]
        ),
        "dense.train": lambda argv: dense_train.build_parser().parse_args(argv),
    }
    found = commands()
    assert set(parsers) == {script for script, _ in found}
    for script, argv in found:
        if "--help" in argv:
            with pytest.raises(SystemExit) as printed:
                parsers[script](argv)
            assert printed.value.code == 0
        else:
            parsers[script](argv)  # argparse exits with its one line on a flag or value it does not take


def test_every_link_leads_to_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).is_file(), f"{page.name}: {target}"
