"""The README cannot go stale: every command in it parses with today's parser, and CI runs
exactly its test command after exactly its install command."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    """Every ``python main.py ...`` / ``torchrun ... main.py ...`` command, from code blocks and
    inline code (comments after ``#`` dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        commands += [line.split("  #")[0].strip() for line in block.splitlines()]
    commands += re.findall(r"`((?:python|torchrun)[^`]*main\.py[^`]*)`", README)
    return [c for c in commands if "main.py" in c]


COMMANDS = readme_commands()


def test_readme_has_the_commands_users_need() -> None:
    text = " ".join(COMMANDS)
    for sub in ("download", "demo", "train", "evaluate", "parameter_search", "detect train", "detect predict"):
        assert f"main.py {sub}" in text, sub
    assert len(COMMANDS) >= 12


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str) -> None:
    argv = shlex.split(command)
    argv = argv[argv.index(next(a for a in argv if a.endswith("main.py"))) + 1:]
    parser = main.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 after --help, 2 for an unknown flag or bad value
        if exc.code == 0 and "--help" in argv:
            return
        pytest.fail(f"README command no longer parses ({exc.code}): {command}")
    assert callable(args.func)


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    install = "python -m pip install -r requirements.txt"
    test = "python -m pytest -q"
    assert f"```bash\n{install}\n" in README
    assert f"```bash\n{test}\n```" in README
    assert f"{install.replace('pip install', 'pip install -q')}" in ci or install in ci
    assert re.search(rf"^{re.escape(test)}\b", ci, flags=re.M), ".ci/run must call the README's test command"
