"""The registry of `dpa` subcommands (torch-free, ground floor): each package's `cli` module registers its commands
with `@command`; `dpa.cli` builds the parser from the registry. Registering imports only argparse-level code, so
`dpa --help` stays fast and torch-free commands stay torch-free."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from dpa.outputs import Output

Outputs = Callable[[argparse.Namespace], list[Output]]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    outputs: Outputs | None = None  # what it writes: `dpa.cli` claims them first and adds --overwrite


REGISTRY: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None,
            outputs: Outputs | None = None):
    """Register `run(args) -> exit code | None` as subcommand `name` with its argument builder.

    outputs(args): the files and folders the command writes (`dpa.outputs.Output`); `dpa.cli` claims them (lock,
    refuse existing ones unless --overwrite, check they are writable) before `run` starts."""

    def register(run: Callable[[argparse.Namespace], int | None]):
        if name in REGISTRY:
            raise RuntimeError(f"subcommand {name!r} registered twice")
        REGISTRY[name] = Command(name, help, arguments or (lambda parser: None), run, outputs)
        return run

    return register
