"""The ``logitstore`` command: the parser, assembled from one module per command family
(``write``: write, generate; ``inspect``: info, verify, show, export; ``serve``), and
:func:`main`, which alone turns errors into exit codes (:mod:`.common`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import LogitStoreError
from . import copy, inspect, peers, serve, view, write
from .common import EPILOG, EXIT_INTERRUPTED, EXIT_OK, exit_code

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="logitstore",
        description="Store a teacher's next-token distributions once; read them for distillation.",
        epilog=EPILOG,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    write.add_parsers(sub)
    inspect.add_parsers(sub)
    copy.add_parsers(sub)
    peers.add_parsers(sub)
    serve.add_parsers(sub)
    view.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (see ``logitstore --help``)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LogitStoreError as e:
        print(f"logitstore {args.command}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:  # e.g. `logitstore export ... | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print(
            f"logitstore {args.command}: interrupted. Committed shards are kept; run the same "
            "command again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
