"""A model's first load, in a child process of its own (see ``runtime.check_model_file``).

    python -m edge.inference.trial MODEL [--allocate]

Exit 0: the runtime built an interpreter for the file (and allocated its tensors).
Exit 1: it refused the file; the last line on stdout says why. Killed by a signal:
the runtime crashed on it, and only this process went down.
"""

from __future__ import annotations

import sys

from edge.core.errors import ModelError

from .runtime import describe_load_error, import_runtime


def main(argv: list[str]) -> int:
    path, allocate = argv[0], "--allocate" in argv[1:]
    try:
        interpreter = import_runtime().interpreter_cls(model_path=path, num_threads=1)
        if allocate:
            interpreter.allocate_tensors()
    except ModelError as exc:
        print(exc)
        return 1
    except Exception as exc:  # whatever the runtime raises, the parent only needs the reason
        print(describe_load_error(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
