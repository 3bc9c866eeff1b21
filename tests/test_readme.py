"""The README's commands: CI runs the test command, and every `dpa` command line it shows parses."""

import re
import shlex
from pathlib import Path

import pytest

from dpa.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CODE_LINES = [  # one entry per command: lines continued with a trailing backslash are joined
    line.strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for line in re.sub(r"\\\n\s*", " ", block).splitlines()
    if line.strip() and not line.strip().startswith("#")
]


def test_ci_runs_exactly_the_readme_test_command():
    ci_commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    ci_commands = [line for line in ci_commands if not line.startswith(("set ", "cd "))]
    assert ci_commands == ["scripts/setup.sh && .venv/bin/python -m pytest -q"]
    assert ci_commands[0] in CODE_LINES


def test_readme_main_job_is_the_demo():
    assert "scripts/setup.sh && .venv/bin/dpa demo" in CODE_LINES


def _dpa_arguments(line: str) -> list[str] | None:
    words = shlex.split(line, comments=True)
    if "&&" in words:
        words = words[words.index("&&") + 1:]
    if words[0] == ".venv/bin/dpa":
        return words[1:]
    if words[0].endswith("torchrun") and "-m" in words:
        return words[words.index("-m") + 2:]
    return None


@pytest.mark.parametrize("line", [line for line in CODE_LINES if _dpa_arguments(line) is not None])
def test_readme_command_lines_parse(line):
    args = build_parser().parse_args(_dpa_arguments(line))
    assert callable(args._command.run)
