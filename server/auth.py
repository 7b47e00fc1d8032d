"""Bearer tokens (docs/PROTOCOL.md §4): when the server has tokens, every request but
``/v1/health`` needs ``Authorization: Bearer <one of them>``. Health is always public, so load
balancers can probe a server without holding a token; so are the store browser's page and its
two assets (they hold no data: the page asks for a token and sends it with its requests)."""

from __future__ import annotations

import hmac
import time

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, answer
from .metrics import Metrics
from .view import is_page

__all__ = ["PUBLIC_PATHS", "UNAUTHENTICATED", "BearerAuth", "check_token"]

PUBLIC_PATHS = frozenset({"/v1/health", "/health/", "/health"})  # /health(/): where TRL checks
#: the one metrics route label of refused requests: their paths must not mint new series
UNAUTHENTICATED = "unauthenticated"


def check_token(header: str | None, tokens: tuple[str, ...]) -> None:
    """Accept an ``Authorization`` header that carries one of ``tokens``.

    Raises:
        ApiError: ``unauthorized`` without a bearer token, ``forbidden`` with another one.
    """
    if not header or not header.lower().startswith("bearer "):
        raise ApiError(
            "unauthorized",
            "this server needs 'Authorization: Bearer <token>'",
            {"WWW-Authenticate": "Bearer"},
        )
    given = header[7:].strip().encode()
    ok = False
    for token in tokens:  # compare with every token, in constant time, whatever matches
        ok |= hmac.compare_digest(given, token.encode())
    if not ok:
        raise ApiError("forbidden", "the bearer token is not valid for this server")


class BearerAuth:
    """ASGI middleware: answers an HTTP request without a valid token itself (counted in
    ``metrics`` under :data:`UNAUTHENTICATED`) and passes every other request on untouched.

    Args:
        app: the app behind it.
        tokens: the tokens a request may carry (at least one).
        metrics: where refusals are counted.
    """

    def __init__(self, app: ASGIApp, tokens: tuple[str, ...], metrics: Metrics) -> None:
        self.app, self.tokens, self.metrics = app, tokens, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        request = Request(scope)
        try:
            path = request.url.path
            if path not in PUBLIC_PATHS and not is_page(path):
                check_token(request.headers.get("authorization"), self.tokens)
        except ApiError as refusal:
            response = answer(refusal)
            self.metrics.observe(UNAUTHENTICATED, response.status_code, 0, time.perf_counter() - t0)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
