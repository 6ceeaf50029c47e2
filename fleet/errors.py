"""The one error an operation on the manager raises: a machine code and a message."""

from __future__ import annotations

from edge.core.errors import EdgeError

# Codes that mean the operator's request cannot be done as written (exit 2); anything
# else is a failure of the manager or the link to it (exit 1).
INPUT_CODES = frozenset({"bad_request", "forbidden", "not_found", "conflict", "invalid_artifact",
                         "empty_target", "bad_state", "too_large"})


class OpError(EdgeError):
    """A refused or failed operation; ``code`` is short and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = 2 if code in INPUT_CODES else 1
