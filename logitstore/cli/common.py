"""What every command shares: the exit-code policy and the help text that states it."""

from __future__ import annotations

from ..errors import FormatError, IncompleteStoreError, LogitStoreError, RemoteError

__all__ = ["EPILOG", "EXIT_BAD_INPUT", "EXIT_FAULT", "EXIT_INTERRUPTED", "EXIT_OK", "exit_code"]

EXIT_OK, EXIT_FAULT, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = (
    "Format: docs/FORMAT.md. Exit status: 0 success; 1 a fault in a store (damaged, "
    "incomplete, unreadable, or a server that failed); 2 bad input (arguments, files, "
    "settings, a teacher that cannot be used); 130 interrupted."
)

# Faults of a store, or of the server that holds it: the input named the right thing, and
# the thing is broken. Everything else a command refuses is bad input.
_FAULTS: tuple[type[LogitStoreError], ...] = (FormatError, IncompleteStoreError, RemoteError)


def exit_code(error: LogitStoreError) -> int:
    """The exit status for ``error``: 1 for a fault in a store, 2 for bad input."""
    return EXIT_FAULT if isinstance(error, _FAULTS) else EXIT_BAD_INPUT
