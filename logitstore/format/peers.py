"""The peers' offline-KD dataset layouts: which columns axolotl and DistillKit read, and what
each row means. Export (:mod:`logitstore.tools.peers`) writes these; import
(:mod:`logitstore.write.peer_import`) reads them back into a store.

Checked against the peers' sources (docs/PEERS.md has the details and line references):

- **axolotl 0.21.0** (PyPI), KD plugin, dataset type ``axolotl.integrations.kd.chat_template``
  (``KDStrategyLoaderV2``): per conversation ``messages``, per position ``target_token_ids``
  (list<list<int>>) and log-probabilities under ``logprobs_field`` (default ``logprobs``,
  list<list<float>>), a per-dataset ``temperature``. Row ``j`` of the lists is aligned with
  the *last* rows of the tokenised conversation (missing leading rows are padded and
  masked) and is the distribution of the token after position ``j`` (the trainer pairs it
  with the student's hidden state at ``j``; only the hard labels are shifted). It
  renormalises over the top-k, so the residual is dropped.
- **DistillKit** (arcee-ai/DistillKit at ``a61c2e7``): one row per sequence, ``input_ids``,
  ``labels`` (KD mask ``labels >= 0`` at row ``j``), raw top-k ``token_ids`` and
  ``top_values`` (log-probabilities, taken to be at T = 1 by ``OfflineSignalSource``), read by
  ``LogprobCompressor.decompress_to_sparse``, which needs a ``logprob_compressor`` config
  with ``d`` = vocabulary size. Row ``j`` is the distribution of token ``j + 1`` (vLLM's
  prompt log-probs without the first, empty one; ``_truncate_row`` cuts ``input_ids`` to
  the rows there are).

So in both, row ``j`` of a sequence is what a logitstore store keeps at position ``j``
(FORMAT.md §4): the teacher's distribution for the token after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import InputError

__all__ = [
    "AXOLOTL",
    "DATA_FILE",
    "DISTILLKIT",
    "IGNORE_LABEL",
    "INPUT_IDS_COLUMN",
    "LOSS_MASK_COLUMN",
    "MESSAGES_COLUMN",
    "PEER_FORMATS",
    "PINNED",
    "RESIDUAL_COLUMN",
    "SIDECAR",
    "SIDECAR_TOKENIZER",
    "ZERO_LOGPROB",
    "PeerFormat",
    "PeerSchema",
    "peer_schema",
]

PeerFormat = Literal["axolotl", "distillkit"]
PEER_FORMATS: tuple[str, ...] = get_args(PeerFormat)

#: The peer versions these layouts were checked against.
PINNED: dict[str, str] = {
    "axolotl": "axolotl 0.21.0 (PyPI), src/axolotl/integrations/kd/chat_template.py",
    "distillkit": "arcee-ai/DistillKit a61c2e7d25c2e990d45832e12bd8542bdee9c810",
}

#: The tokens each row was computed on (both peers accept it; axolotl re-tokenises
#: ``messages`` itself and ignores it).
INPUT_IDS_COLUMN = "input_ids"
MESSAGES_COLUMN = "messages"
#: logitstore's own extra columns, which the peers ignore: the exact mass outside the top-k
#: (so an export imports back exactly), and the 0/1 loss mask (axolotl derives its own).
RESIDUAL_COLUMN = "logitstore_residual"
LOSS_MASK_COLUMN = "logitstore_loss_mask"
#: DistillKit's ignored label (Hugging Face's -100).
IGNORE_LABEL = -100
#: The log-probability written for a candidate of probability 0 (a padding slot, or a
#: quantised value of 0). Not -inf: both peers multiply p · (log p − log q), and 0 · -inf
#: is NaN; exp(-80) ≈ 1.8e-35 is a normal float32, so the peers' renormalising and
#: re-logging keeps it finite. Import reads exactly this value back as 0.
ZERO_LOGPROB = -80.0
#: What an export directory holds: the rows, what logitstore knows about them (vocabulary,
#: temperature, provenance), and the teacher's tokenizer when the store keeps one. The rows
#: sit where ``datasets.load_dataset(DIR)`` looks for a train split, so it reads them and
#: not the JSON files beside them (DistillKit loads a directory that way).
DATA_FILE = "data/train-00000-of-00001.parquet"
SIDECAR = "logitstore.json"
SIDECAR_TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class PeerSchema:
    """The columns of one peer's rows (one row per sequence; per-position lists)."""

    name: PeerFormat
    ids: str  # list<list<int>>: candidate ids per position
    logprobs: str  # list<list<float>>: their log-probabilities
    #: the per-position mask column the peer reads (``labels`` for DistillKit), or None
    labels: str | None

    @property
    def required(self) -> tuple[str, ...]:
        """Columns an import cannot do without."""
        return (INPUT_IDS_COLUMN, self.ids, self.logprobs)


AXOLOTL = PeerSchema("axolotl", ids="target_token_ids", logprobs="logprobs", labels=None)
DISTILLKIT = PeerSchema("distillkit", ids="token_ids", logprobs="top_values", labels="labels")


def peer_schema(fmt: str) -> PeerSchema:
    """The schema of ``fmt`` (``axolotl`` or ``distillkit``).

    Raises:
        InputError: another name.
    """
    for s in (AXOLOTL, DISTILLKIT):
        if s.name == fmt:
            return s
    raise InputError(f"unknown peer format {fmt!r}: expected one of {', '.join(PEER_FORMATS)}")
