"""The store's metadata: what the numbers mean, under one versioned attribute key.

Everything a reader needs to decode a store lives here (docs/FORMAT.md §3). The classes are
frozen dataclasses with ``to_dict``/``from_dict``; ``from_dict`` validates, so a reader
never acts on metadata it does not understand.
"""

from __future__ import annotations

import math
import numbers
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
FORMAT_VERSION = "1.2"
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
_ITEMSIZE = {"float32": 4, "float16": 2, "uint16": 2, "uint8": 1, "uint32": 4}
SQRT_BINS: dict[str, int] = {f"u{b}": (1 << b) - 1 for b in (8, 7, 6, 5, 4)}

#: Bounds a reader checks before it sizes anything by the metadata (FORMAT.md §3): the
#: largest vocabulary ids can address, the most positions, shards and inner chunks per
#: shard, and the largest decoded chunk.
MAX_VOCAB = 1 << 32
MAX_POSITIONS = 1 << 48
MAX_SHARDS = 1 << 24
MAX_CHUNKS_PER_SHARD = 1 << 16
MAX_CHUNK_BYTES = 1 << 28


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _typed(d: Any, key: str, kinds: tuple[type, ...], what: str, *, optional: bool = False) -> Any:
    """``d[key]``, refused unless it is one of ``kinds`` (``None`` too when ``optional``)."""
    if not isinstance(d, dict):
        raise FormatError(f"invalid logitstore metadata: expected an object, found {d!r:.80}")
    if key not in d:
        if optional:
            return None
        raise FormatError(f"invalid logitstore metadata: the key {key!r} is missing")
    value = d[key]
    if value is None and optional:
        return None
    if kinds == (object,):
        return value
    ok = _is_int(value) if kinds == (int,) else isinstance(value, kinds)
    ok = ok and not isinstance(value, bool)
    if not ok:
        raise FormatError(
            f"invalid logitstore metadata: {key!r} must be {what}"
            f"{' or null' if optional else ''}, found {value!r:.80}"
        )
    return value


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
        if isinstance(self.temperature, numbers.Real) and not isinstance(self.temperature, bool):
            # stored and hashed as a float (``1.0``, never ``1``): FORMAT.md §3 identity
            object.__setattr__(self, "temperature", float(self.temperature))
        if not (
            isinstance(self.temperature, float)
            and math.isfinite(self.temperature)
            and self.temperature > 0
        ):
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

    def describe(self) -> str:
        """One line for people: ``top-64, values u8, temperature 1.0``."""
        if self.kind == "none":
            return "tokens only (no teacher distributions)"
        what = {"topk": f"top-{self.k}", "sampled": f"sampled n={self.samples}", "full": "full"}
        return f"{what[self.kind]}, values {self.values}, temperature {self.temperature}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Encoding:
        return cls(
            kind=_typed(d, "kind", (str,), "a string"),
            values=_typed(d, "values", (str,), "a string"),
            temperature=float(_typed(d, "temperature", (int, float), "a number")),
            k=_typed(d, "k", (int,), "an integer", optional=True),
            samples=_typed(d, "samples", (int,), "an integer", optional=True),
        )


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
        for key in ("chunk_positions", "shard_positions", "width", "vector_chunk_positions"):
            if not _is_int(getattr(self, key)):
                raise FormatError(f"layout {key} must be an integer, found {getattr(self, key)!r}")
        if self.value_dtype not in ("float32", "float16", "uint16", "uint8"):
            raise FormatError(
                f"layout value_dtype {self.value_dtype!r} is not float32, float16, uint16 or uint8"
            )
        if not 0 <= self.width <= MAX_VOCAB:
            raise FormatError(f"layout width {self.width} is outside [0, {MAX_VOCAB}]")
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
        row = max(self.width * max(_ITEMSIZE[self.value_dtype], _ITEMSIZE[self.id_dtype]), 4)
        if self.chunk_positions * row > MAX_CHUNK_BYTES or self.vector_chunk_positions * 4 > (
            MAX_CHUNK_BYTES
        ):
            raise FormatError(
                f"a chunk of {self.chunk_positions} positions of width {self.width} (or of "
                f"{self.vector_chunk_positions} vector positions) exceeds {MAX_CHUNK_BYTES >> 20} "
                "MiB decoded; use smaller --chunk-positions"
            )
        per = self.shard_positions // min(self.chunk_positions, self.vector_chunk_positions)
        if per > MAX_CHUNKS_PER_SHARD:
            raise FormatError(
                f"a shard of {self.shard_positions} positions holds {per} chunks; at most "
                f"{MAX_CHUNKS_PER_SHARD} are allowed: use smaller --shard-positions"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        for key in ("id_dtype", "value_dtype"):
            _typed(d, key, (str,), "a string")
        return cls(**{k: _typed(d, k, (object,), "present") for k in cls.__dataclass_fields__})

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
        version = _typed(d, "format_version", (str,), 'a string like "1.1"')
        parts = version.split(".")
        if len(parts) != 2 or not all(p.isdigit() and p.isascii() for p in parts):
            raise FormatError(f"format_version {version!r:.40} is not MAJOR.MINOR")
        if parts[0] != FORMAT_VERSION.split(".")[0]:
            raise UnsupportedVersionError(
                f"store format version {version!r} is not supported: this logitstore reads "
                f"version {FORMAT_VERSION.split('.')[0]}.x; upgrade logitstore to read it"
            )
        extensions = _typed(d, "extensions", (list,), "a list of strings", optional=True) or []
        if not all(isinstance(e, str) for e in extensions) or len(set(extensions)) != len(
            extensions
        ):
            raise FormatError(f"extensions {extensions!r:.80} is not a list of distinct strings")
        unknown = set(extensions) - _EXTENSIONS_UNDERSTOOD
        if unknown:
            raise UnsupportedVersionError(
                f"store requires extensions {sorted(unknown)} that this logitstore does not "
                "implement; upgrade logitstore to read it"
            )

        def obj(key: str, optional: bool = True) -> dict[str, Any] | None:
            value: dict[str, Any] | None = _typed(d, key, (dict,), "an object", optional=optional)
            return value

        try:
            md = cls(
                encoding=Encoding.from_dict(obj("encoding", False) or {}),
                layout=Layout.from_dict(obj("layout", False) or {}),
                vocab_size=_typed(d, "vocab_size", (int,), "an integer"),
                num_positions=_typed(d, "num_positions", (int,), "an integer"),
                num_sequences=_typed(d, "num_sequences", (int,), "an integer"),
                seq_len=_typed(d, "seq_len", (int,), "an integer", optional=True),
                seed=_typed(d, "seed", (int,), "an integer"),
                identity=_typed(d, "identity", (str,), "a string"),
                teacher=dict(obj("teacher") or {}),
                tokenizer=obj("tokenizer"),
                tool=dict(obj("tool") or {}),
                created_at=_typed(d, "created_at", (str,), "a string", optional=True) or "",
                state=_typed(d, "state", (str,), "a string"),
                format_version=version,
                extensions=tuple(extensions),
                generation=obj("generation"),
            )
        except FormatError as e:
            raise FormatError(str(e)) from None
        except LogitStoreError as e:
            raise FormatError(f"invalid logitstore metadata: {e}") from None
        _check_ranges(md)
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


def _check_ranges(md: StoreMetadata) -> None:
    """Numbers that must agree with each other before anything is sized by them (FORMAT.md §3)."""
    v, n, s = md.vocab_size, md.num_positions, md.num_sequences

    def bad(what: str) -> FormatError:
        return FormatError(f"invalid logitstore metadata: {what}")

    if not 1 <= v <= MAX_VOCAB:
        raise bad(f"vocab_size {v} is outside [1, {MAX_VOCAB}]")
    if not 0 <= n <= MAX_POSITIONS:
        raise bad(f"num_positions {n} is outside [0, {MAX_POSITIONS}]")
    if not (0 <= s <= n and (s == 0) == (n == 0)):
        raise bad(
            f"num_sequences {s} does not fit num_positions {n}: every sequence holds at least "
            "one position"
        )
    if md.seq_len is not None and md.seq_len < 1:
        raise bad(f"seq_len {md.seq_len} must be at least 1")
    if not 0 <= md.seed < 1 << 64:
        raise bad(f"seed {md.seed} is outside [0, 2**64)")
    if md.num_shards > MAX_SHARDS:
        raise bad(f"{md.num_shards} shards; at most {MAX_SHARDS} are allowed")
    enc = md.encoding
    if enc.kind == "topk" and enc.k is not None and enc.k > v:
        raise bad(f"k = {enc.k} exceeds vocab_size {v}")
