"""The store's metadata: what the numbers mean, under one versioned attribute key.

Everything a reader needs to decode a store lives here (docs/FORMAT.md §3). The classes are
frozen dataclasses with ``to_dict``/``from_dict``; ``from_dict`` validates, so a reader
never acts on metadata it does not understand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from ..errors import FormatError, LogitStoreError, UnsupportedVersionError

__all__ = [
    "ATTRS_KEY",
    "FORMAT_VERSION",
    "LOSS_MASK_EXTENSION",
    "TOKENS_ONLY_EXTENSION",
    "Encoding",
    "EncodingKind",
    "Layout",
    "StoreMetadata",
    "ValueKind",
]

#: The group attribute that holds the metadata.
ATTRS_KEY = "logitstore"
#: ``major.minor``; readers reject another major, and minors only add optional keys.
FORMAT_VERSION = "1.1"
#: Extensions of version 1.1 (FORMAT.md §3): a per-position ``loss_mask`` array, and stores
#: of tokens without teacher distributions (encoding kind ``none``).
LOSS_MASK_EXTENSION, TOKENS_ONLY_EXTENSION = "loss_mask", "tokens_only"
_EXTENSIONS_UNDERSTOOD: frozenset[str] = frozenset({LOSS_MASK_EXTENSION, TOKENS_ONLY_EXTENSION})

EncodingKind = Literal["topk", "sampled", "full", "none"]
ValueKind = Literal["fp32", "fp16", "bf16", "u8", "u7", "u6", "u5", "u4", "count", "none"]
State = Literal["writing", "complete"]

_KINDS: tuple[str, ...] = get_args(EncodingKind)
_VALUE_KINDS: tuple[str, ...] = get_args(ValueKind)
#: The zarr data type that holds each value kind (bf16 is kept as its raw 16 bits).
VALUE_DTYPES: dict[str, str] = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "uint16",
    "u8": "uint8",
    "u7": "uint8",
    "u6": "uint8",
    "u5": "uint8",
    "u4": "uint8",
}
#: Square-root bins of each ``uN`` kind: codes 1..2**N - 1 (0 means exactly zero).
SQRT_BINS: dict[str, int] = {f"u{b}": (1 << b) - 1 for b in (8, 7, 6, 5, 4)}


@dataclass(frozen=True)
class Encoding:
    """How each position's distribution is reduced before it is stored.

    Args:
        kind: ``topk`` (the k most likely tokens plus the residual mass), ``sampled``
            (``samples`` draws from the distribution, stored as unique ids and counts),
            ``full`` (the whole vocabulary) or ``none`` (tokens only, no distributions: the
            hard-label stores of ``logitstore generate``).
        values: how probabilities are stored: ``fp32``, ``fp16``, ``bf16``, or ``u8`` (255
            bins of sqrt(p)) down to ``u4`` (15 bins), all in one byte;
            ``sampled`` always stores integer counts (``count``).
        temperature: the teacher's logits are divided by this before the softmax.
        k: number of candidates for ``topk``.
        samples: number of draws for ``sampled``.

    Example:
        >>> Encoding("topk", "u8", k=64).width(8192)
        64
    """

    kind: EncodingKind
    values: ValueKind
    temperature: float = 1.0
    k: int | None = None
    samples: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise LogitStoreError(
                f"unknown encoding {self.kind!r}: expected one of {', '.join(_KINDS)}"
            )
        if self.kind == "sampled":
            if self.values != "count":
                object.__setattr__(self, "values", "count")
        elif self.kind == "none":
            object.__setattr__(self, "values", "none")
            object.__setattr__(self, "temperature", 1.0)
        elif self.values not in VALUE_DTYPES:
            raise LogitStoreError(
                f"unknown value type {self.values!r}: expected one of {', '.join(VALUE_DTYPES)}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LogitStoreError(
                f"temperature must be a finite number > 0, got {self.temperature}"
            )
        if self.kind == "topk" and (self.k is None or self.k < 1):
            raise LogitStoreError(f"topk needs k >= 1, got k={self.k}; pass --k N")
        if self.kind == "sampled" and (self.samples is None or not 1 <= self.samples <= 65535):
            raise LogitStoreError(
                f"sampled needs 1 <= samples <= 65535, got samples={self.samples}; pass --samples N"
            )
        if self.kind != "topk" and self.k is not None:
            object.__setattr__(self, "k", None)
        if self.kind != "sampled" and self.samples is not None:
            object.__setattr__(self, "samples", None)

    def width(self, vocab_size: int) -> int:
        """Number of stored candidates per position (columns of ``ids``/``values``)."""
        if self.kind == "topk":
            assert self.k is not None
            return self.k
        if self.kind == "sampled":
            assert self.samples is not None
            return min(self.samples, vocab_size)
        if self.kind == "none":
            return 0
        return vocab_size

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if this encoding cannot be applied to a vocabulary of ``vocab_size``."""
        if self.kind == "topk" and self.k is not None and self.k > vocab_size:
            raise LogitStoreError(
                f"--k {self.k} is larger than the teacher's vocabulary ({vocab_size} tokens); "
                f"use k <= {vocab_size}, or --encoding full to keep every token"
            )

    @property
    def lossy(self) -> bool:
        """Whether decoded probabilities are rescaled to their known row total."""
        return self.values not in ("fp32", "count", "none")

    @property
    def value_dtype(self) -> str:
        """The zarr data type of the ``values`` array."""
        if self.kind == "sampled":
            assert self.samples is not None
            return "uint8" if self.samples <= 255 else "uint16"
        if self.kind == "none":
            return "uint8"  # no values array; width 0
        return VALUE_DTYPES[self.values]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Encoding:
        try:
            return cls(
                kind=d["kind"],
                values=d["values"],
                temperature=float(d["temperature"]),
                k=d.get("k"),
                samples=d.get("samples"),
            )
        except (KeyError, TypeError) as e:
            raise FormatError(f"malformed encoding metadata {d!r}: {e}") from None


@dataclass(frozen=True)
class Layout:
    """How the arrays are laid out: chunking, sharding and integer widths.

    ``chunk_positions`` rows of a 2-D array (``ids``, ``values``) form one compressed chunk;
    ``vector_chunk_positions`` positions of a 1-D array (``input_ids``, ``residual``) do, which
    are larger because zarr costs ~0.3 ms per chunk and these rows are a few bytes;
    ``shard_positions`` positions (a multiple of both) form one shard, the unit of writing
    and of commit.
    """

    chunk_positions: int
    shard_positions: int
    id_dtype: Literal["uint16", "uint32"]
    value_dtype: str
    width: int
    vector_chunk_positions: int

    def __post_init__(self) -> None:
        if (
            self.chunk_positions < 1
            or self.shard_positions < self.chunk_positions
            or self.shard_positions % self.chunk_positions
        ):
            raise FormatError(
                f"--shard-positions ({self.shard_positions}) must be a positive multiple of "
                f"--chunk-positions ({self.chunk_positions}), which must be at least 1"
            )
        if self.vector_chunk_positions < 1 or self.shard_positions % self.vector_chunk_positions:
            raise FormatError(
                f"vector_chunk_positions ({self.vector_chunk_positions}) must divide "
                f"shard_positions ({self.shard_positions})"
            )
        if self.id_dtype not in ("uint16", "uint32"):
            raise FormatError(f"id_dtype must be uint16 or uint32, found {self.id_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise FormatError(f"malformed layout metadata {d!r}: {e}") from None

    @staticmethod
    def choose(
        encoding: Encoding,
        vocab_size: int,
        chunk_positions: int | None = None,
        shard_positions: int | None = None,
    ) -> Layout:
        """Pick chunk and shard sizes: ~1 MiB raw per ids chunk, 64 chunks per shard, 1-D
        arrays in chunks of 16 rows' worth (measured: 4x faster block reads of 1-D arrays,
        random 512-position reads 10 % slower)."""
        width = encoding.width(vocab_size)
        id_dtype: Literal["uint16", "uint32"] = "uint16" if vocab_size <= 65536 else "uint32"
        row_bytes = width * (4 if encoding.value_dtype == "float32" else 2)
        if chunk_positions is None:
            chunk_positions = 4096
            while chunk_positions > 16 and chunk_positions * row_bytes > (1 << 20):
                chunk_positions //= 2
        if shard_positions is None:
            shard_positions = chunk_positions * 64
        vector = min(shard_positions, 16 * chunk_positions)
        while vector > chunk_positions and shard_positions % vector:
            vector -= chunk_positions  # stops at chunk_positions, which divides a valid shard
        return Layout(
            chunk_positions, shard_positions, id_dtype, encoding.value_dtype, width, max(vector, 1)
        )


@dataclass(frozen=True)
class StoreMetadata:
    """Everything stored under the group attribute ``logitstore`` (docs/FORMAT.md §3)."""

    encoding: Encoding
    layout: Layout
    vocab_size: int
    num_positions: int
    num_sequences: int
    seq_len: int | None
    seed: int
    identity: str
    teacher: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    tool: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    state: State = "writing"
    format_version: str = FORMAT_VERSION
    extensions: tuple[str, ...] = ()
    #: how a generated store's text came about (``logitstore generate``); informative.
    generation: dict[str, Any] | None = None

    @property
    def has_loss_mask(self) -> bool:
        """Whether the store has a ``loss_mask`` array (extension ``loss_mask``)."""
        return LOSS_MASK_EXTENSION in self.extensions

    @property
    def num_shards(self) -> int:
        return -(-self.num_positions // self.layout.shard_positions)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Positions ``[start, stop)`` held by ``shard``."""
        s = self.layout.shard_positions
        return shard * s, min((shard + 1) * s, self.num_positions)

    def with_state(self, state: State) -> StoreMetadata:
        return replace(self, state=state)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": "logitstore",
            "format_version": self.format_version,
            "extensions": list(self.extensions),
            "state": self.state,
            "encoding": self.encoding.to_dict(),
            "vocab_size": self.vocab_size,
            "num_positions": self.num_positions,
            "num_sequences": self.num_sequences,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "layout": self.layout.to_dict(),
            "teacher": dict(self.teacher),
            "tokenizer": None if self.tokenizer is None else dict(self.tokenizer),
            "tool": dict(self.tool),
            "created_at": self.created_at,
            "identity": self.identity,
        }
        if self.generation is not None:  # 1.1; absent (not null) keeps 1.0 stores' bytes
            d["generation"] = dict(self.generation)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> StoreMetadata:
        if not isinstance(d, dict) or d.get("format") != "logitstore":
            raise FormatError(
                "not a logitstore store: the group has no 'logitstore' attribute with "
                "format='logitstore'"
            )
        version = str(d.get("format_version", ""))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise UnsupportedVersionError(
                f"store format version {version!r} is not supported: this logitstore reads "
                f"version {FORMAT_VERSION.split('.')[0]}.x; upgrade logitstore to read it"
            )
        unknown = set(d.get("extensions", [])) - _EXTENSIONS_UNDERSTOOD
        if unknown:
            raise UnsupportedVersionError(
                f"store requires extensions {sorted(unknown)} that this logitstore does not "
                "implement; upgrade logitstore to read it"
            )
        try:
            md = cls(
                encoding=Encoding.from_dict(d["encoding"]),
                layout=Layout.from_dict(d["layout"]),
                vocab_size=int(d["vocab_size"]),
                num_positions=int(d["num_positions"]),
                num_sequences=int(d["num_sequences"]),
                seq_len=None if d.get("seq_len") is None else int(d["seq_len"]),
                seed=int(d["seed"]),
                identity=str(d["identity"]),
                teacher=dict(d.get("teacher") or {}),
                tokenizer=None if d.get("tokenizer") is None else dict(d["tokenizer"]),
                tool=dict(d.get("tool") or {}),
                created_at=str(d.get("created_at", "")),
                state=d["state"],
                format_version=version,
                extensions=tuple(d.get("extensions", [])),
                generation=None if d.get("generation") is None else dict(d["generation"]),
            )
        except LogitStoreError as e:
            raise FormatError(f"invalid logitstore metadata: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"invalid logitstore metadata: missing or malformed {e}") from None
        if (md.encoding.kind == "none") != (TOKENS_ONLY_EXTENSION in md.extensions):
            raise FormatError(
                f"encoding kind {md.encoding.kind!r} and extensions {list(md.extensions)} "
                f"disagree: kind 'none' is exactly the stores listing {TOKENS_ONLY_EXTENSION!r}"
            )
        if md.state not in ("writing", "complete"):
            raise FormatError(f"invalid state {md.state!r}: expected 'writing' or 'complete'")
        expected_ids = "uint16" if md.vocab_size <= 65536 else "uint32"
        if md.layout.value_dtype != md.encoding.value_dtype or md.layout.id_dtype != expected_ids:
            raise FormatError(
                f"layout dtypes (values {md.layout.value_dtype}, ids {md.layout.id_dtype}) do not "
                f"match the encoding ({md.encoding.value_dtype}, {expected_ids} for vocab "
                f"{md.vocab_size})"
            )
        if md.layout.width != md.encoding.width(md.vocab_size):
            raise FormatError(
                f"layout width {md.layout.width} does not match the encoding "
                f"({md.encoding.width(md.vocab_size)} for vocab {md.vocab_size})"
            )
        return md
