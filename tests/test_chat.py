"""Chat data: conversations are tokenised exactly as ``apply_chat_template`` does, the loss
mask marks the positions that predict the assistant's tokens (checked token by token against
a rendering written out by hand), and real ``write``/``generate``/``export`` runs read JSONL,
Parquet and saved datasets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import logitstore
from logitstore.cli import main
from logitstore.write.chat import ChatTemplate, check_messages, load_tokenizer

from .chatkit import (
    CHATML,
    CHATML_TAGGED,
    CONVERSATIONS,
    COUNTING,
    STRICT,
    make_chat_teacher,
    reference_ids,
)

END = "<|im_end|>"


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_teacher(tmp_path_factory.mktemp("chat-teacher"))


@pytest.fixture(scope="module")
def tok(chat_dir: Path) -> Any:
    return load_tokenizer(str(chat_dir))


def _by_hand(messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int, int]]]:
    """ChatML written out without Jinja, and each assistant turn's ``(start, end, index)``
    in it: its content and ``<|im_end|>`` (what the student should learn)."""
    text, turns = "", []
    for i, m in enumerate(messages):
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            turns.append((len(text), len(text) + len(m["content"]) + len(END), i))
        text += m["content"] + END + "\n"
    return text, turns


def _expected_learn(
    tok: Any, ids: np.ndarray, messages: list[dict[str, Any]], last_only: bool = False
) -> np.ndarray:
    """Walk the tokens through the hand rendering: a token is learned when its characters
    overlap an assistant turn's."""
    text, turns = _by_hand(messages)
    if last_only:
        turns = turns[-1:]
    learn, at = [], 0
    for t in ids.tolist():
        piece = tok.decode([t], skip_special_tokens=False)
        assert text[at : at + len(piece)] == piece  # the tokens spell the rendering
        learn.append(any(at + len(piece) > a and at < b for a, b, _ in turns))
        at += len(piece)
    assert at == len(text)
    return np.array(learn)


@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("train_on", ["all", "assistant", "last-assistant"])
def test_tokens_are_apply_chat_templates(tok: Any, n: int, train_on: Any) -> None:
    messages = check_messages(CONVERSATIONS[n], "test")
    ids, _ = ChatTemplate(tok).encode(messages, "test", train_on)
    assert ids.tolist() == reference_ids(tok, messages)
    prompt = ChatTemplate(tok).prompt_ids(messages[:1], "test")
    assert prompt == reference_ids(tok, messages[:1], add_generation_prompt=True)


@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("template", [CHATML, CHATML_TAGGED], ids=["prefixes", "generation-tags"])
def test_the_assistants_tokens_are_learned_token_by_token(
    tok: Any, n: int, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tok, "chat_template", template)
    messages = check_messages(CONVERSATIONS[n], "test")
    chat = ChatTemplate(tok)
    assert chat.tagged == (template == CHATML_TAGGED)
    ids, learn = chat.encode(messages, "test")
    assert learn.tolist() == _expected_learn(tok, ids, messages).tolist()
    _, last = chat.encode(messages, "test", "last-assistant")
    assert last.tolist() == _expected_learn(tok, ids, messages, last_only=True).tolist()
    _, every = chat.encode(messages, "test", "all")
    assert every.all()
    # what is learned reads back as the assistant's words, each ending its turn
    turns = [m["content"] + END for m in messages if m["role"] == "assistant"]
    assert tok.decode(ids[learn].tolist(), skip_special_tokens=False).endswith(turns[-1])


def test_a_template_that_rewrites_earlier_turns_needs_generation_tags(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = check_messages(CONVERSATIONS[1], "chats.jsonl:2")
    monkeypatch.setattr(tok, "chat_template", COUNTING)
    with pytest.raises(logitstore.InputError, match=r"chats.jsonl:2: .*\{% generation %\}"):
        ChatTemplate(tok).encode(messages, "chats.jsonl:2")
    ChatTemplate(tok).encode(messages, "chats.jsonl:2", "all")  # nothing to find: fine
    monkeypatch.setattr(tok, "chat_template", "{{- messages | length -}}\n" + CHATML_TAGGED)
    ids, learn = ChatTemplate(tok).encode(messages, "chats.jsonl:2")
    assert tok.decode(ids[learn].tolist()).count(END) == 3  # the three assistant turns


# -- real runs -------------------------------------------------------------------------------


def _write_argv(teacher: Path, data: list[Path], out: Path, *extra: str) -> list[str]:
    return [
        "write", "--teacher", str(teacher), "--data", *map(str, data), "--out", str(out),
        "--device", "cpu", "--no-progress", "--k", "8", *extra,
    ]  # fmt: skip


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sources(tmp_path: Path, rows: list[dict[str, Any]]) -> dict[str, Path]:
    """The same records as JSON lines, Parquet (two row groups), a save_to_disk dataset and
    a directory of data files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    jsonl = _jsonl(tmp_path / "chats.jsonl", rows)
    parquet = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=2)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    files = tmp_path / "files"
    files.mkdir()
    _jsonl(files / "part-0.jsonl", rows)
    return {"jsonl": jsonl, "parquet": parquet, "saved": saved, "files": files}


def test_write_reads_conversations_from_every_source(
    chat_dir: Path, tok: Any, tmp_path: Path
) -> None:
    rows = [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS)]
    checked = [check_messages(c, "x") for c in CONVERSATIONS]
    want_ids = [reference_ids(tok, m) for m in checked]
    stores = {}
    for kind, path in _sources(tmp_path, rows).items():
        out = tmp_path / f"{kind}.zarr"
        assert main(_write_argv(chat_dir, [path], out)) == 0, kind
        stores[kind] = store = logitstore.open(out)
        assert store.metadata.has_loss_mask and store.num_sequences == len(CONVERSATIONS)
        for s, messages in enumerate(checked):
            a, b = int(store.offsets[s]), int(store.offsets[s + 1])
            ids, mask = store.read_tokens(a, b)
            assert ids.tolist() == want_ids[s]
            learn = _expected_learn(tok, ids, messages)
            assert mask.tolist() == [*learn[1:].tolist(), False]  # mask[t] = learn[t + 1]
        assert store.metadata.tokenizer is not None
        assert store.metadata.tokenizer["chat_template_hash"] == (
            "sha256:" + hashlib.sha256(CHATML.encode()).hexdigest()
        )
    identities = {s.metadata.identity for s in stores.values()}
    assert len(identities) == 1  # the same tokens and mask from every source
    # the student's targets: labels only where the mask counts; KD over those positions only
    store = stores["jsonl"]
    ds = logitstore.LogitDataset(store.path, seq_len=128, shuffle=False)
    batch = logitstore.collate(list(ds))
    assert (batch["labels"][~batch["loss_mask"]] == -100).all()
    assert (batch["labels"][batch["loss_mask"]] >= 0).all()
    logits = torch.randn(*batch["labels"].shape, store.metadata.vocab_size)
    kd = logitstore.losses.forward_kl(
        logits, batch["ids"], batch["probs"], batch["residual"], batch["loss_mask"]
    )
    rows_kl = logitstore.losses.forward_kl(
        logits, batch["ids"], batch["probs"], batch["residual"], reduction="none"
    )
    torch.testing.assert_close(kd, rows_kl[batch["loss_mask"]].mean())


def test_train_on_all_writes_no_mask_and_last_assistant_one_turn(
    chat_dir: Path, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}])
    assert main(_write_argv(chat_dir, [data], tmp_path / "all", "--train-on", "all")) == 0
    every = logitstore.open(tmp_path / "all")
    # 1.2 for its top-k codec chains (FORMAT.md §10), not 1.1: no loss_mask extension
    assert not every.metadata.has_loss_mask and every.metadata.format_version == "1.2"
    argv = _write_argv(chat_dir, [data], tmp_path / "last", "--train-on", "last-assistant")
    assert main(argv) == 0
    last = logitstore.open(tmp_path / "last")
    ids, mask = last.read_tokens(0, len(last))
    learned = ids[1:][mask[:-1].astype(bool)]
    assert logitstore.open(tmp_path / "all").tokenizer() is not None
    text = last.tokenizer().decode(learned.tolist(), skip_special_tokens=False)
    assert text == "It is sunny: 21 degrees." + END


def test_a_long_conversation_is_split_with_its_mask(chat_dir: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in CONVERSATIONS])
    assert main(_write_argv(chat_dir, [data], tmp_path / "whole")) == 0
    assert main(_write_argv(chat_dir, [data], tmp_path / "split", "--seq-len", "16")) == 0
    whole, split = logitstore.open(tmp_path / "whole"), logitstore.open(tmp_path / "split")
    assert np.array_equal(whole.read_tokens(0, len(whole))[0], split.read_tokens(0, len(split))[0])
    assert np.array_equal(whole.read_tokens(0, len(whole))[1], split.read_tokens(0, len(split))[1])
    assert split.num_sequences > whole.num_sequences and np.diff(split.offsets).max() == 16
    assert set(whole.offsets.tolist()) <= set(split.offsets.tolist())  # cut, never merged


def test_mixed_text_and_conversations(chat_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": "The quick brown fox."}, {"messages": CONVERSATIONS[0]}]
    data = _jsonl(tmp_path / "m.jsonl", rows)
    assert main(_write_argv(chat_dir, [data], tmp_path / "m")) == 0
    store = logitstore.open(tmp_path / "m")
    a, b = int(store.offsets[0]), int(store.offsets[1])
    mask = store.read_tokens(a, b)[1]
    assert mask.tolist() == [True] * (b - a - 1) + [False]  # a document is learned whole


def test_chat_template_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = make_chat_teacher(tmp_path / "bare", template=None)
    data = _jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}])
    out = tmp_path / "out"
    assert main(_write_argv(bare, [data], out)) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--chat-template FILE" in err and not out.exists()
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TAGGED)
    assert main(_write_argv(bare, [data], out, "--chat-template", str(template))) == 0
    store = logitstore.open(out)
    assert store.metadata.tokenizer is not None
    assert store.metadata.tokenizer["chat_template_hash"] == (
        "sha256:" + hashlib.sha256(CHATML_TAGGED.encode()).hexdigest()
    )


@pytest.mark.parametrize(
    ("row", "fragments", "parquet"),
    [
        ({"messages": [{"role": "user", "content": "Hello!"}]}, ["no assistant message"], True),
        (
            {"messages": [{"role": "bot", "content": "Hi"}]},
            ["message 0 has role 'bot'", "user, assistant"],
            True,
        ),
        (
            {"messages": [{"role": "user", "content": 4}, {"role": "assistant", "content": "x"}]},
            ["message 0 (user) has content of type int; expected a string"],
            False,  # a Parquet column has one type: these shapes are JSON's alone
        ),
        ({"messages": "Hello"}, ["expected a non-empty list of messages", "found str"], False),
        ({"messages": []}, ["found an empty list"], False),
        (
            {"id": 3, "prompt": "x"},
            ["expected a string 'text' field or a 'messages' list", "found fields 'id', 'prompt'"],
            False,
        ),
    ],
)
def test_bad_conversations_are_named_before_the_teacher_loads(
    chat_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    row: Any,
    fragments: list[str],
    parquet: bool,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"messages": CONVERSATIONS[0]}
    files = {"bad.jsonl:2": _jsonl(tmp_path / "bad.jsonl", [good, row])}
    if parquet:
        pq.write_table(pa.Table.from_pylist([good, row]), tmp_path / "bad.parquet")
        files["bad.parquet row 1"] = tmp_path / "bad.parquet"
    for where, path in files.items():
        out = tmp_path / f"out-{path.suffix[1:]}"
        assert main(_write_argv(chat_dir, [path], out)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        for f in [where, *fragments]:
            assert f in err, err
        assert not out.exists()


def test_a_template_that_raises_is_named(
    chat_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = tmp_path / "strict.jinja"
    strict.write_text(STRICT)
    data = _jsonl(
        tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}]
    )
    out = tmp_path / "out"
    assert main(_write_argv(chat_dir, [data], out, "--chat-template", str(strict))) == 2
    err = capsys.readouterr().err
    assert "c.jsonl:2: the chat template failed: the first message must be a system" in err
    assert not out.exists()


# -- generate and export ---------------------------------------------------------------------


def _generate_argv(teacher: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(out),
        "--device", "cpu", "--no-progress", "--max-new-tokens", "8", "--num-samples", "2",
        "--batch-size", "2", *extra,
    ]  # fmt: skip


def test_generate_completes_conversations_and_export_appends_the_reply(
    chat_dir: Path, tok: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [c[:-1] if c[-1]["role"] == "assistant" else c for c in CONVERSATIONS]
    rows: list[dict[str, Any]] = [{"messages": c} for c in chats]
    rows.insert(1, {"prompt": "The quick brown fox"})  # text and conversations mix
    jsonl = _jsonl(tmp_path / "p.jsonl", rows)
    parquet = tmp_path / "p.parquet"
    columns = {k: [r.get(k) for r in rows] for k in ("prompt", "messages")}  # nulls where absent
    pq.write_table(pa.table(columns), parquet)
    stores = []
    for path in (jsonl, parquet):
        out = tmp_path / f"{path.suffix[1:]}.zarr"
        assert main(_generate_argv(chat_dir, path, out)) == 0
        stores.append(logitstore.open(out))
    a, b = stores
    assert np.array_equal(a.read_tokens(0, len(a))[0], b.read_tokens(0, len(b))[0])
    assert a.metadata.identity == b.metadata.identity
    assert main(["export", str(a.path), "--jsonl", "--ids", "--prompts", str(jsonl)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2 * len(rows)
    for rec in records:
        row = rows[rec["prompt_index"]]
        if "prompt" in row:
            assert "messages" not in rec and rec["prompt"] == row["prompt"]
            continue
        messages = check_messages(row["messages"], "x")
        assert rec["prompt_ids"] == reference_ids(tok, messages, add_generation_prompt=True)
        assert rec["messages"][:-1] == messages
        reply = (
            rec["completion_ids"][:-1] if rec["finish_reason"] == "eos" else rec["completion_ids"]
        )
        assert rec["messages"][-1] == {
            "role": "assistant",
            "content": tok.decode(reply, skip_special_tokens=False),
        }
    # prompts other than the store's are refused
    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": "x"}] * len(rows))
    assert main(["export", str(a.path), "--jsonl", "--prompts", str(other)]) == 2
    assert "differs from the prompts the store was generated from" in capsys.readouterr().err


def test_generate_refuses_bad_conversations_before_loading(
    chat_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": None}]}])
    out = tmp_path / "out"
    assert main(_generate_argv(chat_dir, bad, out)) == 2
    assert "p.jsonl:1: message 0 (user) has no content" in capsys.readouterr().err
    bare = make_chat_teacher(tmp_path / "bare", template=None)
    ok = _jsonl(tmp_path / "ok.jsonl", [{"messages": CONVERSATIONS[0][:1]}])
    assert main(_generate_argv(bare, ok, out)) == 2
    assert "--chat-template FILE" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "out.generating.jsonl").exists()
