"""Errors the CLI turns into one clear line and an exit code."""

from __future__ import annotations


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
