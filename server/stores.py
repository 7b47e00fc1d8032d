"""The ``/v1`` routes over stores (docs/PROTOCOL.md §1): health, the list of stores, each
store's metadata, offsets and tokenizer, and position ranges and sequences as streams."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from .deps import AppState, Served, Span, get_store, position_range, sequence_range
from .errors import ApiError
from .metrics import Metrics, get_metrics
from .stream import stream_response

__all__ = ["router"]

router = APIRouter()

Store = Annotated[Served, Depends(get_store)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]


@router.get("/v1/health", summary="Liveness")
async def health(state: AppState) -> dict[str, Any]:
    # One worker answers (whichever accepted the connection): "ok" says that one is up.
    return {"status": "ok", "stores": len(state.stores), "workers": state.config.workers}


@router.get("/v1/stores", summary="The stores this server serves")
async def list_stores(request: Request, state: AppState) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/")
    return {
        "stores": [
            {
                "name": name,
                "url": f"{base}/v1/stores/{name}",
                "num_positions": len(served.store),
                "encoding": served.store.encoding.to_dict(),
            }
            for name, served in state.stores.items()
        ]
    }


@router.get("/v1/stores/{name}", summary="A store's metadata (as `logitstore info --json`)")
async def store_metadata(served: Store) -> dict[str, Any]:
    return served.info


@router.get("/v1/stores/{name}/offsets", summary="Sequence boundaries, little-endian int64")
async def offsets(served: Store) -> Response:
    data = served.store.offsets.astype("<i8").tobytes()
    return Response(data, media_type="application/octet-stream")


@router.get("/v1/stores/{name}/tokenizer", summary="The teacher's tokenizer.json")
async def tokenizer(served: Store) -> Response:
    tok = served.store.tokenizer()
    if tok is None:
        raise ApiError("no_tokenizer", f"store {served.name!r} holds no tokenizer")
    return Response(tok.to_str(), media_type="application/json")


@router.get("/v1/stores/{name}/positions", summary="Positions [start, stop), streamed")
async def positions(
    request: Request,
    span: Annotated[Span, Depends(position_range)],
    state: AppState,
    metrics: AppMetrics,
) -> StreamingResponse:
    accept = request.headers.get("accept", "")  # the compressed stream, if asked for
    return stream_response(span, state.config.block_positions, metrics, accept)


@router.get("/v1/stores/{name}/sequences/{index}", summary="One sequence, streamed")
async def sequence(
    request: Request,
    span: Annotated[Span, Depends(sequence_range)],
    state: AppState,
    metrics: AppMetrics,
) -> StreamingResponse:
    accept = request.headers.get("accept", "")
    return stream_response(span, state.config.block_positions, metrics, accept)
