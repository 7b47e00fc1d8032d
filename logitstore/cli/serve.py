"""``logitstore serve``: complete stores over HTTP (docs/PROTOCOL.md)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import EPILOG
from .view import _port

__all__ = ["add_parsers"]


def _serve(args: argparse.Namespace) -> int:
    # The CLI is the composition root: the library never imports the server package.
    from logitstore_server.app import ServerConfig, serve

    config = ServerConfig.from_cli(
        args.stores,
        token_file=args.token_file,
        max_positions=args.max_positions,
        block_positions=args.block_positions,
        workers=args.workers,
    )
    serve(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``serve`` on the subparsers ``sub``."""
    sv = sub.add_parser(
        "serve",
        help="serve stores over HTTP (docs/PROTOCOL.md)",
        description="Serve complete stores over HTTP. Each store's URL (printed at start) is "
        "what `logitstore.open` and LogitDataset take on the client side.",
        epilog=EPILOG,
    )
    sv.add_argument(
        "stores",
        nargs="+",
        metavar="STORE",
        help="store directories or object-storage URLs (s3://bucket/prefix/store.zarr) to serve",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    sv.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing the port (default 1; at most 4 per core). One process "
        "sends the compressed stream for a fraction of a core per stream: more help where the "
        "server's CPU is the limit: row streams (clients before 0.3, or with compressed=False; "
        "stores in object storage), TRL requests, the store browser. Each opens every store. "
        "/metrics sums all workers; /v1/health is answered by one. Measured: "
        "benchmarks/results/http.md",
    )
    sv.add_argument("--token-file", help="file of bearer tokens, one per line: requests need one")
    sv.add_argument(
        "--max-positions",
        type=int,
        default=1 << 24,
        help="most positions one request may ask for (default 16M; 413 above)",
    )
    sv.add_argument(
        "--block-positions",
        type=int,
        default=1 << 14,
        help="positions per streamed block (default 16384); memory is ~2-3 blocks per stream",
    )
    sv.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    sv.set_defaults(func=_serve)
