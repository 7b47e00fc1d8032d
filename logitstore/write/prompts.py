"""Prompts for ``logitstore generate``: texts or conversations, read from any source
(:mod:`.sources`) and checked before a teacher is loaded. No torch here: ``export
--prompts`` reads them too."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..format.provenance import prompt_string
from .chat import ChatTemplate, check_messages
from .sources import Fields, read_records

__all__ = ["Prompt", "check_prompts", "read_prompts"]


@dataclass(frozen=True)
class Prompt:
    """A prompt: a text, or a conversation (``messages``) that the teacher tokenizer's chat
    template renders with the assistant header (``add_generation_prompt=True``). For a
    conversation, ``text`` is its JSON (what ``generation.prompts.sha256`` hashes)."""

    text: str
    source: str  # "file:line" or "file row N", for error messages
    messages: list[dict[str, Any]] | None = None

    @classmethod
    def chat(cls, messages: Any, source: str) -> Prompt:
        """A conversation prompt, checked (:func:`.chat.check_messages`)."""
        checked = check_messages(messages, source)
        return cls(prompt_string(checked), source, checked)


def read_prompts(
    path: str | os.PathLike[str],
    *,
    text_field: str = "prompt",
    messages_field: str = "messages",
    split: str | None = None,
) -> list[Prompt]:
    """Read prompts from a ``.jsonl`` or ``.parquet`` file or a dataset directory
    (:mod:`.sources`): a string ``text_field`` (default ``prompt``) or a ``messages_field``
    conversation per record (other fields are ignored; blank lines are skipped).

    Raises:
        InputError: a missing, empty or undecodable file, or a record without a non-empty
            prompt or with a malformed conversation (file and line or row named).
    """
    prompts = []
    fields = Fields(text=text_field, messages=messages_field)
    for batch in read_records(path, fields, split=split):
        for r in batch:
            if r.text is None:
                prompts.append(Prompt.chat(r.messages, r.where))
            elif not r.text:
                raise InputError(f"{r.where}: the prompt is empty; give the teacher some text")
            else:
                prompts.append(Prompt(r.text, r.where))
    return prompts


def check_prompts(prompts: Sequence[Prompt], tokenizer: Any) -> None:
    """Render every conversation among ``prompts`` with ``tokenizer``'s chat template, so a
    missing or failing template is found before a teacher is loaded.

    Raises:
        InputError: the tokenizer has no chat template, or it fails on a prompt (named).
    """
    chat: ChatTemplate | None = None
    for p in prompts:
        if p.messages is not None:
            chat = chat or ChatTemplate(tokenizer)
            chat.render(p.messages, p.source, prompt=True)
