"""TRL ≥ 1.11's teacher request, answered from stores (docs/PROTOCOL.md §5).

From TRL 1.11 on, ``VLLMClient.get_sequence_logprobs`` no longer posts
``/get_sequence_logprobs/``: it asks a vLLM server's OpenAI-style ``POST /v1/completions``
to score the sequences as prompts (``prompt_logprobs = k``, ``max_tokens = 1``), after
``GET /health`` and ``GET /v1/models``. This module answers that subset from stores, with the
lookup and alignment of :mod:`.trl`: each served store is a "model" (its name), and the
answer's ``prompt_logprobs[p]`` is the stored distribution over token ``p`` (``None`` at 0),
candidates keyed by token id with their ``logprob`` and 1-based ``rank``. Nothing is generated:
a request without ``prompt_logprobs`` is refused.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from .deps import AppState, Served
from .errors import ApiError
from .trl import SequenceLogprobsRequest, check_request, find_all, top_rows

__all__ = ["CompletionsRequest", "router"]

router = APIRouter()

Token = Annotated[int, Field(ge=0, lt=2**31)]


class CompletionsRequest(BaseModel):
    """The part of vLLM's completions request that TRL's teacher client sends."""

    model: str
    prompt: list[list[Token]] | list[Token]
    prompt_logprobs: Annotated[int, Field(ge=1, le=65536)] | None = None
    temperature: float = 1.0
    max_tokens: int | None = None


def _positions(store: Any, s: int, seq: list[int], k: int) -> list[dict[str, Any] | None]:
    """``prompt_logprobs`` of one sequence found as sequence ``s`` of ``store``."""
    out: list[dict[str, Any] | None] = [None] if seq else []
    if len(seq) < 2:
        return out
    base = int(store.offsets[s])
    logp, ids, count, batch = top_rows(store, base, base + len(seq) - 1, k)
    for j in range(len(seq) - 1):  # row j predicts token j + 1
        c = int(count[j])
        entry = {
            str(int(ids[j, r])): {"logprob": float(logp[j, r]), "rank": r + 1} for r in range(c)
        }
        actual = seq[j + 1]
        if str(actual) not in entry:  # vLLM always lists the prompt token: when it is stored
            probs = batch.probs[j]
            hit = (batch.ids[j] == actual) & (probs > 0)
            if hit.any():
                p = float(probs[hit].max())
                entry[str(actual)] = {
                    "logprob": float(np.log(np.float32(p))),
                    "rank": int((probs > p).sum()) + 1,
                }
        out.append(entry)
    return out


def _served(state: Any, model: str) -> Served:
    served: Served | None = state.stores.get(model)
    if served is None:
        names = ", ".join(repr(n) for n in state.stores)
        raise ApiError(
            "unknown_store",
            f"no store named {model!r} (the `model` of a completions request is a store's "
            f"name; this server has {names}: see /v1/models)",
        )
    return served


@router.get("/health", summary="Liveness, where TRL >= 1.11's client checks it")
async def vllm_health() -> Response:
    return Response(status_code=200)


@router.get("/v1/models", summary="The stores, as models (TRL >= 1.11 names one per request)")
async def models(state: AppState) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "owned_by": "logitstore"} for name in state.stores
        ],
    }


@router.post("/v1/completions", summary="Prompt log-probabilities from a store (PROTOCOL.md §5)")
async def completions(req: CompletionsRequest, state: AppState) -> dict[str, Any]:
    served = _served(state, req.model)
    if req.prompt_logprobs is None:
        raise ApiError(
            "bad_request",
            "this server scores prompts from a store and generates nothing: send "
            "prompt_logprobs (TRL's get_sequence_logprobs does)",
        )
    # one prompt of token ids, or a list of them
    prompts = [[int(t) for t in p] if isinstance(p, list) else [int(p)] for p in req.prompt]
    if req.prompt and not isinstance(req.prompt[0], list):
        prompts = [[t for p in prompts for t in p]]
    inner = SequenceLogprobsRequest(
        sequences=prompts,
        prompt_lengths=[0] * len(prompts),
        top_logprobs=req.prompt_logprobs,
        temperature=req.temperature,
    )
    usable = check_request(inner, [served], state.config.max_positions)

    def answer() -> dict[str, Any]:
        found = find_all(inner, usable)
        choices = [
            {
                "index": i,
                "text": "",
                "logprobs": None,
                "finish_reason": "length",
                "prompt_logprobs": _positions(store, s, seq, inner.top_logprobs),
            }
            for i, ((store, s), seq) in enumerate(zip(found, prompts, strict=True))
        ]
        return {"object": "text_completion", "model": served.name, "choices": choices}

    return await run_in_threadpool(answer)
