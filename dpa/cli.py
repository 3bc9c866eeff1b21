"""The `dpa` command: the parser over the subcommands that each package's `cli` module registers (`dpa.command`),
and `main`, which turns a DpaError into one line and exit code 1."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dpa import __version__, stop
from dpa.command import REGISTRY, Command
from dpa.errors import DpaError
from dpa.outputs import claim_outputs

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


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are DpaErrors: `main` prints them as one line and exits 1 (no usage block)."""

    def error(self, message: str):
        raise DpaError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpa", description="DPA video object segmentation: train, export, deploy, compare.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"dpa {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for entry in registered_commands().values():
        sub = subparsers.add_parser(entry.name, help=entry.help, description=entry.help)
        entry.add_arguments(sub)
        if entry.outputs is not None and "--overwrite" not in sub._option_string_actions:
            sub.add_argument("--overwrite", action="store_true",
                             help="replace outputs that exist already (an output folder is emptied first); without it "
                             "an existing output is refused before any work")
        sub.set_defaults(_command=entry)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 done, 1 a user error (one line on stderr), 128 + the signal number when
    SIGINT, SIGTERM or SIGHUP stopped it (130, 143, 129; the outputs are finalised first, `dpa.stop`)."""
    stop.install()
    parser = build_parser()
    words = sys.argv[1:] if argv is None else argv
    name = next((word for word in words if word in REGISTRY), None)
    try:
        args = parser.parse_args(argv)
    except DpaError as error:
        print(f"dpa{' ' + name if name else ''}: error: {error}", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    entry: Command | None = getattr(args, "_command", None)
    if entry is None:
        parser.print_help()
        return 1
    try:
        outputs = entry.outputs(args) if entry.outputs is not None else []
        with claim_outputs(outputs, overwrite=getattr(args, "overwrite", False)):
            code = entry.run(args)
    except DpaError as error:
        print(f"dpa {args.command}: error: {error}", file=sys.stderr)
        return 1
    except stop.Stopped as stopped:
        print(f"dpa {args.command}: stopped by {stopped.name}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print(f"dpa {args.command}: stopped by SIGINT", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
