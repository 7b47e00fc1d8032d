"""``logitstore view``: browse a local store in a web browser (the server's store browser)."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from .common import EPILOG

__all__ = ["add_parsers"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _view(args: argparse.Namespace) -> int:
    # The CLI is the composition root: the library never imports the server package.
    from urllib.parse import quote

    from logitstore_server.app import ServerConfig, serve

    config = ServerConfig.from_cli([args.store, *args.compare])
    port = args.port or _free_port(args.host)
    name = next(iter(config.stores))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/v1/stores/{quote(name, safe='')}/view"
    if args.compare:
        url += "#compare=" + quote(list(config.stores)[1], safe="")
    print(f"view {config.stores[name]} at {url}", flush=True)
    if args.open:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, (url,)).start()
    serve(config, host=args.host, port=port, log_level=args.log_level)
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``view`` on the subparsers ``sub``."""
    v = sub.add_parser(
        "view",
        help="browse a store in a web browser (served on 127.0.0.1)",
        description="Serve one local store (and any stores to compare it with) on this "
        "machine only, and print the URL of its page: the text coloured by teacher entropy, "
        "surprisal, residual or loss mask; each position's candidates; store info and "
        "histograms; per-token KL against a compared store. Ctrl-C stops it.",
        epilog=EPILOG,
    )
    v.add_argument("store", help="store directory")
    v.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="STORE",
        help="another store over the same text to compare with (repeatable)",
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    v.add_argument("--open", action="store_true", help="open the page in the default browser")
    v.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    v.set_defaults(func=_view)
