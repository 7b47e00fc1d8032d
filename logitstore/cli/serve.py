"""``logitstore serve``: complete stores over HTTP (docs/PROTOCOL.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import LogitStoreError
from .common import EPILOG

__all__ = ["add_parsers"]


def _serve(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    import uvicorn

    from ..read.local import LogitStore

    stores: dict[str, str] = {}
    for path in args.stores:
        store = LogitStore(path)  # refuses incomplete or damaged metadata now, not per request
        name = Path(path).resolve().name
        if name in stores:
            raise LogitStoreError(
                f"two stores are named {name!r} (the directory name is the URL name); rename one"
            )
        stores[name] = str(Path(path).resolve())
        del store
    tokens: list[str] = []
    if args.token_file:
        try:
            tokens = [
                t.strip() for t in Path(args.token_file).read_text().splitlines() if t.strip()
            ]
        except OSError as e:
            raise LogitStoreError(f"cannot read --token-file: {e}") from None
        if not tokens:
            raise LogitStoreError(f"--token-file {args.token_file} holds no token (one per line)")
    config = {
        "stores": stores,
        "tokens": tokens,
        "max_positions": args.max_positions,
        "block_positions": args.block_positions,
    }
    os.environ["LOGITSTORE_SERVER_CONFIG"] = json.dumps(config)
    host = f"[{args.host}]" if ":" in args.host else args.host
    for name in stores:
        print(f"serving {stores[name]} at http://{host}:{args.port}/v1/stores/{name}", flush=True)
    uvicorn.run(
        "logitstore_server.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        loop="auto",
        http="auto",
    )
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
    sv.add_argument("stores", nargs="+", metavar="STORE", help="store directories to serve")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
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
        help="positions per streamed block (default 16384); memory is ~2 blocks per stream",
    )
    sv.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    sv.set_defaults(func=_serve)
