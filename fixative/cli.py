"""The ``fixative`` command. Sub-commands are registered by the packages that own them.

Each package declares an entry point in the ``fixative.commands`` group pointing at a
``register(subparsers)`` function; that function adds its sub-commands and sets ``func`` on each,
a callable taking the parsed arguments and returning an exit code. This module knows none of them.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from . import __version__
from .core.errors import FixativeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fixative", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fixative {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="fixative.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FixativeError as error:
        print(f"fixative: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fixative: interrupted", file=sys.stderr)
        return 130
