"""The store browser (issue 16) in a real headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real ``logitstore serve`` process, plus its JSON endpoints over a real
socket. What the page shows is compared with what ``logitstore.open().read()`` returns."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding

VOCAB = 300
TOKEN = "viewer-token"
NEEDLE = 299  # a token that occurs in one sequence only: what the search finds
# Tokens a hostile tokenizer may hold, and how the page must show them: as text, with
# control and direction characters escaped.
HOSTILE = {
    290: ("<script>window.__pwned=1</script>", "<script>window.__pwned=1</script>"),
    291: ('<img src=x onerror="window.__pwned=2">', '<img src=x onerror="window.__pwned=2">'),
    292: ("<b>bold</b>&amp;", "<b>bold</b>&amp;"),
    293: ("\u202eevil\u202c", "\\u202eevil\\u202c"),
    294: ("\x1b[31mred\x00", "\\x1b[31mred\\x00"),
    295: ("שלום ", "שלום "),
    296: ("line\nbreak", "line↵\nbreak"),
}
CHROMIUM = os.environ.get("LOGITSTORE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = os.environ.get("LOGITSTORE_VIEWER_SHOTS")  # a folder: save the docs' screenshots there


def _vocab() -> dict[str, int]:
    words = {i: f"t{i} " for i in range(VOCAB)}
    words[NEEDLE] = "needle "
    words |= {i: text for i, (text, _) in HOSTILE.items()}
    return {w: i for i, w in words.items()}


def _teacher(scale: float) -> logitstore.Teacher:
    from tokenizers import Tokenizer, models

    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(3)) * scale
    tok = Tokenizer(models.WordLevel(_vocab(), unk_token="t0 "))
    teacher = logitstore.Teacher(
        fn=lambda ids, mask: table[ids], vocab_size=VOCAB, device=torch.device("cpu")
    )
    teacher.tokenizer = SimpleNamespace(get_vocab=tok.get_vocab, backend_tokenizer=tok)
    return teacher


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("viewed")
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 280, int(n)) for n in rng.integers(5, 120, 12)]
    docs[2] = np.array([1, *HOSTILE, 2, 3])  # sequence 2: the hostile tokens
    docs[5] = rng.integers(0, 280, 1500)  # sequence 5: longer than one window of the page
    docs[7][3] = NEEDLE
    seqs = logitstore.sequences_from_token_ids(docs, 2048)
    mask = (rng.random(len(seqs.input_ids)) < 0.7).astype(np.uint8)
    out = {}
    for name, scale, enc in (
        ("topk", 3.0, Encoding("topk", "u8", k=16)),
        ("full", 3.0, Encoding("full", "fp32")),
        ("full_t07", 3.0, Encoding("full", "fp32", temperature=0.7)),
        ("other", 1.0, Encoding("topk", "u8", k=16)),  # same text, another teacher
    ):
        out[name] = logitstore.capture(
            _teacher(scale),
            seqs,
            root / name,
            enc,
            progress=False,
            loss_mask=mask if name == "topk" else None,
        )
    for name, enc in (  # the encodings without a residual, and without distributions
        ("sampled", Encoding("sampled", "count", samples=32)),
        ("tokens", Encoding("none", "none")),
    ):
        out[name] = logitstore.capture(
            _teacher(3.0), seqs, root / name, enc, progress=False, loss_mask=mask
        )
    shifted = logitstore.sequences_from_token_ids([(d + 1) % 280 for d in docs], 2048)
    out["shifted"] = logitstore.capture(  # other text: refused by compare
        _teacher(3.0), shifted, root / "shifted", Encoding("topk", "u8", k=16), progress=False
    )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``logitstore serve`` in a subprocess, on a free port, with a token."""

    def __init__(self, stores: list[Path], token_file: Path) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "logitstore", "serve", *map(str, stores)]
        cmd += ["--port", str(self.port), "--token-file", str(token_file)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if self.get("/v1/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(list(stores.values()), _token_file(tmp_path_factory.mktemp("tok")))
    yield srv
    srv.stop()


# ---- the JSON endpoints, over a real socket -------------------------------------------------


def test_the_page_is_public_and_its_data_is_not(server: Server) -> None:
    for path in ("/", "/v1/stores/topk/view", "/view/viewer.js", "/view/viewer.css"):
        status, headers, body = server.get(path, token=None)
        assert status == 200, path
        assert "script-src 'self'" in headers["content-security-policy"]
    assert b'content="bearer"' in server.get("/", token=None)[2]
    for path in ("/v1/stores/topk/view/tokens?start=0&stop=5", "/v1/stores/topk/view/stats"):
        assert server.get(path, token=None)[0] == 401
        assert server.get(path, token="wrong")[0] == 403
    status, _, body = server.get("/view/../app.py")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_tokens_and_positions_agree_with_the_reader(server: Server, stores) -> None:
    store = logitstore.open(stores["topk"])
    s0, s1 = int(store.offsets[3]), int(store.offsets[4])
    got = server.json(f"/v1/stores/topk/view/tokens?start={s0}&stop={s1}")
    b = store.read(s0, s1)
    assert got["input_ids"] == b.input_ids.tolist()
    assert got["loss_mask"] == b.loss_mask.astype(int).tolist()
    assert got["next_ids"] == [*b.input_ids[1:].tolist(), -1]  # none past the sequence end
    np.testing.assert_allclose(got["residual"], b.residual, atol=1e-6)
    np.testing.assert_allclose(got["top1"], b.probs.max(axis=1), atol=1e-6)
    p = np.where(b.probs > 0, b.probs, 1).astype(np.float64)
    r = np.where(b.residual > 0, b.residual, 1).astype(np.float64)
    entropy = -(b.probs * np.log(p)).sum(1) - b.residual * np.log(r)
    np.testing.assert_allclose(got["entropy"], entropy, atol=1e-5)
    for i in range(s1 - s0 - 1):  # surprisal: -log p(next), or at least -log residual
        hit = (b.ids[i] == b.input_ids[i + 1]) & (b.probs[i] > 0)
        p_next = b.probs[i][hit].sum() if hit.any() else b.residual[i]
        assert got["next_stored"][i] == bool(hit.any())
        assert got["surprisal"][i] == pytest.approx(-np.log(p_next), abs=1e-4)
    assert got["surprisal"][-1] is None
    one = server.json(f"/v1/stores/topk/view/position/{s0}?limit=4")
    order = np.argsort(-b.probs[0], kind="stable")
    assert [c["id"] for c in one["candidates"]] == b.ids[0][order[:4]].tolist()
    assert one["rest"] == pytest.approx(float(b.probs[0][order[4:]].sum()), abs=1e-6)
    assert one["next"]["id"] == int(b.input_ids[1]) and one["token"]["text"].startswith("t")


def test_view_requests_are_bounded_and_refusals_are_clear(server: Server) -> None:
    cases = [
        ("/v1/stores/topk/view/tokens?start=0&stop=2049", 413, "range_too_large"),
        ("/v1/stores/topk/view/tokens?start=5&stop=2", 400, "bad_range"),
        ("/v1/stores/topk/view/position/99999999", 416, "range_not_satisfiable"),
        ("/v1/stores/topk/view/position/0?limit=100000", 400, "bad_request"),
        ("/v1/stores/topk/view/locate", 400, "bad_request"),
        ("/v1/stores/topk/view/locate?sequence=999", 416, "range_not_satisfiable"),
        ("/v1/stores/topk/view/search?q=", 400, "bad_request"),
        ("/v1/stores/nope/view/stats", 404, "unknown_store"),
        ("/v1/stores/topk/view/compare?other=nope&start=0&stop=3", 404, "unknown_store"),
        ("/v1/stores/topk/view/compare?other=shifted&start=0&stop=3", 400, "bad_request"),
    ]
    for path, status, code in cases:
        got, _, body = server.get(path)
        assert got == status, (path, body)
        err = json.loads(body)["error"]
        assert err["code"] == code and err["message"], path
    _, _, body = server.get("/v1/stores/topk/view/compare?other=shifted&start=0&stop=3")
    assert "different tokens from position 0" in json.loads(body)["error"]["message"]


def test_search_finds_the_one_sequence_and_says_where_to_go_on(server: Server, stores) -> None:
    store = logitstore.open(stores["topk"])
    got = server.json("/v1/stores/topk/view/search?q=NEEDLE")
    assert [(m["sequence"], m["position"]) for m in got["matches"]] == [
        (7, int(store.offsets[7]) + 3)
    ]
    assert got["next_sequence"] is None
    assert server.json("/v1/stores/topk/view/search?q=needle&from_sequence=8")["matches"] == []


def test_search_reads_a_long_sequence_block_by_block(stores, monkeypatch) -> None:
    # A sequence longer than one read block is searched a block at a time (never read whole),
    # and a match that straddles two blocks is still found where it begins.
    from logitstore_server import view

    store = logitstore.open(stores["topk"])
    s0, s1 = int(store.offsets[5]), int(store.offsets[6])
    text = view.TokenText(store)
    pieces = text(store.read_tokens(s0, s1)[0])
    monkeypatch.setattr(view, "READ_BLOCK", 7)
    reads: list[int] = []
    read_tokens = store.read_tokens
    monkeypatch.setattr(store, "read_tokens", lambda a, b: reads.append(b - a) or read_tokens(a, b))
    for at in (0, 5, 6, 7, 13, 700, s1 - s0 - 3):
        for width in (1, 2, 3, 9):
            needle = "".join(pieces[at : at + width])[1:].casefold()  # starts inside a token
            joined = "".join(pieces).casefold()
            ends = np.cumsum([len(p) for p in pieces])
            want = s0 + int(np.searchsorted(ends, joined.find(needle), side="right"))
            assert view._first_match(store, text, s0, s1, needle) == want, (at, width)
    assert view._first_match(store, text, s0, s1, "no such text") is None
    assert max(reads) <= 7


def test_compare_is_the_kl_between_the_two_distributions(server: Server, stores) -> None:
    a, b = logitstore.open(stores["full"]), logitstore.open(stores["full_t07"])
    got = server.json("/v1/stores/full/view/compare?other=full_t07&start=10&stop=60")
    p = a.read(10, 60).probs.astype(np.float64)
    q = b.read(10, 60).probs.astype(np.float64)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1)  # full fp32 stores: no zeros
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-4, atol=1e-6)
    assert server.json("/v1/stores/full/view/compare?other=full&start=0&stop=9")["kl"] == [0] * 9
    # two top-k stores: each residual spread evenly over the tokens its store left out
    got = server.json("/v1/stores/topk/view/compare?other=other&start=0&stop=40")["kl"]
    dense = []
    for store in (logitstore.open(stores["topk"]), logitstore.open(stores["other"])):
        b = store.read(0, 40)
        d = np.repeat((b.residual / (VOCAB - 16))[:, None], VOCAB, axis=1).astype(np.float64)
        np.put_along_axis(d, b.ids, b.probs, axis=1)  # k = 16 < V: no padding
        dense.append(d)
    p, q = dense
    kl = (p * np.log(np.where(p > 0, p, 1) / q)).sum(axis=1)
    np.testing.assert_allclose(got, kl, rtol=1e-4, atol=1e-6)
    assert min(got) > 0


def test_stats_are_histograms_over_a_sample(server: Server, stores) -> None:
    got = server.json("/v1/stores/topk/view/stats")
    n = len(logitstore.open(stores["topk"]))
    assert got["positions"] == min(n, 16 * 256)
    for key in ("entropy", "residual", "top1"):
        h = got[key]
        assert sum(h["counts"]) == got["positions"] and len(h["edges"]) == len(h["counts"]) + 1


def test_stores_without_a_residual_or_without_distributions(server: Server, stores) -> None:
    store = logitstore.open(stores["sampled"])
    got = server.json("/v1/stores/sampled/view/tokens?start=0&stop=50")
    b = store.read(0, 50)
    for i in range(49):  # a next token no sample drew has no surprisal to show
        hit = (b.ids[i] == b.input_ids[i + 1]) & (b.probs[i] > 0)
        assert got["next_stored"][i] == bool(hit.any())
        if not hit.any():
            assert got["surprisal"][i] is None
    assert got["residual"] == [0] * 50
    kl = server.json("/v1/stores/topk/view/compare?other=sampled&start=0&stop=50")["kl"]
    assert all(np.isfinite(kl)) and min(kl) >= 0
    tokens = server.json("/v1/stores/tokens/view/tokens?start=0&stop=50")
    assert tokens["kind"] == "none" and "entropy" not in tokens
    assert (
        tokens["loss_mask"]
        == logitstore.open(stores["tokens"]).read_tokens(0, 50)[1].astype(int).tolist()
    )
    one = server.json("/v1/stores/tokens/view/position/3")
    assert one["kind"] == "none" and "candidates" not in one
    assert server.json("/v1/stores/tokens/view/stats")["positions"] == 0
    status, _, body = server.get("/v1/stores/tokens/view/compare?other=topk&start=0&stop=3")
    assert status == 400 and "tokens-only" in json.loads(body)["error"]["message"]


def test_tokens_are_decoded_with_the_stores_own_tokenizer(
    teacher: logitstore.Teacher, data_file: Path, tmp_path: Path
) -> None:
    # a byte-level BPE tokenizer, as real teachers have, stored by the writer
    seqs = logitstore.tokenize(logitstore.read_documents([data_file]), teacher.tokenizer, 64)
    path = logitstore.capture(
        teacher, seqs, tmp_path / "bpe", Encoding("topk", "u8", k=8), progress=False
    )
    tok = logitstore.open(path).tokenizer()
    assert tok is not None
    srv = Server([path], _token_file(tmp_path))
    try:
        got = srv.json("/v1/stores/bpe/view/tokens?start=0&stop=64")
        assert got["text"] == [tok.decode([i], skip_special_tokens=False) for i in got["input_ids"]]
        one = srv.json("/v1/stores/bpe/view/position/0?limit=8")
        assert [c["text"] for c in one["candidates"]] == [
            tok.decode([c["id"]], skip_special_tokens=False) for c in one["candidates"]
        ]
        assert (
            "def" in "".join(got["text"])
            and srv.json("/v1/stores/bpe/view/search?q=DEF%20add")["matches"][0]["position"] == 0
        )
    finally:
        srv.stop()


def _token_file(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text(TOKEN + "\n")
    return path


# ---- the page, in a real browser --------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `bash .ci/setup` installs Debian's chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


class Page:
    """A browser tab that records console errors and page errors."""

    def __init__(self, browser: Any, width: int = 1400, height: int = 800) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, url: str, token: str = TOKEN) -> Any:
        self.page.goto(url)
        self.page.wait_for_selector("#auth[open]")
        self.page.fill("#token", token)
        self.page.click("#auth button")
        return self.page

    def ready(self) -> Any:
        self.page.wait_for_selector("body[data-ready='1']")
        assert not self.page.locator("#message.error").is_visible(), self.page.inner_text(
            "#message"
        )
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture()
def tab(browser: Any) -> Iterator[Page]:
    t = Page(browser)
    yield t
    t.close()


def _shown_candidates(page: Any, pos: int, scope: str = "#candidates") -> list[tuple]:
    page.wait_for_selector(f"#candidates[data-pos='{pos}']")
    rows = page.locator(f"{scope} .cand[data-id]")
    return [
        (
            int(r.get_attribute("data-id")),
            float(r.get_attribute("data-p")),
            r.get_attribute("class"),
        )
        for r in rows.all()
    ]


def test_hover_shows_the_teachers_candidates(server: Server, stores, tab: Page) -> None:
    store = logitstore.open(stores["topk"])
    page = tab.open(f"{server.base}/v1/stores/topk/view#seq=3")
    tab.ready()
    s0, s1 = int(store.offsets[3]), int(store.offsets[4])
    assert page.locator("#tokens .tok").count() == s1 - s0
    pos = s0 + 4
    page.hover(f"#tokens [data-pos='{pos}']")
    shown = _shown_candidates(page, pos)
    b = store.read(pos, pos + 1)
    order = np.argsort(-b.probs[0], kind="stable")
    order = order[b.probs[0][order] > 0]
    assert [i for i, _, _ in shown] == b.ids[0][order].tolist()
    np.testing.assert_allclose([p for _, p, _ in shown], b.probs[0][order], atol=1e-7)
    nxt = int(store.read_tokens(pos + 1, pos + 2)[0][0])
    marked = [i for i, _, cls in shown if "next" in cls.split()]
    assert marked == ([nxt] if nxt in b.ids[0][order] else [])
    residual = float(page.get_attribute("#candidates .cand.residual", "data-p"))
    assert residual == pytest.approx(float(b.residual[0]), abs=1e-7)
    assert page.locator("#info dd").first.inner_text().startswith("top-16, values u8")
    assert page.locator("#hists svg").count() == 3
    assert page.locator("#hists svg").first.locator("rect").count() == 20
    # the loss mask as the colour: two colours, as the store's mask says
    page.select_option("#measure", "mask")
    colours = page.eval_on_selector_all(
        "#tokens .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)"
    )
    mask = store.read_tokens(s0, s1)[1]
    assert len({c for c, m in zip(colours, mask, strict=True) if m}) == 1
    assert len(set(colours)) == (2 if 0 < mask.sum() < len(mask) else 1)
    assert tab.errors == []


def test_navigation_by_sequence_position_search_and_scrolling(
    server: Server, stores, tab: Page
) -> None:
    store = logitstore.open(stores["topk"])
    page = tab.open(f"{server.base}/v1/stores/topk/view")
    tab.ready()
    first = lambda: int(page.get_attribute("#tokens .tok >> nth=0", "data-pos"))  # noqa: E731
    assert first() == 0
    page.click("#next")
    page.wait_for_selector(f"#tokens > .tok:first-child[data-pos='{store.offsets[1]}']")
    page.fill("#seq", "4")
    page.press("#seq", "Enter")
    page.wait_for_selector(f"#tokens > .tok:first-child[data-pos='{store.offsets[4]}']")
    target = int(store.offsets[6]) + 10
    page.fill("#pos", str(target))
    page.click("#pos-form button")
    page.wait_for_selector(f"#tokens .tok.focus[data-pos='{target}']")
    assert page.input_value("#seq") == "6"
    _shown_candidates(page, target)  # a position reached by number is pinned and shown
    # search: the one sequence with the needle, and the match takes the page there
    page.fill("#search", "needle")
    page.click("#search-form button")
    page.click("#matches .match")
    needle = int(store.offsets[7]) + 3
    page.wait_for_selector(f"#tokens .tok.focus[data-pos='{needle}']")
    assert page.inner_text(f"#tokens [data-pos='{needle}']") == "needle "
    # the long sequence arrives window by window as it scrolls, never past its end
    page.fill("#seq", "5")
    page.press("#seq", "Enter")
    s0, s1 = int(store.offsets[5]), int(store.offsets[6])
    page.wait_for_selector(f"#tokens > .tok:first-child[data-pos='{s0}']")
    page.wait_for_timeout(300)  # the page fills its pane, and no more
    assert 512 <= page.locator("#tokens .tok").count() < s1 - s0
    for _ in range(20):
        page.eval_on_selector("#text-pane", "e => { e.scrollTop = e.scrollHeight; }")
        page.wait_for_timeout(150)
        if page.locator("#tokens .tok").count() == s1 - s0:
            break
    assert page.locator("#tokens .tok").count() == s1 - s0
    assert page.inner_text("#more") == "(end of sequence)"
    # a position deep in it: the page starts near it and loads earlier positions on demand
    page.fill("#pos", str(s0 + 1000))
    page.click("#pos-form button")
    page.wait_for_selector(f"#tokens .tok.focus[data-pos='{s0 + 1000}']")
    assert first() == s0 + 1000 - 64
    page.eval_on_selector("#earlier", "e => { e.click(); e.click(); }")  # one window, not two
    page.wait_for_selector(f"#tokens > .tok:first-child[data-pos='{s0 + 1000 - 64 - 512}']")
    page.wait_for_timeout(300)
    shown = page.eval_on_selector_all("#tokens .tok", "els => els.map(e => +e.dataset.pos)")
    assert shown == list(range(shown[0], shown[0] + len(shown)))
    page.click("#earlier")
    page.wait_for_selector(f"#tokens > .tok:first-child[data-pos='{s0}']")
    assert page.locator("#earlier").is_hidden()
    assert tab.errors == []


def test_compare_two_stores_side_by_side(server: Server, stores, tab: Page) -> None:
    a, b = logitstore.open(stores["full"]), logitstore.open(stores["full_t07"])
    page = tab.open(f"{server.base}/v1/stores/full/view#seq=1&compare=full_t07")
    tab.ready()
    assert page.input_value("#measure") == "kl"
    pos = int(a.offsets[1]) + 2
    page.click(f"#tokens [data-pos='{pos}']")
    page.wait_for_selector("#candidates .columns")
    p = a.read(pos, pos + 1).probs[0].astype(np.float64)
    q = b.read(pos, pos + 1).probs[0].astype(np.float64)
    kl = float((p * np.log(p / q)).sum())
    text = page.inner_text("#candidates .kl")
    assert text.startswith("KL(full ‖ full_t07) = ") and float(text.split()[-2]) == pytest.approx(
        kl, abs=1e-4
    )
    for name, store in (("full", a), ("full_t07", b)):
        rows = page.locator(f"#candidates [data-store='{name}'] .cand[data-id]")
        probs = store.read(pos, pos + 1).probs[0]
        top = np.argsort(-probs, kind="stable")[:32]
        assert [int(r.get_attribute("data-id")) for r in rows.all()] == top.tolist()
        shown = [float(r.get_attribute("data-p")) for r in rows.all()]
        np.testing.assert_allclose(shown, probs[top], atol=1e-7)
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "viewer-compare.png"))
    assert tab.errors == []
    # stores over different text: the page says why, in words (the browser itself logs the
    # refused request)
    page.goto(f"{server.base}/v1/stores/topk/view#compare=shifted")
    page.wait_for_selector("#message.error")
    assert "different tokens" in page.inner_text("#message")
    assert all("status of 400" in e for e in tab.errors)


def test_a_wrong_token_brings_the_prompt_back(server: Server, tab: Page) -> None:
    page = tab.open(f"{server.base}/", token="not-the-token")
    page.wait_for_selector("#auth[open]")
    page.wait_for_selector("#auth-error:not(:empty)")
    assert "refused" in page.inner_text("#auth-error")
    page.fill("#token", TOKEN)
    page.click("#auth button")
    tab.ready()
    assert page.locator("#store-list a").count() == 7
    # the token is kept for the session: a second page asks no more
    page.goto(f"{server.base}/v1/stores/other/view")
    tab.ready()
    assert not page.locator("#auth[open]").count()
    # the browser reports the refused request itself; nothing else may be an error
    assert all("403" in e for e in tab.errors) and len(tab.errors) == 1


def test_hostile_tokens_render_as_text(server: Server, stores, tab: Page) -> None:
    store = logitstore.open(stores["topk"])
    page = tab.open(f"{server.base}/v1/stores/topk/view#seq=2")
    tab.ready()
    s0 = int(store.offsets[2])
    for k, token in enumerate(HOSTILE):
        span = f"#tokens [data-pos='{s0 + 1 + k}']"
        assert page.eval_on_selector(span, "e => e.textContent") == HOSTILE[token][1]
        assert page.eval_on_selector(span, "e => e.children.length") == 0
    assert page.locator("#tokens script, #tokens img, #tokens b").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.hover(f"#tokens [data-pos='{s0}']")  # its next token is the <script> one
    page.wait_for_selector(f"#candidates[data-pos='{s0}']")
    assert '"<script>window.__pwned=1</script>"' in page.inner_text("#candidates .cand-sub")
    page.fill("#search", "<script>")
    page.click("#search-form button")
    page.wait_for_selector("#matches .match")
    assert page.locator("#matches script").count() == 0
    assert page.evaluate("window.__pwned") is None
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "viewer-hostile.png"))
    assert tab.errors == []


def test_view_command_serves_one_store_and_prints_its_url(stores) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "logitstore", "view", str(stores["topk"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(f"view {stores['topk']} at http://127.0.0.1:")
        url = line.split()[-1]
        assert url.endswith("/v1/stores/topk/view")
        port = int(url.split(":")[2].split("/")[0])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/v1/stores/topk/view/locate?sequence=0")
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read())["start"] == 0
                break
            except OSError:
                time.sleep(0.1)
            finally:
                conn.close()
        else:
            pytest.fail("`logitstore view` did not answer")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_view_refuses_a_store_it_cannot_open(tmp_path: Path, capsys) -> None:
    from logitstore.cli import main

    assert main(["view", str(tmp_path / "nope.zarr")]) == 2
    assert "logitstore view: error:" in capsys.readouterr().err


def test_view_refuses_a_port_it_cannot_listen_on(stores, capsys) -> None:
    from logitstore.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["view", str(stores["topk"]), "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert "http://" not in out.out  # no URL for a server that never answers
    assert f"cannot listen on port {port} on 127.0.0.1" in out.err
    assert main(["view", str(stores["topk"]), "--host", "no-such-host.invalid"]) == 2
    assert "cannot listen on no-such-host.invalid" in capsys.readouterr().err
    for bad in ("70000", "-1", "x"):
        with pytest.raises(SystemExit) as exit_:
            main(["view", str(stores["topk"]), "--port", bad])
        assert exit_.value.code == 2
        assert "argument --port" in capsys.readouterr().err


def test_the_viewing_server_never_loads_torch(server: Server) -> None:
    # Last in the file: by now the module's server has answered every view route.
    maps = Path(f"/proc/{server.proc.pid}/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc")
    assert "/torch/" not in maps.read_text()
