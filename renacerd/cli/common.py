"""What every subcommand shares: one-line errors with exit code 2, the --db option."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def add_db(p: argparse.ArgumentParser) -> None:
    """--db PATH (default: $RENACER_DB or the per-user default)."""
    p.add_argument("--db", metavar="PATH", help="store file (env RENACER_DB)")


def print_json(data: object) -> int:
    """Write `data` as indented JSON (names that are not UTF-8 as escapes); returns 0."""
    import orjson

    from renacerd.escaping import json_safe

    sys.stdout.buffer.write(orjson.dumps(json_safe(data), option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` and return 2."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    return EXIT_USAGE


def open_store(path: str | None):
    """Open an existing store for reading."""
    from renacerd.store.database import Store, default_db_path

    return Store(path or default_db_path())
