"""Errors the CLI turns into one clear line and an exit code."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Sequence


class EdgeError(Exception):
    """An expected failure with a message meant for the operator.

    ``exit_code`` follows the usual convention: 2 for bad input the operator
    must fix (config, usage), 1 for anything else that stops the command.
    """

    exit_code = 1


class ConfigError(EdgeError):
    """The config file is missing, unparsable or invalid."""

    exit_code = 2


class ModelError(EdgeError):
    """A model file, its manifest or the runtime cannot serve it."""


class SourceError(EdgeError):
    """A capture source cannot be opened or read."""


class UsageError(EdgeError):
    """The command line asks for something that cannot be done as written."""

    exit_code = 2


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen command: an EdgeError becomes one line on stderr
    and its exit code, a bug one line too (the traceback with ``--debug``)."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except EdgeError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`
        return 0
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        print(f"{prog}: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
