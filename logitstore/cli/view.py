"""``logitstore view``: browse a local store in a web browser (the server's store browser)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from typing import Any

from ..errors import InputError
from .common import EPILOG

__all__ = ["add_parsers"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535; 0: a free one)")
    return port


def _bindable(host: str, port: int) -> int:
    """``port`` (a free one for 0) once a socket could listen on ``host:port``, so that the URL
    printed is one the server will answer on.

    Raises:
        InputError: ``host`` is not an address of this machine, or the port is taken.
    """
    try:
        # the socket uvicorn will make: IPv6 for an address with a colon, else IPv4
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return int(s.getsockname()[1])
    except OSError as e:
        where = f"port {port} on {host}" if port else host
        raise InputError(
            f"cannot listen on {where}: {e.strerror or e}"
            + ("; pick another --port, or leave it out for a free one" if port else "")
        ) from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _view(args: argparse.Namespace) -> int:
    # The CLI is the composition root: the library never imports the server package.
    from urllib.parse import quote

    from logitstore_server.app import ServerConfig, serve

    config = ServerConfig.from_cli([args.store, *args.compare])
    port = _bindable(args.host, args.port)
    if not _loopback(args.host):
        print(
            f"logitstore view: warning: {args.host} is not a loopback address and this server "
            "asks for no token: anyone who can reach it can read the store (`logitstore serve "
            "--token-file` asks for one)",
            file=sys.stderr,
            flush=True,
        )
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
    v.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; another address serves the store "
        "without a token to whoever can reach it)",
    )
    v.add_argument("--port", type=_port, default=0, help="port (default: a free one)")
    v.add_argument("--open", action="store_true", help="open the page in the default browser")
    v.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    v.set_defaults(func=_view)
