"""Errors the CLI turns into one clear line and an exit code, and the runner both
commands share (help texts, a bare command group's own help)."""

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


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help unless the help already names one; no
    default is shown where there is none (``None``) or for a flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default in (None, False, argparse.SUPPRESS)
                or default == []):
            return text
        return f"{text} (default: %(default)s)"


def prepare_parser(parser: argparse.ArgumentParser) -> None:
    """Every parser of the tree gets the help formatter, a description (its one-line
    help) and, where it is a group of subcommands, prints its own help when called bare."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help for a in action._choices_actions}
        for name, child in action.choices.items():
            if child.description is None:
                child.description = helps.get(name)
            if any(isinstance(a, argparse._SubParsersAction) for a in child._actions) and \
                    child.get_default("func") is None:
                child.set_defaults(func=_print_help(child))
            prepare_parser(child)


def _print_help(parser: argparse.ArgumentParser):
    def show(_args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2
    return show


def run_command(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen command: an EdgeError becomes one line on stderr
    and its exit code, a bug one line too (the traceback with ``--debug``)."""
    prepare_parser(parser)
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
