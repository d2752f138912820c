"""Every command printed in README.md and docs/*.md names things that exist: the `python -m` module,
each `--option` it passes (in that module's --help), the config and script files, the make targets.
A command that drifts from the code fails here instead of on a user's terminal."""
from __future__ import annotations

import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, subprocess_env

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def commands():
    """(file, line) of every command line in the docs' fenced code blocks, continuations joined."""
    found = []
    for doc in DOCS:
        in_block, listing, pending = False, False, ""
        for raw in doc.read_text().splitlines():
            if raw.startswith("```"):  # ```text blocks are listings, not commands
                in_block, listing, pending = not in_block, raw.strip() == "```text", ""
                continue
            if listing:
                continue
            if not in_block:
                continue
            line = pending + raw.split(" #")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if re.match(r"^(python |torchrun |jobs/|make |\.venv/bin/python )", line):
                found.append((doc.relative_to(REPO).as_posix(), line))
    return found


@lru_cache(maxsize=None)
def help_text(module: str) -> str:
    run = subprocess.run([PYTHON, "-m", *module.split()], input="", capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=subprocess_env())
    return run.stdout + run.stderr


def module_and_args(words):
    """('pipeline.train', args) of a python -m / torchrun -m command; subcommand modules keep their command."""
    if "-m" not in words:
        return None, words
    i = words.index("-m")
    module, args = words[i + 1], words[i + 2:]
    if module in ("data_prep", "pipeline.experiments") and args and not args[0].startswith("-"):
        return f"{module} {args[0]}", args[1:]
    return module, args


COMMANDS = commands()


def test_the_docs_print_commands():
    assert len(COMMANDS) > 25 and any("pipeline.experiments distorted" in c for _, c in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}:{c[:50]}" for w, c in COMMANDS])
def test_command_names_what_exists(where, command):
    words = shlex.split(command.replace("...", ""))
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert all(w in targets for w in words[1:] if not w.startswith("-")), f"{where}: {command}"
        return
    if words[0].startswith("jobs/"):
        assert (REPO / words[0]).is_file(), f"{where}: {words[0]} does not exist"
    for word in words:  # files of the repository the command names
        if re.match(r"^(configs|jobs|benchmarks|tests/data)/", word) and "*" not in word and "X" not in word:
            assert (REPO / word).exists(), f"{where}: {word} does not exist ({command})"
    module, args = module_and_args(words)
    if module is None:
        script = next((w for w in words if w.startswith("benchmarks/")), None)
        if script:
            assert (REPO / script).is_file(), f"{where}: {script}"
        return
    text = help_text(f"{module} --help")
    assert "usage" in text.lower(), f"{where}: python -m {module} --help failed:\n{text[-1000:]}"
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert option in text, f"{where}: {option} is not an option of python -m {module} ({command})"
