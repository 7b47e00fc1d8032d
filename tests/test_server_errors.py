"""One set of error codes: what the server sends (server/errors.py), what a client raises for
each (``logitstore.format.protocol.ERROR_TYPES``) and what docs/PROTOCOL.md §4 says agree.
(Over a real socket: tests/test_server.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from logitstore_server.errors import HTTP_CODES, RAISED, STATUS, ApiError, answer
from starlette.exceptions import HTTPException

import logitstore
from logitstore.errors import (
    CorruptStoreError,
    LogitStoreError,
    PositionError,
    RemoteError,
    StoreNotFoundError,
)
from logitstore.format.protocol import ERROR_TYPES

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

#: what a client should raise for each code (the decision, written out once more to pin it)
INTENDED: dict[str, type[LogitStoreError]] = {
    "unknown_store": StoreNotFoundError,
    "no_such_key": StoreNotFoundError,
    "no_tokenizer": StoreNotFoundError,
    "unknown_sequence": StoreNotFoundError,
    "not_found": StoreNotFoundError,
    "bad_range": PositionError,
    "range_not_satisfiable": PositionError,
    "range_too_large": PositionError,
    "unauthorized": RemoteError,
    "forbidden": RemoteError,
    "bad_request": RemoteError,
    "bad_key": RemoteError,
    "bad_range_header": RemoteError,
    "method_not_allowed": RemoteError,
    "headers_too_large": RemoteError,
    "body_too_large": RemoteError,
    "store_error": CorruptStoreError,  # final, not retried: the store on disk is damaged
}


def test_every_code_the_server_sends_maps_to_the_intended_client_exception() -> None:
    sendable = set(STATUS) | set(RAISED.values()) | set(HTTP_CODES.values())
    assert sendable == set(STATUS), "a code outside the server's STATUS table"
    assert set(ERROR_TYPES) == set(STATUS) == set(INTENDED)
    assert {c: ERROR_TYPES[c] for c in STATUS} == INTENDED
    # 5xx codes are the server's own faults; the only one it names is a damaged store
    assert {c for c, s in STATUS.items() if s >= 500} == {"store_error"}


def test_protocol_md_lists_every_code_with_its_status_and_exception() -> None:
    text = PROTOCOL.read_text()
    section = text[text.index("## 4.") :]
    documented: dict[str, tuple[int, str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            for code in re.findall(r"`(\w+)`", cells[1]):
                documented[code] = (int(cells[0]), cells[3].strip("`"))
    assert documented == {c: (STATUS[c], ERROR_TYPES[c].__name__) for c in STATUS}


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (PositionError("past the end"), 416, "range_not_satisfiable"),
        (CorruptStoreError("checksum"), 500, "store_error"),
        (logitstore.IncompleteStoreError("writer running"), 500, "store_error"),
        (HTTPException(404), 404, "not_found"),
        (HTTPException(405), 405, "method_not_allowed"),
        (ApiError("unknown_store", "no store named 'x'"), 404, "unknown_store"),
    ],
)
def test_exceptions_are_answered_from_the_table(exc: Exception, status: int, code: str) -> None:
    response = answer(exc)
    body = json.loads(bytes(response.body))
    assert response.status_code == status and body["error"]["code"] == code
    assert body["error"]["message"]


def test_a_code_outside_the_table_cannot_be_raised() -> None:
    with pytest.raises(KeyError):
        ApiError("made_up", "no status for this code")
