"""Every error this server sends, decided in one place (docs/PROTOCOL.md §4).

:data:`STATUS` is the table of JSON error codes and their HTTP statuses; :data:`RAISED` says
which code an exception raised outside this package is sent as. :func:`install` puts the
handlers that answer from them on an app. Clients map the same codes to exceptions with
``logitstore.format.protocol.ERROR_TYPES``; ``tests/test_server_errors.py`` checks that the
two tables and PROTOCOL.md agree.

Every error body is ``{"error": {"code": ..., "message": ...}}``: bad input is a 4xx that
names the problem, never a 500 and never a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import logitstore

__all__ = ["HTTP_CODES", "RAISED", "STATUS", "ApiError", "answer", "error_response", "install"]

#: JSON error code → HTTP status: every code this server sends.
STATUS: dict[str, int] = {
    "bad_request": 400,  # a missing or malformed parameter (not an integer, ...)
    "bad_range": 400,  # start < 0 or stop < start
    "bad_key": 400,  # a raw key that is not a relative store path
    "bad_range_header": 400,  # a Range header that does not parse
    "unauthorized": 401,  # tokens are configured and the request has none
    "forbidden": 403,  # the token is not one of the server's
    "unknown_store": 404,
    "no_such_key": 404,
    "no_tokenizer": 404,
    "unknown_sequence": 404,  # TRL's request names tokens that begin no stored sequence
    "not_found": 404,  # no such route
    "method_not_allowed": 405,
    "range_too_large": 413,  # more than max_positions in one request
    "range_not_satisfiable": 416,  # past the end of the store, or of a raw key
    "headers_too_large": 431,  # request line and headers over the limit (server/guard.py)
    "body_too_large": 413,  # a request body over the limit (server/guard.py)
    "store_error": 500,  # a store on this server's disk is damaged: the operator must look
}

#: Exceptions raised outside this package → the code they are sent as, found along the
#: exception's MRO (so the most specific class listed wins).
RAISED: dict[type[Exception], str] = {
    RequestValidationError: "bad_request",  # FastAPI could not parse a parameter
    logitstore.PositionError: "range_not_satisfiable",  # a read outside the store
    logitstore.LogitStoreError: "store_error",  # damage found while answering
}

#: Starlette's own refusals, by status. (Any other status keeps its number, with the code
#: ``http_error``; no route here can cause one: the one request body, TRL's, is parsed by
#: FastAPI, whose refusals are ``RequestValidationError``s.)
HTTP_CODES: dict[int, str] = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """A refusal of this server: ``code`` is a key of :data:`STATUS`, which gives its status.

    Example:
        >>> raise ApiError("unknown_store", "no store named 'x'; see /v1/stores")
    """

    def __init__(self, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = STATUS[code]  # a code missing from the table fails here, in tests
        self.code, self.message = code, message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON body every error has."""
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status,
        headers=dict(headers) if headers else None,
    )


def answer(exc: Exception) -> JSONResponse:
    """The response for ``exc``: an :class:`ApiError`, a Starlette HTTP error, or one of
    :data:`RAISED`."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))
    code = next(RAISED[c] for c in type(exc).__mro__ if c in RAISED)
    if isinstance(exc, RequestValidationError):
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    else:
        message = str(exc)
    return error_response(STATUS[code], code, message)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return answer(exc)


def install(app: FastAPI) -> None:
    """Answer every error on ``app`` from the tables above."""
    for exc_type in (ApiError, StarletteHTTPException, *RAISED):
        app.add_exception_handler(exc_type, _handle)
