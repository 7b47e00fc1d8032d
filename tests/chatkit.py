"""A tiny chat teacher built on the spot: a byte-level BPE tokenizer with ChatML's special
tokens and a ChatML Jinja template, and a random GPT-2 (no download), plus conversations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: ChatML as Qwen-style models render it: every message is
#: <|im_start|>ROLE\nCONTENT<|im_end|>\n; the generation prompt is <|im_start|>assistant\n
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

#: the same, with the assistant's text (content and <|im_end|>) in {% generation %} blocks
CHATML_TAGGED = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

#: rewrites earlier turns as later ones come (it counts the messages up front): rendering
#: prefixes cannot find the assistant's turns
COUNTING = "{{- messages | length -}}\n" + CHATML

#: a template that refuses conversations not starting with a system message
STRICT = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- raise_exception('the first message must be a system message') -}}"
    "{%- endif -%}" + CHATML
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer briefly.",
    "What is two plus two? Two plus two is four.",
    "Hello! How can I help you today? Thanks, goodbye.",
    "The weather is sunny; the tool returned 21 degrees.",
]

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
    ],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": None},
        {"role": "tool", "content": "sunny, 21 degrees"},
        {"role": "assistant", "content": "It is sunny: 21 degrees."},
        {"role": "user", "content": "Thanks, goodbye."},
    ],
    [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "def add(a, b):"},
        {"role": "assistant", "content": "    return a + b\n"},
    ],
]


def make_chat_teacher(
    path: Path, *, template: str | None = CHATML, n_positions: int = 512, eos: str = "<|im_end|>"
) -> Path:
    """Save a tiny GPT-2 chat teacher (ChatML tokens, ``template``) to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(fast),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=fast.convert_tokens_to_ids(eos),
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return path


def reference_ids(tokenizer: Any, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    """``apply_chat_template(..., tokenize=True)``'s token ids, whichever transformers
    (4.x returns a list, 5.x a BatchEncoding by default)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]
