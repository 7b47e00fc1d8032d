"""TRL's teacher request answered by a real `logitstore serve` process, asked by TRL's own
client (``trl.generation.vllm_client.VLLMClient``, TRL 1.10.0 as pinned in pyproject)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding

from .test_server import Server

VOCAB = 300


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A top-8 store (T = 1) and a sampled store at T = 0.7 over other sequences."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("trl")
    out = {}
    for name, enc, n in (
        ("topk", Encoding("topk", "u8", k=8), 12),
        ("sampled", Encoding("sampled", "u8", samples=64, temperature=0.7), 4),
    ):
        lengths = rng.integers(5, 60, n)
        seqs = logitstore.sequences_from_token_ids(
            [rng.integers(0, VOCAB, int(x)) for x in lengths], 64
        )
        out[name] = Path(logitstore.capture(teacher, seqs, root / name, enc, progress=False))
    return out


@pytest.fixture(scope="module")
def server(stores: dict[str, Path]) -> Iterator[Server]:
    srv = Server([stores["topk"], stores["sampled"]]).start()
    yield srv
    srv.stop()


def trl_client(base_url: str):  # type: ignore[no-untyped-def]
    """TRL's own teacher client. Its constructor refuses to run without vLLM installed (it
    also drives vLLM's weight sync, which a store server does not have); that one check is
    lifted, and every request and answer goes through TRL's code."""
    from trl.generation import vllm_client

    mp = pytest.MonkeyPatch()
    mp.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    try:
        return vllm_client.VLLMClient(base_url=base_url)
    finally:
        mp.undo()


def expected(store: logitstore.StoreBase, s: int, seq: list[int], pl: int, k: int):  # type: ignore[no-untyped-def]
    """The store's own answer for sequence ``s``: per position p >= max(pl, 1), the row of
    p - 1, candidates by descending probability."""
    base = int(store.offsets[s])
    lps, ids, actual = [], [], []
    for p in range(max(pl, 1), len(seq)):
        b = store.read(base + p - 1, base + p)
        order = np.argsort(-b.probs[0], kind="stable")
        order = order[b.probs[0][order] > 0][:k]
        lps.append(np.log(b.probs[0][order].astype(np.float32)).tolist())
        ids.append(b.ids[0][order].tolist())
        hit = (b.ids[0] == seq[p]) & (b.probs[0] > 0)
        actual.append(float(np.log(np.float32(b.probs[0][hit].max()))) if hit.any() else -np.inf)
    return lps, ids, actual


def test_trl_client_gets_the_stored_distributions_binary(server: Server, stores) -> None:
    store = logitstore.open(stores["topk"])
    picks = [0, 3, 7]
    seqs = [
        store.read_tokens(int(store.offsets[s]), int(store.offsets[s + 1]))[0].tolist()
        for s in picks
    ]
    prompt_lengths = [0, 2, len(seqs[2]) // 2]
    client = trl_client(f"http://127.0.0.1:{server.port}")
    for k in (3, 20):  # fewer than the store's 8 candidates, and more (padded with -inf)
        got = client.get_sequence_logprobs(seqs, prompt_lengths, top_logprobs=k)
        for i, (s, seq, pl) in enumerate(zip(picks, seqs, prompt_lengths, strict=True)):
            lps, ids, actual = expected(store, s, seq, pl, k)
            rows = got["logprobs"][i]
            assert len(rows) == len(seq) - pl
            offset = 1 if pl == 0 else 0  # position 0 has no distribution: -inf, id 0
            if offset:
                assert rows[0] == [-np.inf] * k and got["logprob_token_ids"][i][0] == [0] * k
            for j, (lp, tid) in enumerate(zip(lps, ids, strict=True)):
                row, row_ids = rows[j + offset], got["logprob_token_ids"][i][j + offset]
                assert row[: len(lp)] == pytest.approx(lp, abs=0) and row_ids[: len(tid)] == tid
                assert row[len(lp) :] == [-np.inf] * (k - len(lp))
            assert [a[0] for a in got["actual_logprobs"][i][offset:]] == pytest.approx(
                actual, abs=0
            )
            assert [a[0] for a in got["actual_token_ids"][i][offset:]] == seq[pl + offset :]


def test_json_answer_prefixes_and_a_store_url(server: Server, stores) -> None:
    """A prefix of a stored sequence is answered from it (a causal teacher's distributions
    over a prefix are the longer sequence's), short or long, through the store's own URL."""
    store = logitstore.open(stores["sampled"])
    s = 2
    full = store.read_tokens(int(store.offsets[s]), int(store.offsets[s + 1]))[0].tolist()
    seqs = [full[: min(len(full), 20)], full[:3]]
    client = trl_client(server.url("sampled"))
    got = client.get_sequence_logprobs(
        seqs, [1, 1], top_logprobs=4, temperature=0.7, use_binary=False
    )
    for i, seq in enumerate(seqs):
        lps, ids, _ = expected(store, s, seq, 1, 4)
        assert [r[: len(x)] for r, x in zip(got["logprob_token_ids"][i], ids, strict=True)] == ids
        for r, x in zip(got["logprobs"][i], lps, strict=True):
            assert r[: len(x)] == pytest.approx(x, abs=0)


def test_chunked_concurrent_requests(server: Server, stores) -> None:
    store = logitstore.open(stores["topk"])
    seqs = [
        store.read_tokens(int(store.offsets[s]), int(store.offsets[s + 1]))[0].tolist()
        for s in range(6)
    ]
    client = trl_client(f"http://127.0.0.1:{server.port}")
    whole = client.get_sequence_logprobs(seqs, [1] * 6, top_logprobs=5)
    chunked = client.get_sequence_logprobs(seqs, [1] * 6, top_logprobs=5, chunk_size=2)
    assert chunked == whole


def test_unknown_sequence_and_bad_requests_are_clear(server: Server, stores) -> None:
    client = trl_client(f"http://127.0.0.1:{server.port}")
    store = logitstore.open(stores["topk"])
    seq = store.read_tokens(0, int(store.offsets[1]))[0].tolist()
    altered = [*seq[:-1], (seq[-1] + 1) % VOCAB]
    with pytest.raises(Exception, match=r"404.*unknown_sequence.*sequence 1 \(") as err:
        client.get_sequence_logprobs([seq, altered], [0, 0])
    assert "is not in store 'topk'" in str(err.value)  # the one store at temperature 1
    with pytest.raises(
        Exception,
        match=r"400.*at temperature 0.5 \('topk': temperature 1, 'sampled': temperature 0.7\)",
    ):
        client.get_sequence_logprobs([seq], [0], temperature=0.5)
    with pytest.raises(Exception, match=r"400.*prompt_length 99 but only"):
        client.get_sequence_logprobs([seq[:5]], [99])
    # (Not through TRL's constructor: its health check retries a non-200 answer forever.)
    answer = client.session.post(
        f"{server.url('nope')}/get_sequence_logprobs/",
        json={"sequences": [seq], "prompt_lengths": [0]},
    )
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "unknown_store"
    answer = client.session.post(
        f"http://127.0.0.1:{server.port}/get_sequence_logprobs/",
        json={"sequences": [[-1]], "prompt_lengths": [0]},
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request"
    for body in (
        {"sequences": [[2**70]], "prompt_lengths": [0]},  # not a token id
        {"sequences": [[1, 2]], "prompt_lengths": [0, 0]},  # lengths disagree
        {"sequences": [[1, 2]], "prompt_lengths": [0], "response_format": "xml"},
        {"sequences": [[1, 2]], "prompt_lengths": [0], "top_logprobs": 0},
        {"sequences": "nope"},
    ):
        answer = client.session.post(
            f"http://127.0.0.1:{server.port}/get_sequence_logprobs/", json=body
        )
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request", body
    body = {"sequences": [seq] * 400, "prompt_lengths": [0] * 400, "top_logprobs": 65536}
    answer = client.session.post(
        f"http://127.0.0.1:{server.port}/get_sequence_logprobs/", json=body
    )
    assert answer.status_code == 413 and "at most 67108864" in answer.json()["error"]["message"]


def test_the_store_is_unchanged_and_other_methods_refused(server: Server, stores) -> None:
    before = {p: p.read_bytes() for p in stores["topk"].rglob("*") if p.is_file()}
    status, _, body = server.get("/get_sequence_logprobs/")
    assert status == 405 and b"method_not_allowed" in body
    status, _, body = server.get("/health/")
    assert status == 200
    after = {p: p.read_bytes() for p in stores["topk"].rglob("*") if p.is_file()}
    assert before == after


def test_vllm_completions_route_for_newer_trl(server: Server, stores) -> None:
    """TRL >= 1.11 asks `/v1/completions` for prompt log-probabilities (the pinned TRL's client
    does not, so the request is the one TRL 1.16's `get_sequence_logprobs` sends): the answer
    holds the same values as `/get_sequence_logprobs/`."""
    import requests

    base = f"http://127.0.0.1:{server.port}"
    assert requests.get(f"{base}/health").status_code == 200
    assert [m["id"] for m in requests.get(f"{base}/v1/models").json()["data"]] == [
        "topk",
        "sampled",
    ]
    store = logitstore.open(stores["topk"])
    seqs = [
        store.read_tokens(int(store.offsets[s]), int(store.offsets[s + 1]))[0].tolist()
        for s in (1, 4)
    ]
    body = {"model": "topk", "prompt": seqs, "max_tokens": 1, "temperature": 1.0}
    got = requests.post(f"{base}/v1/completions", json={**body, "prompt_logprobs": 3}).json()
    ref = requests.post(
        f"{base}/get_sequence_logprobs/",
        json={"sequences": seqs, "prompt_lengths": [0, 0], "top_logprobs": 3},
    ).json()
    for choice, ref_lp, ref_ids, seq in zip(
        got["choices"], ref["logprobs"], ref["logprob_token_ids"], seqs, strict=True
    ):
        positions = choice["prompt_logprobs"]
        assert positions[0] is None and len(positions) == len(seq)
        for p in range(1, len(seq)):
            by_rank = sorted(positions[p].items(), key=lambda kv: kv[1]["rank"])
            top = [(int(t), v["logprob"]) for t, v in by_rank if v["rank"] <= 3]
            assert [t for t, _ in top] == ref_ids[p][:3]
            assert [v for _, v in top] == pytest.approx(ref_lp[p][:3], abs=0)
            if str(seq[p]) in positions[p]:  # the prompt token, as vLLM lists it
                assert seq[p] in ref_ids[p]
    refused = requests.post(f"{base}/v1/completions", json={**body, "model": "nope"})
    assert refused.status_code == 404 and "see /v1/models" in refused.json()["error"]["message"]
    refused = requests.post(f"{base}/v1/completions", json=body)  # no prompt_logprobs
    assert refused.status_code == 400 and "generates nothing" in refused.json()["error"]["message"]
