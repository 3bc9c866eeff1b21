"""The `dpa` command: the parser over the subcommands that each package's `cli` module registers (`dpa.command`),
and `main`, which turns a DpaError into one line and exit code 1."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dpa.command import REGISTRY, Command
from dpa.errors import DpaError

COMMAND_MODULES = (
    "dpa.training.cli",
    "dpa.export.cli",
    "dpa.runtime.cli",
    "dpa.calibration.cli",
    "dpa.commands.cli",
)


def registered_commands() -> dict[str, Command]:
    """Import every package's cli module (registering its commands) and return the registry."""
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
    return dict(sorted(REGISTRY.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpa", description="DPA video object segmentation: train, export, deploy, compare."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in registered_commands().values():
        sub = subparsers.add_parser(entry.name, help=entry.help, description=entry.help)
        entry.add_arguments(sub)
        sub.set_defaults(_run=entry.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        code = args._run(args)
    except DpaError as error:
        print(f"dpa {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dpa {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
