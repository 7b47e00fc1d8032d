"""Conversations: checked, rendered with the teacher tokenizer's chat template exactly as
Hugging Face's ``apply_chat_template`` renders them, and the tokens a student should learn.

Tokens. A conversation's tokens are the rendered text tokenised with
``add_special_tokens=False`` — what ``tokenizer.apply_chat_template(messages,
tokenize=True)`` returns (the template writes its own special tokens).

Which tokens are learned (``train_on``):

- ``all``: every token (no mask is stored).
- ``assistant``: the tokens of every assistant turn.
- ``last-assistant``: the tokens of the last assistant turn only.

How assistant turns are found:

1. A template with ``{% generation %}`` blocks says itself which text the assistant
   writes: its tokens are ``apply_chat_template(..., return_assistant_tokens_mask=True)``'s
   ``assistant_masks`` (for ``last-assistant``, the last run of them).
2. Any other template (most published ones) is rendered once per assistant turn ``i``:
   turn ``i`` is the text between ``render(messages[:i], add_generation_prompt=True)`` (the
   conversation so far plus the assistant header) and ``render(messages[:i + 1])``, cut
   after the tokenizer's end-of-text token when that occurs in it (ChatML's newline after
   ``<|im_end|>`` is template glue the model never generates). Both renderings must be
   prefixes of the whole conversation's; a template that rewrites earlier turns when later
   ones are added (some strip old reasoning) is refused with a pointer to
   ``--chat-template`` (a template with ``{% generation %}``) or ``--train-on all``.

Either way a token is learned when its characters overlap a learned span (transformers'
rule). Character spans are mapped to tokens through the fast tokenizer's offsets.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from ..errors import InputError, TeacherError
from ..format.provenance import chat_template_text

__all__ = ["ROLES", "ChatTemplate", "TrainOn", "check_messages", "load_tokenizer"]

TrainOn = Literal["all", "assistant", "last-assistant"]
#: roles a message may have ("developer" is OpenAI's newer name for "system")
ROLES = ("system", "developer", "user", "assistant", "tool")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_messages(value: Any, where: str) -> list[dict[str, Any]]:
    """``value`` as a conversation: a non-empty list of messages, each an object with a
    known ``role`` and a string ``content``. Other keys (``name``, ``tool_calls``, ...) pass
    through to the template; null ones are dropped, as ``apply_chat_template`` does (Arrow
    columns fill a field one message lacks with null).

    Raises:
        InputError: naming ``where`` and the message at fault.
    """
    if not isinstance(value, list | tuple) or not value:
        found = "an empty list" if isinstance(value, list | tuple) else type(value).__name__
        raise InputError(
            f"{where}: expected a non-empty list of messages "
            '([{"role": "user", "content": "..."}, ...]), found ' + found
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(
                f"{where}: message {i} is {type(m).__name__}, not an object with 'role' and "
                "'content'"
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(
                f"{where}: message {i} has {'no role' if role is None else f'role {role!r}'}; "
                f"expected one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            found = "no content" if content is None else f"content of type {type(content).__name__}"
            raise InputError(f"{where}: message {i} ({role}) has {found}; expected a string")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def load_tokenizer(name_or_path: str, chat_template: str | os.PathLike[str] | None = None) -> Any:
    """The teacher's tokenizer (without its model), with ``chat_template`` — a Jinja file —
    replacing its own template when given.

    Raises:
        TeacherError: the tokenizer cannot be loaded.
        InputError: the template file cannot be read.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise TeacherError(f"cannot load teacher {name_or_path!r} (its tokenizer): {e}") from None
    if chat_template is not None:
        path = Path(chat_template)
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--chat-template {str(path)!r}: cannot read it ({e})") from None
    return tokenizer


class ChatTemplate:
    """Renders conversations with ``tokenizer``'s chat template and finds the tokens a student
    learns (module docstring).

    Raises:
        InputError: the tokenizer has no chat template.

    Example:
        >>> chat = ChatTemplate(tokenizer)
        >>> ids, learn = chat.encode([{"role": "user", "content": "Hi"},
        ...                           {"role": "assistant", "content": "Hello!"}], "example")
    """

    def __init__(self, tokenizer: Any) -> None:
        template = chat_template_text(tokenizer)
        if template is None:
            raise InputError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '') or ''!r} has no chat "
                "template, so messages cannot be rendered; pass --chat-template FILE (a Jinja "
                "chat template), or give the data as text"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.sha256 = hashlib.sha256(template.encode()).hexdigest()
        #: the template marks the assistant's text itself ({% generation %} blocks)
        self.tagged = bool(_GENERATION_TAG.search(template))
        self._eos = getattr(tokenizer, "eos_token", None) or None

    def render(self, messages: list[dict[str, Any]], where: str, *, prompt: bool = False) -> str:
        """The template's text for ``messages`` (with the assistant header when ``prompt``).

        Raises:
            InputError: the template raised (its message and ``where`` named).
        """
        if not messages:
            return ""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=prompt
            )
        except Exception as e:  # a template is a program: any failure is the input's to fix
            raise InputError(f"{where}: the chat template failed: {e}") from None
        if not isinstance(text, str):
            raise InputError(f"{where}: the chat template rendered {type(text).__name__}")
        return text

    def prompt_ids(self, messages: list[dict[str, Any]], where: str) -> list[int]:
        """Tokens of ``messages`` and the assistant header: what a teacher continues, equal to
        ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``."""
        text = self.render(messages, where, prompt=True)
        return list(map(int, self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    def encode(
        self, messages: list[dict[str, Any]], where: str, train_on: TrainOn = "assistant"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, learn)``: the conversation's tokens ``(n,)`` int64 and which of them a
        student learns ``(n,)`` bool (all of them for ``train_on="all"``).

        Raises:
            InputError: an unknown ``train_on``; no assistant turn (unless ``all``); assistant
                turns that render to no tokens; a template that raises or is not
                prefix-stable (module docstring).
        """
        if train_on not in get_args(TrainOn):
            raise InputError(
                f"unknown --train-on {train_on!r}; expected all, assistant or last-assistant"
            )
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on != "all" and not turns:
            raise InputError(
                f"{where}: the conversation has no assistant message, so nothing in it would "
                f"be learned with --train-on {train_on}; add one, or use --train-on all"
            )
        text = self.render(messages, where)
        if train_on == "all":
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)
        if self.tagged:
            ids, learn = self._tagged(messages, where)
            if train_on == "last-assistant":
                learn = _last_run(learn)
        else:
            learned = turns[-1:] if train_on == "last-assistant" else turns
            spans = self._spans(messages, text, where, learned)
            ids, learn = self._tokens(text, spans, where)
        if not learn.any():
            raise InputError(
                f"{where}: the assistant messages render to no tokens (empty content?); "
                "nothing in the conversation would be learned"
            )
        return ids, learn

    def _tagged(self, messages: list[dict[str, Any]], where: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            out = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
        except Exception as e:  # as in render()
            raise InputError(f"{where}: the chat template failed: {e}") from None
        ids = np.asarray(out["input_ids"], dtype=np.int64)
        return ids, np.asarray(out["assistant_masks"], dtype=bool)

    def _spans(
        self, messages: list[dict[str, Any]], text: str, where: str, turns: Sequence[int]
    ) -> list[tuple[int, int]]:
        """Character spans of assistant ``turns`` in ``text``, by rendering prefixes."""
        spans = []
        for i in turns:
            head = self.render(messages[:i], where, prompt=True)
            upto = self.render(messages[: i + 1], where)
            if not (text.startswith(head) and text.startswith(upto)):
                raise InputError(
                    f"{where}: the chat template renders the conversation up to message {i} "
                    "differently from the start of the whole conversation (it rewrites earlier "
                    "turns as later ones are added), so the assistant's tokens cannot be found "
                    "by rendering prefixes. Pass --chat-template FILE with {% generation %} "
                    "blocks around the assistant's text, or --train-on all"
                )
            start, end = len(head), len(upto)
            if self._eos is not None:
                cut = text.rfind(self._eos, start, end)
                if cut >= 0:
                    end = cut + len(self._eos)
            if end > start:
                spans.append((start, end))
        return spans

    def _tokens(
        self, text: str, spans: list[tuple[int, int]], where: str
    ) -> tuple[np.ndarray, np.ndarray]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise InputError(
                f"{where}: finding assistant tokens needs a fast (Rust) tokenizer's character "
                "offsets, and this tokenizer is a slow one; use --train-on all"
            )
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n, 2)
        learn = np.zeros(len(ids), dtype=bool)
        for start, end in spans:  # a token overlapping a span is learned
            learn |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        return ids, learn


def _last_run(learn: np.ndarray) -> np.ndarray:
    """Only the last contiguous run of True in ``learn``."""
    on = np.flatnonzero(learn)
    out = np.zeros_like(learn)
    if len(on):
        end = int(on[-1]) + 1
        gaps = np.flatnonzero(~learn[:end])
        out[(int(gaps[-1]) + 1 if len(gaps) else 0) : end] = True
    return out
