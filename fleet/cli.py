"""The ``fleet`` command."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description="edgecam fleet manager and operator CLI")
    parser.add_argument("--version", action="version", version=f"edgecam {__version__}")
    parser.parse_args(argv)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
