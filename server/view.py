"""The store browser (docs/PROTOCOL.md §6): the page at ``/`` and ``/v1/stores/NAME/view``, its
script and style from ``viewer/`` in this package, and the small JSON endpoints it reads
under ``/v1/stores/NAME/view/``.

The page and its two assets hold no data and are public (a browser cannot send a bearer
header when it navigates); the page asks for the token and sends it with every JSON request,
which the API's auth checks like any other. Every answer is bounded: at most
:data:`VIEW_POSITIONS` positions, :data:`LIST_MAX` candidates, :data:`SEARCH_POSITIONS`
positions searched per request. Tokens are decoded here, with the store's own tokenizer; the
page only ever puts them in the document as text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

import logitstore

from .deps import AppState, Served, Span, get_store, position_range
from .errors import ApiError
from .measures import TokenText, candidate_list, kl_between, measures, sample_histograms

__all__ = ["LIST_MAX", "SEARCH_POSITIONS", "VIEW_POSITIONS", "is_page", "router"]

router = APIRouter()
Store = Annotated[Served, Depends(get_store)]

#: most positions one ``tokens`` or ``compare`` request may ask for
VIEW_POSITIONS = 2048
#: most candidates one ``position`` answer lists (the rest is summed)
LIST_MAX = 256
#: most positions one ``search`` request reads before it answers with where to go on
SEARCH_POSITIONS = 1 << 20
SEARCH_MATCHES = 20
READ_BLOCK = 1 << 16

ASSETS = Path(__file__).parent / "viewer"
_PAGE_PATH = re.compile(r"/v1/stores/[^/]+/view")
_ASSET_TYPES = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
# The page runs only its own script: were a token ever put in as markup, it could not run.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_page(path: str) -> bool:
    """Whether ``path`` is the page or one of its assets (public: they hold no data)."""
    return (
        path == "/"
        or path.removeprefix("/view/") in _ASSET_TYPES
        or _PAGE_PATH.fullmatch(path) is not None
    )


def _page(state: AppState) -> HTMLResponse:
    html = (ASSETS / "index.html").read_text(encoding="utf-8")
    html = html.replace("{{auth}}", "bearer" if state.config.tokens else "none")
    return HTMLResponse(html, headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def home(state: AppState) -> HTMLResponse:
    return _page(state)


@router.get("/v1/stores/{name}/view", include_in_schema=False)
async def page(name: str, state: AppState) -> HTMLResponse:
    # Served whatever the name: whether a store exists is for those with a token to learn.
    return _page(state)


@router.get("/view/{asset}", include_in_schema=False)
async def asset(asset: str) -> Response:
    kind = _ASSET_TYPES.get(asset)
    if kind is None:
        raise ApiError("not_found", f"the page has no file {asset!r}")
    return Response((ASSETS / asset).read_bytes(), media_type=kind, headers=_HEADERS)


def _texts(request: Request, served: Served) -> TokenText:
    cache: dict[str, TokenText] = request.app.state.__dict__.setdefault("view_texts", {})
    if served.name not in cache:
        cache[served.name] = TokenText(served.store)
    return cache[served.name]


def _bounded(span: Span) -> Span:
    if span.stop - span.start > VIEW_POSITIONS:
        raise ApiError(
            "range_too_large",
            f"{span.stop - span.start} positions asked for; the view sends at most "
            f"{VIEW_POSITIONS} per request: split the range",
        )
    return span


@router.get("/v1/stores/{name}/view/locate", summary="The sequence of an index or a position")
def locate(
    served: Store, sequence: int | None = None, position: int | None = None
) -> dict[str, Any]:
    store = served.store
    if (sequence is None) == (position is None):
        raise ApiError("bad_request", "give exactly one of ?sequence= and ?position=")
    if position is not None:
        if not 0 <= position < len(store):
            raise ApiError(
                "range_not_satisfiable",
                f"position {position} is outside the store's positions [0, {len(store)})",
            )
        sequence = store.sequence_of(position)
    assert sequence is not None
    if not 0 <= sequence < store.num_sequences:
        raise ApiError(
            "range_not_satisfiable",
            f"sequence {sequence} is out of range: {store.num_sequences} sequences",
        )
    return {
        "sequence": sequence,
        "start": int(store.offsets[sequence]),
        "stop": int(store.offsets[sequence + 1]),
        "num_sequences": store.num_sequences,
        "num_positions": len(store),
    }


@router.get("/v1/stores/{name}/view/tokens", summary="Tokens and their measures, for the view")
def tokens(
    request: Request, served: Store, span: Annotated[Span, Depends(position_range)]
) -> dict[str, Any]:
    span = _bounded(span)
    out = measures(served.store, span.start, span.stop)
    out["text"] = _texts(request, served)(out["input_ids"])
    return {"start": span.start, "stop": span.stop, "kind": served.store.encoding.kind, **out}


@router.get("/v1/stores/{name}/view/position/{position}", summary="One position's candidates")
def position(
    request: Request,
    served: Store,
    position: int,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 64,
) -> dict[str, Any]:
    store = served.store
    if not 0 <= position < len(store):
        raise ApiError(
            "range_not_satisfiable",
            f"position {position} is outside the store's positions [0, {len(store)})",
        )
    text = _texts(request, served)
    seq = store.sequence_of(position)
    end = int(store.offsets[seq + 1])
    ids, mask = store.read_tokens(position, min(position + 2, end))
    out: dict[str, Any] = {
        "position": position,
        "sequence": seq,
        "offset": position - int(store.offsets[seq]),
        "kind": store.encoding.kind,
        "token": {"id": int(ids[0]), "text": text([ids[0]])[0]},
        "next": {"id": int(ids[1]), "text": text([ids[1]])[0]} if len(ids) > 1 else None,
        "loss_mask": bool(mask[0]),
    }
    if store.encoding.kind != "none":
        out |= candidate_list(store, position, text, limit)
    return out


@router.get("/v1/stores/{name}/view/search", summary="Sequences whose text holds a string")
def search(
    request: Request,
    served: Store,
    q: Annotated[str, Query(min_length=1, max_length=200)],
    from_sequence: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Case-insensitive search of the tokens' text, from sequence ``from_sequence`` on;
    ``next_sequence`` is where to go on (``None``: the end of the store was reached)."""
    store = served.store
    text, needle = _texts(request, served), q.casefold()
    offsets = store.offsets
    matches: list[dict[str, Any]] = []
    seq = first = min(from_sequence, store.num_sequences)
    while seq < store.num_sequences and len(matches) < SEARCH_MATCHES:
        budget = int(offsets[first]) + SEARCH_POSITIONS - int(offsets[seq])
        if budget <= 0:
            break
        s0, s1 = int(offsets[seq]), int(offsets[seq + 1])
        if s1 - s0 > READ_BLOCK:  # a long sequence: block by block, never all of it at once
            at = _first_match(store, text, s0, s1, needle)
            if at is not None:
                pieces = text(store.read_tokens(max(s0, at - 8), min(s1, at + 16))[0])
                matches.append({"sequence": seq, "position": at, "snippet": "".join(pieces)})
            seq += 1
            continue
        # whole sequences, at most READ_BLOCK positions per read (a read costs ~1 ms), and
        # never past the budget (unless one sequence alone is longer)
        end = int(offsets[seq]) + min(READ_BLOCK, budget)
        last = int(np.searchsorted(offsets, end, side="right")) - 1
        last = min(max(last, seq + 1), store.num_sequences)
        base = int(offsets[seq])
        block = text(store.read_tokens(base, int(offsets[last]))[0])
        for s in range(seq, last):
            s0, s1 = int(offsets[s]), int(offsets[s + 1])
            pieces = block[s0 - base : s1 - base]
            folded = [p.casefold() for p in pieces]  # (casefolding may change lengths)
            at = "".join(folded).find(needle)
            if at >= 0:
                ends = np.cumsum([len(p) for p in folded])  # where each token's text ends
                token = int(np.searchsorted(ends, at, side="right"))
                snippet = "".join(pieces[max(0, token - 8) : token + 16])
                matches.append({"sequence": s, "position": s0 + token, "snippet": snippet})
            seq = s + 1
            if len(matches) == SEARCH_MATCHES:
                break
    return {
        "matches": matches,
        "next_sequence": seq if seq < store.num_sequences else None,
        "num_sequences": store.num_sequences,
    }


def _first_match(
    store: logitstore.StoreBase, text: TokenText, s0: int, s1: int, needle: str
) -> int | None:
    """The position in ``[s0, s1)`` of the token where ``needle`` (casefolded) first begins in
    the casefolded text, read :data:`READ_BLOCK` positions at a time; each block starts with
    the tokens of the one before that a match could begin in."""
    tail: list[str] = []  # the previous block's last tokens, casefolded
    for a in range(s0, s1, READ_BLOCK):
        folded = tail + [
            p.casefold() for p in text(store.read_tokens(a, min(a + READ_BLOCK, s1))[0])
        ]
        at = "".join(folded).find(needle)
        if at >= 0:
            ends = np.cumsum([len(p) for p in folded])  # where each token's text ends
            return a - len(tail) + int(np.searchsorted(ends, at, side="right"))
        keep = chars = 0  # the fewest last tokens that hold len(needle) - 1 characters
        while keep < len(folded) and chars < len(needle) - 1:
            keep += 1
            chars += len(folded[-keep])
        tail = folded[len(folded) - keep :]
    return None


@router.get("/v1/stores/{name}/view/stats", summary="Histograms over a sample of positions")
def stats(request: Request, served: Store) -> dict[str, Any]:
    cache: dict[str, Any] = request.app.state.__dict__.setdefault("view_stats", {})
    if served.name not in cache:
        cache[served.name] = sample_histograms(served.store)
    result: dict[str, Any] = cache[served.name]
    return result


@router.get("/v1/stores/{name}/view/compare", summary="KL between two stores, per position")
def compare(
    served: Store,
    span: Annotated[Span, Depends(position_range)],
    other: str,
    state: AppState,
) -> dict[str, Any]:
    """KL(this ‖ other) at each position of ``[start, stop)``; both stores must hold the same
    tokens there and share a vocabulary."""
    span = _bounded(span)
    a, b = served.store, state.get(other).store
    for s in (a, b):
        if s.encoding.kind == "none":
            raise ApiError("bad_request", "a tokens-only store has no distributions to compare")
    if a.vocab_size != b.vocab_size:
        raise ApiError(
            "bad_request",
            f"the stores have different vocabularies ({a.vocab_size} vs {b.vocab_size} "
            "tokens): only stores of one tokenizer compare",
        )
    if span.stop > len(b):
        raise ApiError(
            "range_not_satisfiable", f"stop {span.stop} is past the end of {other!r} ({len(b)})"
        )
    ta, tb = a.read_tokens(span.start, span.stop)[0], b.read_tokens(span.start, span.stop)[0]
    differ = np.flatnonzero(ta != tb)
    if len(differ):
        raise ApiError(
            "bad_request",
            f"the stores hold different tokens from position {span.start + int(differ[0])} "
            "on: compare stores written over the same text",
        )
    return {
        "start": span.start,
        "stop": span.stop,
        "other": other,
        "kl": kl_between(a, b, span.start, span.stop),
    }
