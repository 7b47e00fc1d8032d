"""Hard-label data: `logitstore generate` with a real (tiny) Hugging Face teacher."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import logitstore
from logitstore import Encoding, GenerationSettings, generate
from logitstore.write.generate import journal_path

from .conftest import deterministic_env, kill_when

PROMPTS = [
    "def add(a, b):\n",
    "import os\n",
    "class Point:\n    def __init__(self",
    "for i in range(10):",
    "The quick brown fox",
]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _settings(**kw: Any) -> GenerationSettings:
    base: dict[str, Any] = {"max_new_tokens": 12, "temperature": 1.0, "num_samples": 2}
    return GenerationSettings(**{**base, "batch_size": 3, **kw})


def _gen(teacher, out: Path, **kw: Any) -> logitstore.LogitStore:  # type: ignore[no-untyped-def]
    soft = kw.pop("soft", None)
    generate(teacher, PROMPTS, out, _settings(**kw), soft=soft, progress=False)
    store = logitstore.open(out)
    assert isinstance(store, logitstore.LogitStore)
    return store


def test_generation_is_deterministic_with_a_seed(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    torch.manual_seed(123)
    a = _gen(teacher, tmp_path / "a", seed=7)
    torch.manual_seed(999)  # the caller's RNG state does not matter ...
    b = _gen(teacher, tmp_path / "b", seed=7)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    c = _gen(teacher, tmp_path / "c", seed=8)  # ... the seed does
    assert a.metadata.identity == b.metadata.identity != c.metadata.identity
    ta, tc = a.read_tokens(0, len(a))[0], c.read_tokens(0, len(c))[0]
    assert len(ta) != len(tc) or not np.array_equal(ta, tc)
    # and generation leaves the caller's RNG where it was
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    _gen(teacher, tmp_path / "d", seed=7)
    assert torch.equal(torch.rand(1), expected)


def test_the_mask_excludes_prompts_and_the_dataset_applies_it(teacher, tmp_path: Path) -> None:
    store = _gen(teacher, tmp_path / "new" / "dir" / "g")  # parents are created
    md = store.metadata
    assert md.encoding.kind == "none" and md.has_loss_mask and md.format_version == "1.1"
    assert md.generation is not None and md.generation["num_samples"] == 2
    assert store.num_sequences == len(PROMPTS) * 2
    completions = []
    for s in range(store.num_sequences):
        a, b = int(store.offsets[s]), int(store.offsets[s + 1])
        ids, mask = store.read_tokens(a, b)
        prompt = teacher.tokenizer(PROMPTS[s // 2])["input_ids"]
        p = len(prompt)
        assert ids[:p].tolist() == prompt  # sequence s is sample s % 2 of prompt s // 2
        assert 1 <= b - a - p <= 12
        expected = np.zeros(b - a, dtype=bool)
        expected[p - 1 : b - a - 1] = True  # positions that predict a completion token
        assert mask.tolist() == expected.tolist()
        completions.append(ids[p:].tolist())
    assert completions[0] != completions[1]  # two samples of one prompt differ
    ds = logitstore.LogitDataset(store.path, seq_len=64, shuffle=False)
    samples = list(ds)
    for s, sample in enumerate(samples):
        learned = sample["labels"][sample["labels"] >= 0].tolist()
        assert learned == completions[s]  # exactly the completion's tokens are targets
        assert sample["loss_mask"].tolist() == (sample["labels"] >= 0).tolist()
    # hard-label CE over a batch counts completion tokens only
    batch = logitstore.collate(samples)
    logits = torch.randn(*batch["labels"].shape, md.vocab_size)
    ce = logitstore.losses.cross_entropy(logits, batch["labels"])
    pick = batch["labels"] >= 0
    manual = torch.nn.functional.cross_entropy(logits[pick], batch["labels"][pick])
    torch.testing.assert_close(ce, manual)


def test_soft_labels_are_the_teachers_distributions_on_the_generated_text(
    teacher, tmp_path: Path
) -> None:
    enc = Encoding("topk", "fp32", k=8)
    soft = _gen(teacher, tmp_path / "soft", soft=enc)
    hard = _gen(teacher, tmp_path / "hard")
    assert soft.metadata.extensions == ("loss_mask",)
    ids, mask = soft.read_tokens(0, len(soft))
    assert np.array_equal(ids, hard.read_tokens(0, len(hard))[0])  # the same text
    assert np.array_equal(mask, hard.read_tokens(0, len(hard))[1])
    # the same rows as a plain capture of the generated sequences (in the same batches:
    # padding changes the last bits of a forward pass)
    seqs = logitstore.Sequences(ids, soft.offsets)
    plain = logitstore.open(
        logitstore.capture(teacher, seqs, tmp_path / "plain", enc, batch_size=3, progress=False)
    )
    a, b = soft.read(0, len(soft)), plain.read(0, len(plain))
    for x, y in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(x, y)
    assert logitstore.verify(tmp_path / "soft").ok


def test_stop_strings_and_eos_end_completions(teacher, tmp_path: Path) -> None:
    stop = ("e", "\n", " t")
    store = _gen(teacher, tmp_path / "s", stop=stop, num_samples=4)
    tok = teacher.tokenizer
    reasons = []
    for rec in logitstore.sequence_records(store, ids=True):
        c = rec["completion_ids"]
        text = tok.decode(c)
        if rec["finish_reason"] == "eos":
            assert c[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1
        elif rec["finish_reason"] == "stop":  # the last token completes the stop string
            assert any(s in text for s in stop)
            assert not any(s in tok.decode(c[:-1]) for s in stop)
        else:
            assert len(c) == 12 and not any(s in text for s in stop)
        reasons.append(rec["finish_reason"])
    assert "stop" in reasons


class _DiesAt:
    """Wraps a real HF model; its ``generate`` raises on call ``n`` (a crash mid-run)."""

    def __init__(self, model: Any, n: int) -> None:
        self.model, self.n, self.calls = model, n, 0

    def generate(self, **kw: Any) -> Any:
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("teacher died")
        return self.model.generate(**kw)


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_interrupted_run_resumes_to_the_same_store(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overwrite: bool
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    _gen(teacher, tmp_path / "whole", seed=3)
    out = tmp_path / "resumed"

    def run(model: Any, seed: int = 3, where: Path = out) -> None:
        generate(
            dataclasses.replace(teacher, model=model), PROMPTS, where, _settings(seed=seed),
            overwrite=overwrite, progress=False,
        )  # fmt: skip

    with pytest.raises(RuntimeError, match="teacher died"):
        run(_DiesAt(teacher.model, 3))
    journal = journal_path(out)
    assert not out.exists() and len(journal.read_text().splitlines()) == 3  # header + 2 batches
    with journal.open("a") as f:
        f.write('{"batch": 2, "compl')  # killed while writing a line: it is cut off
    again = _DiesAt(teacher.model, 0)
    run(again)  # --overwrite too keeps a journal of the same settings
    assert again.calls == 2  # 4 batches of 3 rows: only the last two were generated
    assert _files(out) == _files(tmp_path / "whole") and not journal.exists()
    with pytest.raises(RuntimeError):
        run(_DiesAt(teacher.model, 2), where=tmp_path / "x")
    if overwrite:  # another run's journal is discarded
        run(teacher.model, seed=4, where=tmp_path / "x")
        assert logitstore.open(tmp_path / "x").metadata.generation["seed"] == 4  # type: ignore[index]
    else:  # ... or refused, and a complete store is not touched again
        with pytest.raises(logitstore.ResumeMismatchError, match="--overwrite"):
            run(teacher.model, seed=4, where=tmp_path / "x")
        with pytest.raises(logitstore.StoreExistsError):
            run(teacher.model)


def test_a_crash_while_storing_soft_labels_resumes(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import dies_at_call

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    enc = Encoding("topk", "u8", k=8)
    kw = {"soft": enc, "progress": False, "shard_positions": 32, "chunk_positions": 16}
    generate(teacher, PROMPTS, tmp_path / "whole", _settings(seed=2), **kw)  # type: ignore[arg-type]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="teacher died"):
        generate(dies_at_call(teacher, 3), PROMPTS, out, _settings(seed=2), **kw)  # type: ignore[arg-type]
    assert logitstore.open(out, allow_incomplete=True).metadata.state == "writing"
    assert journal_path(out).exists()  # the completions are kept until the store is complete
    # another run's settings are refused before any generation
    with pytest.raises(logitstore.ResumeMismatchError, match="interrupted store generated"):
        generate(teacher, PROMPTS, out, _settings(seed=9), **kw)  # type: ignore[arg-type]
    generate(teacher, PROMPTS, out, _settings(seed=2), **kw)  # type: ignore[arg-type]
    assert _files(out) == _files(tmp_path / "whole") and not journal_path(out).exists()


def test_the_models_own_generation_defaults_do_not_apply(teacher, tmp_path: Path) -> None:
    plain = _gen(teacher, tmp_path / "a", seed=1)
    config = teacher.model.generation_config
    old = (config.repetition_penalty, config.top_k)
    config.repetition_penalty, config.top_k = 5.0, 1  # would change every completion
    try:
        other = _gen(teacher, tmp_path / "b", seed=1)
    finally:
        config.repetition_penalty, config.top_k = old
    assert np.array_equal(plain.read_tokens(0, len(plain))[0], other.read_tokens(0, len(other))[0])
    assert teacher.model.generation_config.top_k == old[1]  # and it is put back


def test_settings_are_checked() -> None:
    assert GenerationSettings(stop="</answer>").stop == ("</answer>",)  # type: ignore[arg-type]
    with pytest.raises(logitstore.InputError, match="identical copies"):
        GenerationSettings(temperature=0, num_samples=2)
    for bad in ({"max_new_tokens": 0}, {"top_p": 0}, {"temperature": -1}, {"stop": ("",)}):
        with pytest.raises(logitstore.InputError):
            GenerationSettings(**bad)  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "logitstore", *args], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no JSON lines found"),
        ('{"prompt": "a"}\nnot json\n', ":2: invalid JSON"),
        ('{"text": "a"}\n', ":1: expected a string 'prompt' field"),
        ('["a"]\n', "found list"),
        ('{"prompt": ""}\n', "the prompt is empty"),
        ('{"prompt": "' + "x " * 60 + '"}\n', "Shorten the prompt or lower --max-new-tokens"),
    ],
)
def test_bad_prompts_are_refused_clearly(
    teacher_dir: Path, tmp_path: Path, content: str, message: str
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    out = tmp_path / "out"
    r = _cli(
        "generate", "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(out),
        "--max-new-tokens", "20", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not journal_path(out).exists()


def test_cli_generate_then_export(teacher_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS))
    )
    out = tmp_path / "g.zarr"
    r = _cli(
        "generate", "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(out),
        "--max-new-tokens", "10", "--num-samples", "2", "--temperature", "0.7", "--top-p", "0.9",
        "--soft", "topk", "--k", "8", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = _cli("export", str(out), "--jsonl", "--ids")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    store = logitstore.open(out)
    assert len(records) == store.num_sequences == 10
    for s, rec in enumerate(records):
        assert (rec["prompt_index"], rec["sample"]) == divmod(s, 2)
        assert rec["prompt"] == PROMPTS[s // 2]
        seq = store.sequence(s).input_ids.tolist()
        assert rec["prompt_ids"] + rec["completion_ids"] == seq
        assert rec["finish_reason"] in ("eos", "stop", "length")
    info = _cli("info", str(out))
    assert "loss mask" in info.stdout and "generation" in info.stdout
    assert _cli("verify", str(out), "--no-progress").returncode == 0
    shown = _cli("show", str(out), "--position", "1")
    assert shown.returncode == 0 and "counts for training: no" in shown.stdout


@pytest.mark.slow
def test_a_killed_generate_process_resumes_to_the_same_store(
    teacher_dir: Path, tmp_path: Path
) -> None:

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": p, "n": i}) + "\n" for i, p in enumerate(PROMPTS * 6))
    )
    env = deterministic_env(SOURCE_DATE_EPOCH="1767225600")

    def cmd(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "logitstore", "generate", "--teacher", str(teacher_dir),
            "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "24",
            "--num-samples", "2", "--batch-size", "1", "--no-progress",
        ]  # fmt: skip

    ref = tmp_path / "ref"
    subprocess.run(cmd(ref), env=env, check=True, capture_output=True)
    out = tmp_path / "out"
    journal = journal_path(out)
    kills = [
        kill_when(
            cmd(out), env, lambda n=n: journal.exists() and journal.read_bytes().count(b"\n") >= n
        )
        for n in (3, 12)  # SIGKILL twice, at different points
    ]
    assert kills == [True, True], "generation finished before it could be killed; add prompts"
    assert not out.exists()
    subprocess.run(cmd(out), env=env, check=True, capture_output=True)
    assert _files(out) == _files(ref) and not journal.exists()
