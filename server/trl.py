"""TRL's teacher-server request, answered from stores (docs/PROTOCOL.md §5).

TRL's server-side distillation asks a teacher server ``POST /get_sequence_logprobs/`` for the
top-k log-probabilities of token sequences it already has (``trl vllm-serve`` computes them
with vLLM; TRL 1.5 – 1.10 send this request, later ones ask vLLM's own API, answered by
:mod:`.trl_vllm`). Here they are looked up instead: a sequence is
found in a store by its tokens — a stored sequence that begins with the requested tokens —
and the stored distributions at its positions are sent in TRL's request's format, JSON or
``binary`` (base64 NumPy arrays). A sequence that is in no store is a 404 ``unknown_sequence``.

Alignment: TRL's position ``p`` of a sequence is the distribution over token ``p`` given
tokens ``[0, p)``: the stored row of position ``p − 1`` (a stored row predicts the next token).
Position 0 has none (an empty list, or ``-inf`` rows in binary). Candidates are sent in
descending probability, at most ``top_logprobs`` of them, padded with ``-inf`` (id 0) in
binary; the store's residual has no place in this format and is not sent.

Routes: ``/get_sequence_logprobs/`` and ``/health/`` at the root look in every served store,
in the order they were named; under ``/v1/stores/NAME/`` they look in that store only, so a
TRL ``teacher_model_server_url`` may be either ``http://HOST:PORT`` or
``http://HOST:PORT/v1/stores/NAME``.
"""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

import logitstore

from .deps import AppState, Served, State, get_store
from .errors import ApiError

__all__ = [
    "MAX_ANSWER_CELLS",
    "PREFIX_TOKENS",
    "SequenceIndex",
    "SequenceLogprobsRequest",
    "check_request",
    "find_all",
    "router",
    "top_rows",
]

router = APIRouter()

#: tokens of each stored sequence's start that the index keeps (its lookup key)
PREFIX_TOKENS = 16
#: most log-probabilities one answer may hold (2**26: 256 MiB of float32 before base64)
MAX_ANSWER_CELLS = 1 << 26
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the rolling hash


class SequenceLogprobsRequest(BaseModel):
    """The body TRL's ``VLLMClient.get_sequence_logprobs`` posts (TRL 1.5 – 1.10)."""

    sequences: list[list[Annotated[int, Field(ge=0, lt=2**31)]]]
    prompt_lengths: list[Annotated[int, Field(ge=0)]]
    top_logprobs: Annotated[int, Field(ge=1, le=65536)] = 100
    temperature: float = 1.0
    response_format: Literal["json", "binary"] = "json"


def _hash_rows(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of ``rows (S, K)`` int64 (collisions are resolved by
    comparing tokens, so this only has to spread keys)."""
    h = np.zeros(len(rows), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in rows.T.astype(np.uint64):
            h = (h ^ col) * _MULT
    return h


class SequenceIndex:
    """Every sequence of one store, found by its first :data:`PREFIX_TOKENS` tokens.

    Built once per store, on its first lookup (it reads the store's input tokens, not its
    distributions): ``(S, K)`` int32 prefixes (-1 past a sequence's end), their hashes sorted,
    and sequence lengths — about 90 bytes per sequence.
    """

    def __init__(self, store: logitstore.StoreBase) -> None:
        self.store = store
        offsets = store.offsets.astype(np.int64)
        self.lengths = np.diff(offsets)  # (S,)
        k = PREFIX_TOKENS
        take = np.minimum(self.lengths, k)  # (S,) prefix tokens each sequence has
        cols = np.arange(k)
        valid = cols[None, :] < take[:, None]  # (S, K)
        where = (offsets[:-1, None] + cols[None, :])[valid]  # ascending positions to read
        values = np.empty(len(where), dtype=np.int64)
        step = 1 << 22
        for a in range(0, len(store), step):
            b = min(a + step, len(store))
            lo, hi = np.searchsorted(where, [a, b])
            if lo < hi:
                tokens = store.read_tokens(a, b)[0]
                values[lo:hi] = tokens[where[lo:hi] - a]
        self.prefix = np.full((len(self.lengths), k), -1, dtype=np.int64)
        self.prefix[valid] = values
        hashes = _hash_rows(self.prefix)
        self.order = np.argsort(hashes, kind="stable")  # (S,) sequences by hash
        self.hashes = hashes[self.order]
        self.prefix = self.prefix.astype(np.int32)

    def find(self, tokens: Sequence[int]) -> int | None:
        """Index of the first stored sequence that begins with ``tokens``, or ``None``."""
        n, k = len(tokens), PREFIX_TOKENS
        q = np.asarray(tokens, dtype=np.int64)
        if n >= k:
            h = _hash_rows(q[None, :k])[0]
            lo = int(np.searchsorted(self.hashes, h, side="left"))
            hi = int(np.searchsorted(self.hashes, h, side="right"))
            candidates = np.sort(self.order[lo:hi])  # the same hash: compare the tokens
            candidates = candidates[(self.prefix[candidates] == q[:k]).all(axis=1)]
        else:  # shorter than the key: compare the prefixes themselves
            candidates = np.flatnonzero((self.prefix[:, :n] == q).all(axis=1))
        for s in candidates:
            s = int(s)
            if self.lengths[s] < n:
                continue
            start = int(self.store.offsets[s])
            if n <= k or np.array_equal(self.store.read_tokens(start, start + n)[0], q):
                return s
        return None


_indexes: dict[int, SequenceIndex] = {}
_lock = threading.Lock()


def _index(store: logitstore.StoreBase) -> SequenceIndex:
    with _lock:  # one build per store, even under concurrent first requests
        index = _indexes.get(id(store))
        if index is None or index.store is not store:
            index = _indexes[id(store)] = SequenceIndex(store)
        return index


def check_request(req: SequenceLogprobsRequest, stores: list[Served], limit: int) -> list[Served]:
    """Refuse a malformed request; the stores that can answer it."""
    if len(req.sequences) != len(req.prompt_lengths):
        raise ApiError(
            "bad_request",
            f"{len(req.sequences)} sequences but {len(req.prompt_lengths)} prompt_lengths: "
            "send one prompt length per sequence",
        )
    for i, (seq, pl) in enumerate(zip(req.sequences, req.prompt_lengths, strict=True)):
        if pl > len(seq):
            raise ApiError(
                "bad_request",
                f"sequence {i} has prompt_length {pl} but only {len(seq)} tokens: expected "
                "0 <= prompt_length <= len(sequence)",
            )
    total = sum(len(s) for s in req.sequences)
    if total > limit:
        raise ApiError(
            "range_too_large",
            f"{total} tokens asked for; at most {limit} per request: send fewer sequences",
        )
    # The binary answer is (B, longest completion, top_logprobs): bound what it allocates.
    width = max(
        (len(s) - pl for s, pl in zip(req.sequences, req.prompt_lengths, strict=True)), default=0
    )
    cells = len(req.sequences) * width * req.top_logprobs
    if cells > MAX_ANSWER_CELLS:
        raise ApiError(
            "range_too_large",
            f"the answer would hold {cells} log-probabilities (sequences × longest completion × "
            f"top_logprobs); at most {MAX_ANSWER_CELLS}: send fewer sequences or ask fewer "
            "top_logprobs",
        )
    if not math.isfinite(req.temperature) or req.temperature <= 0:
        raise ApiError("bad_request", f"temperature must be > 0, got {req.temperature}")
    # Stores that can answer: with distributions, at the asked temperature.
    usable = [
        served
        for served in stores
        if served.store.encoding.kind != "none"
        and math.isclose(served.store.encoding.temperature, req.temperature, rel_tol=1e-6)
    ]
    if not usable:
        held = ", ".join(
            f"{served.name!r}: "
            + (
                "tokens only"
                if served.store.encoding.kind == "none"
                else f"temperature {served.store.encoding.temperature:g}"
            )
            for served in stores
        )
        raise ApiError(
            "bad_request",
            f"no store here holds teacher distributions at temperature {req.temperature:g} "
            f"({held}); other temperatures cannot be derived from stored top-k values: ask "
            "for a store's temperature (TRL: the trainer's `temperature`)",
        )
    return usable


def top_rows(store: logitstore.StoreBase, start: int, stop: int, k: int) -> tuple[Any, ...]:
    """Rows ``[start, stop)`` as ``(log-probs (n, k) f32, ids (n, k) i32, counts (n,))``,
    candidates in descending probability; plus the decoded batch for the actual tokens."""
    batch = store.read(start, stop)
    probs = batch.probs  # (n, m)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n, k') most likely first
    top_p = np.take_along_axis(probs, order, axis=1)
    top_ids = np.take_along_axis(batch.ids, order, axis=1)
    with np.errstate(divide="ignore"):
        logp = np.log(top_p.astype(np.float32))  # padding (p = 0) becomes -inf
    return logp, top_ids.astype(np.int32), (top_p > 0).sum(axis=1), batch


def _answer(
    req: SequenceLogprobsRequest, found: list[tuple[logitstore.StoreBase, int]]
) -> dict[str, Any]:
    k = req.top_logprobs
    lens = [len(s) - pl for s, pl in zip(req.sequences, req.prompt_lengths, strict=True)]
    width = max(lens, default=0)
    lp_arr = np.full((len(found), width, k), -np.inf, dtype=np.float32)
    id_arr = np.zeros((len(found), width, k), dtype=np.int32)
    act_lp = np.full((len(found), width, 1), -np.inf, dtype=np.float32)
    act_id = np.zeros((len(found), width, 1), dtype=np.int32)
    json_lp: list[list[list[float]]] = []
    json_ids: list[list[list[int]]] = []
    for i, ((store, s), seq, pl) in enumerate(
        zip(found, req.sequences, req.prompt_lengths, strict=True)
    ):
        first = max(pl, 1)  # position 0 has no distribution
        base = int(store.offsets[s])
        empty = min(first, len(seq)) - pl  # leading positions without a distribution
        seq_lp: list[list[float]] = [[] for _ in range(empty)]
        seq_ids: list[list[int]] = [[] for _ in range(empty)]
        if first < len(seq):
            # TRL position p ↔ stored row p − 1.  (n, ·) rows for positions first … len − 1
            logp, ids, count, batch = top_rows(store, base + first - 1, base + len(seq) - 1, k)
            actual = np.asarray(seq[first:], dtype=np.int64)  # (n,)
            hit = batch.ids == actual[:, None]  # (n, m)
            has = hit.any(axis=1) & (np.where(hit, batch.probs, 0).max(axis=1) > 0)
            with np.errstate(divide="ignore"):
                actual_lp = np.log(np.where(hit, batch.probs, 0).max(axis=1).astype(np.float32))
            t = first - pl
            n = len(actual)
            lp_arr[i, t : t + n, : logp.shape[1]] = logp
            id_arr[i, t : t + n, : ids.shape[1]] = np.where(np.isfinite(logp), ids, 0)
            act_lp[i, t : t + n, 0] = np.where(has, actual_lp, -np.inf)
            act_id[i, t : t + n, 0] = actual
            if req.response_format == "json":
                for j in range(n):
                    c = int(count[j])
                    row_ids, row_lp = ids[j, :c].tolist(), logp[j, :c].tolist()
                    # vLLM's answer also lists the actual token when it is outside the top k
                    if has[j] and int(actual[j]) not in row_ids:
                        row_ids.append(int(actual[j]))
                        row_lp.append(float(actual_lp[j]))
                    seq_ids.append(row_ids)
                    seq_lp.append(row_lp)
        json_lp.append(seq_lp)
        json_ids.append(seq_ids)
    if req.response_format == "json":
        return {"logprobs": json_lp, "logprob_token_ids": json_ids}
    return {
        "logprobs_b64": base64.b64encode(lp_arr.tobytes()).decode("ascii"),
        "token_ids_b64": base64.b64encode(id_arr.tobytes()).decode("ascii"),
        "actual_logprobs_b64": base64.b64encode(act_lp.tobytes()).decode("ascii"),
        "actual_token_ids_b64": base64.b64encode(act_id.tobytes()).decode("ascii"),
        "shape": [len(found), width, k],
        "completion_lengths": lens,
    }


def find_all(
    req: SequenceLogprobsRequest, stores: list[Served]
) -> list[tuple[logitstore.StoreBase, int]]:
    """The store and sequence index that answers each requested sequence.

    Raises: ApiError ``unknown_sequence`` for the first sequence that is in no store.
    """
    found: list[tuple[logitstore.StoreBase, int]] = []
    for i, seq in enumerate(req.sequences):
        hit = None
        for served in stores:
            s = _index(served.store).find(seq)
            if s is not None:
                hit = (served.store, s)
                break
        if hit is None:
            names = ", ".join(repr(served.name) for served in stores)
            where = f"store {names}" if len(stores) == 1 else f"any of the stores {names}"
            head = ", ".join(map(str, seq[:8])) + (", …" if len(seq) > 8 else "")
            raise ApiError(
                "unknown_sequence",
                f"sequence {i} ({len(seq)} tokens: {head}) is not in {where}: only sequences "
                "whose tokens begin a stored sequence can be answered; write their teacher "
                "distributions into a store first (`logitstore write`)",
            )
        found.append(hit)
    return found


def _lookup(req: SequenceLogprobsRequest, stores: list[Served]) -> dict[str, Any]:
    return _answer(req, find_all(req, stores))


async def _respond(req: SequenceLogprobsRequest, stores: list[Served], state: State) -> Any:
    usable = check_request(req, stores, state.config.max_positions)
    # Index building and decoding are blocking work: off the event loop.
    return await run_in_threadpool(_lookup, req, usable)


@router.get("/health/", summary="Liveness, where TRL's teacher client checks it")
async def trl_health(state: AppState) -> dict[str, Any]:
    return {"status": "ok", "stores": len(state.stores)}


@router.post(
    "/get_sequence_logprobs/",
    summary="TRL's teacher request, answered from every served store (PROTOCOL.md §5)",
)
async def sequence_logprobs(req: SequenceLogprobsRequest, state: AppState) -> Any:
    return await _respond(req, list(state.stores.values()), state)


@router.get("/v1/stores/{name}/health/", summary="Liveness of one store, for TRL's client")
async def trl_store_health(served: Annotated[Served, Depends(get_store)]) -> dict[str, Any]:
    return {"status": "ok", "stores": 1}


@router.post(
    "/v1/stores/{name}/get_sequence_logprobs/",
    summary="TRL's teacher request, answered from one store (PROTOCOL.md §5)",
)
async def store_sequence_logprobs(
    req: SequenceLogprobsRequest, served: Annotated[Served, Depends(get_store)], state: AppState
) -> Any:
    return await _respond(req, [served], state)
